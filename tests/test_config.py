"""Config resolution: precedence flags > additional_config > environment, and clear errors."""

import pytest

from vllm_sparsity import config
from vllm_sparsity.config import SparsityConfig, SparsityConfigError, resolve


def test_off_when_no_source_sets_p():
    assert resolve({}, {}, {}) is None
    assert resolve({"p": None}, {"other": 1}, {"UNRELATED": "1"}) is None


def test_each_source_alone():
    assert resolve({"p": "0.5"}, {}, {}) == SparsityConfig(p=0.5)
    assert resolve({}, {"sparsity": {"p": 0.7, "target": "input"}}, {}) == SparsityConfig(
        p=0.7, target="input")
    env = {"VLLM_SPARSITY_P": "0.9", "VLLM_SPARSITY_TARGET": "intermediate",
           "VLLM_SPARSITY_BACKEND": "torch"}
    assert resolve({}, {}, env) == SparsityConfig(p=0.9, target="intermediate", backend="torch")


def test_precedence_is_per_field():
    flags = {"p": "0.6"}
    additional = {"sparsity": {"p": 0.7, "target": "input"}}
    env = {"VLLM_SPARSITY_P": "0.8", "VLLM_SPARSITY_TARGET": "intermediate",
           "VLLM_SPARSITY_BACKEND": "torch"}
    assert resolve(flags, additional, env) == SparsityConfig(p=0.6, target="input",
                                                             backend="torch")
    assert resolve({}, additional, env).p == 0.7
    assert resolve({}, {}, env).p == 0.8


@pytest.mark.parametrize("value", ["0", "-0.1", "1.0001", "nan", "inf", "abc", ""])
def test_bad_p_from_flag_names_the_flag(value):
    if value == "":  # an empty flag value is a value, not "unset"
        with pytest.raises(SparsityConfigError, match=r"--sparsity-p must be a number in \(0, 1\]"):
            resolve({"p": value}, {}, {})
        return
    with pytest.raises(SparsityConfigError, match=r"--sparsity-p must be a number in \(0, 1\]"):
        resolve({"p": value}, {}, {})


@pytest.mark.parametrize("value", [0, 2, "x", True, None, [0.5]])
def test_bad_p_from_additional_config_names_the_field(value):
    if value is None:
        assert resolve({}, {"sparsity": {"p": None}}, {}) is None
        return
    with pytest.raises(SparsityConfigError, match=r"sparsity\.p must be a number in \(0, 1\]"):
        resolve({}, {"sparsity": {"p": value}}, {})


def test_bad_values_from_environment_name_the_variable():
    with pytest.raises(SparsityConfigError, match=r"VLLM_SPARSITY_P must be a number in \(0, 1\]"):
        resolve({}, {}, {"VLLM_SPARSITY_P": "1.5"})
    with pytest.raises(SparsityConfigError,
                       match="VLLM_SPARSITY_TARGET must be one of input, intermediate, all_inputs"):
        resolve({}, {}, {"VLLM_SPARSITY_P": "0.5", "VLLM_SPARSITY_TARGET": "mlp"})


def test_bad_target_and_backend_name_the_flag():
    with pytest.raises(SparsityConfigError, match="--sparsity-target must be one of"):
        resolve({"p": "0.5", "target": "output"}, {}, {})
    with pytest.raises(SparsityConfigError, match="--sparsity-backend must be one of auto, triton"):
        resolve({"p": "0.5", "backend": "cuda"}, {}, {})


def test_unknown_key_and_bad_section_are_refused():
    with pytest.raises(SparsityConfigError, match=r"unknown key\(s\) \['top_p'\]"):
        resolve({}, {"sparsity": {"top_p": 0.5}}, {})
    with pytest.raises(SparsityConfigError, match="'sparsity' must be an object"):
        resolve({}, {"sparsity": 0.5}, {})


def test_target_without_p_is_refused_not_ignored():
    with pytest.raises(SparsityConfigError, match="--sparsity-target given without p"):
        resolve({"target": "input"}, {}, {})


def test_round_trip_through_additional_config():
    config = SparsityConfig(p=0.9, target="intermediate")
    assert SparsityConfig.from_additional_config({"sparsity": config.to_dict()}) == config
    assert SparsityConfig.from_additional_config({}) is None


@pytest.mark.parametrize("raw, value", [("", 5.0), ("0", 0.0), ("2.5", 2.5)])
def test_interval_from_the_environment(raw, value):
    assert config.interval_s({config.INTERVAL_ENV: raw}) == value


@pytest.mark.parametrize("env, given, on", [
    ("", None, True), ("0", None, False), ("0", True, True), ("5", False, False)])
def test_metrics_switch_reaches_additional_config(monkeypatch, env, given, on):
    """Process 0 stores the switch where every worker reads it and vLLM hashes it (the graph
    differs); re-resolving keeps it."""
    for name in ("VLLM_SPARSITY_P", "VLLM_SPARSITY_TARGET", "VLLM_SPARSITY_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(config.INTERVAL_ENV, env)
    extra = {} if given is None else {config.METRICS_KEY: given}
    resolved = config.with_resolved_sparsity({"sparsity": {"p": 0.5}, **extra})
    assert resolved[config.METRICS_KEY] is on and config.metrics_enabled(resolved) is on
    assert config.with_resolved_sparsity(resolved) == resolved
    assert config.METRICS_KEY not in config.with_resolved_sparsity(extra)  # sparsity off


@pytest.mark.parametrize("raw", ["-1", "soon", "nan"])
def test_bad_interval_names_the_variable(raw):
    with pytest.raises(ValueError, match=config.INTERVAL_ENV):
        config.interval_s({config.INTERVAL_ENV: raw})
