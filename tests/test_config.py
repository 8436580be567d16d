"""Config resolution: precedence flags > additional_config > environment, and clear errors."""

import pytest

from vllm_sparsity import config
from vllm_sparsity.config import SparsityConfig, SparsityConfigError, resolve

FLAG_P_MESSAGE = r"--sparsity-p must be a number in \[1e-06, 1\]"


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
        with pytest.raises(SparsityConfigError, match=FLAG_P_MESSAGE):
            resolve({"p": value}, {}, {})
        return
    with pytest.raises(SparsityConfigError, match=FLAG_P_MESSAGE):
        resolve({"p": value}, {}, {})


@pytest.mark.parametrize("value", [0, 2, "x", True, None, [0.5]])
def test_bad_p_from_additional_config_names_the_field(value):
    if value is None:
        assert resolve({}, {"sparsity": {"p": None}}, {}) is None
        return
    with pytest.raises(SparsityConfigError, match=r"sparsity\.p must be a number in \[1e-06, 1\]"):
        resolve({}, {"sparsity": {"p": value}}, {})


def test_bad_values_from_environment_name_the_variable():
    with pytest.raises(SparsityConfigError,
                       match=r"VLLM_SPARSITY_P must be a number in \[1e-06, 1\]"):
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


@pytest.mark.parametrize("value", [5e-324, 1e-300, 9.99e-7, -0.0])
def test_p_below_the_floor_is_refused_everywhere(value):
    """The floor (config.P_MIN) is in parse_p, which every source goes through."""
    with pytest.raises(SparsityConfigError, match=FLAG_P_MESSAGE):
        resolve({"p": repr(value)}, {}, {})
    with pytest.raises(SparsityConfigError, match=r"sparsity\.p must be a number in \[1e-06, 1\]"):
        resolve({}, {"sparsity": {"p": value}}, {})
    with pytest.raises(SparsityConfigError, match=r"VLLM_SPARSITY_P must be a number in \[1e-06"):
        resolve({}, {}, {"VLLM_SPARSITY_P": repr(value)})
    with pytest.raises(SparsityConfigError, match=r"p must be a number in \[1e-06, 1\]"):
        SparsityConfig(p=value)
    assert SparsityConfig(p=config.P_MIN).p == 1e-6


def test_max_p_takes_its_keep_everything_p_0_from_every_source():
    """max-p keeps every nonzero at p = 0 (rule.KEEP_ALL_P), below the floor: every source takes
    it under max-p, and only there."""
    assert resolve({"p": "0", "rule": "max-p"}, {}, {}).p == 0.0
    assert resolve({}, {"sparsity": {"p": {"input": 0, "intermediate": 0.5}, "rule": "max-p"}},
                   {}).p == {"input": 0.0, "intermediate": 0.5}
    assert resolve({}, {}, {"VLLM_SPARSITY_P": "-0", "VLLM_SPARSITY_RULE": "max-p"}).p == 0.0
    assert SparsityConfig(p=0, rule="max-p").p_of("input") == 0.0
    for rule_name in ("top-p", "top-k", "lq"):
        with pytest.raises(SparsityConfigError,
                           match=r"p must be a number in \[1e-06, 1\], got 0$"):
            SparsityConfig(p=0, rule=rule_name, q=2.0 if rule_name == "lq" else None)
    with pytest.raises(SparsityConfigError, match=r"--sparsity-p must be a number in \[1e-06, 1\], "
                       r"got '-1'; under the max-p rule also 0 \(keeps every nonzero\)$"):
        resolve({"p": "-1", "rule": "max-p"}, {}, {})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_p_floor_keeps_the_largest_entry_of_the_weakest_row(dtype):
    """At p = P_MIN the rule's float64 target p * sum|x| cannot underflow, even for a row of the
    dtype's smallest subnormal: the torch rule and the CPU kernel keep its entries (all tied) and
    the largest entry of an ordinary row. Below the floor (e.g. 1e-300) the CPU kernel's target
    underflows to 0 and it zeroes the weak row whole."""
    import torch

    from vllm_sparsity.kernels import cpu_backend
    from vllm_sparsity.rule import top_p_sparsify

    dtype = getattr(torch, dtype)
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # smallest subnormal
    x = torch.full((2, 64), tiny, dtype=dtype)
    x[1] = torch.linspace(0.01, 3.0, 64).to(dtype)  # a strictly largest entry
    p = torch.tensor([config.P_MIN], dtype=torch.float64)
    rules = {"torch": top_p_sparsify}
    if cpu_backend.select_isa()[1] is None:  # the CPU has the kernels' instruction set
        cpu_backend.load_ops()  # builds or loads the ops (this test may run alone)
        rules["cpu"] = torch.ops.vllm_sparsity.cpu_top_p_sparsify
    for name, sparsify in rules.items():
        _, kept = sparsify(x, p)
        assert kept.tolist() == [64, 1], name


def test_sparsity_section_must_be_an_object_or_absent():
    """[], false, 0 and "off" used to be taken as "sparsity off" without a word."""
    for section in ([], False, 0, "off", [0.5]):
        with pytest.raises(SparsityConfigError,
                           match=r"--additional-config: 'sparsity' must be an object with keys"):
            resolve({}, {"sparsity": section}, {})
    assert resolve({}, {"sparsity": None}, {}) is None
    assert resolve({}, {"sparsity": {}}, {}) is None


def test_error_messages_quote_a_short_prefix_of_the_value():
    with pytest.raises(SparsityConfigError) as e:
        resolve({}, {"sparsity": {"p": "9" * 100_000}}, {})
    assert len(str(e.value)) < 200 and "(100002 characters)" in str(e.value)
    with pytest.raises(SparsityConfigError) as e:
        resolve({"p": "0.5", "target": "x" * 5000}, {}, {})
    assert len(str(e.value)) < 220


@pytest.mark.parametrize("raw, value", [("", 60.0), ("0.5", 0.5), ("600", 600.0)])
def test_drain_timeout_from_the_environment(raw, value):
    assert config.drain_timeout_s({config.DRAIN_TIMEOUT_ENV: raw}) == value


@pytest.mark.parametrize("raw", ["0", "-1", "soon", "nan", "inf", "1e9"])
def test_bad_drain_timeout_names_the_variable(raw):
    with pytest.raises(SparsityConfigError, match=config.DRAIN_TIMEOUT_ENV + r" must be a number"):
        config.drain_timeout_s({config.DRAIN_TIMEOUT_ENV: raw})


# ---------------------------------------------------------------- rules, sites, p per site


def test_rule_and_q_from_each_source_and_precedence():
    assert resolve({"p": "0.5", "rule": "max-p"}, {}, {}).rule == "max-p"
    assert resolve({}, {"sparsity": {"p": 0.5, "rule": "lq", "q": 2}}, {}) == SparsityConfig(
        p=0.5, rule="lq", q=2.0)
    env = {"VLLM_SPARSITY_P": "0.5", "VLLM_SPARSITY_RULE": "lq", "VLLM_SPARSITY_Q": "0.5"}
    assert resolve({}, {}, env) == SparsityConfig(p=0.5, rule="lq", q=0.5)
    assert resolve({"q": "3"}, {"sparsity": {"q": 4}}, env).q == 3.0
    assert resolve({}, {"sparsity": {"rule": "top-k"}}, {"VLLM_SPARSITY_P": "0.5"}).rule == "top-k"
    assert resolve({"p": "0.5"}, {}, {}).rule == "top-p" and resolve({"p": "0.5"}, {}, {}).q is None


@pytest.mark.parametrize("flags, additional, env, message", [
    ({"rule": "top-q"}, {}, {}, "--sparsity-rule must be one of top-p, top-k, max-p, lq; got "
     "'top-q'"),
    ({}, {"sparsity": {"rule": "TOP-P"}}, {}, "--additional-config sparsity.rule must be one of "
     "top-p, top-k, max-p, lq; got 'TOP-P'"),
    ({}, {}, {"VLLM_SPARSITY_RULE": "topk"}, "VLLM_SPARSITY_RULE must be one of top-p"),
    ({"rule": "lq", "q": "0"}, {}, {}, "--sparsity-q must be a finite number > 0 (the L_q "
     "exponent), got '0'"),
    ({"rule": "lq", "q": "inf"}, {}, {}, "--sparsity-q must be a finite number > 0"),
    ({}, {"sparsity": {"rule": "lq", "q": True}}, {}, "sparsity.q must be a finite number > 0"),
    ({}, {}, {"VLLM_SPARSITY_RULE": "lq", "VLLM_SPARSITY_Q": "x"}, "VLLM_SPARSITY_Q must be a "
     "finite number > 0"),
    ({"rule": "lq"}, {}, {}, "--sparsity-rule lq needs --sparsity-q"),
    ({"q": "2"}, {}, {}, "--sparsity-q is the exponent of the lq rule only; --sparsity-rule is "
     "top-p: drop --sparsity-q or use lq"),
    ({"rule": "max-p", "q": "2"}, {}, {}, "--sparsity-q is the exponent of the lq rule only; "
     "--sparsity-rule is max-p"),
    ({}, {"sparsity": {"q": 2}}, {"VLLM_SPARSITY_RULE": "top-k"}, "--additional-config "
     "sparsity.q is the exponent of the lq rule only; VLLM_SPARSITY_RULE is top-k"),
    ({"rule": "max-p", "backend": "cpu"}, {}, {}, "--sparsity-backend cpu implements the top-p "
     "rule only; --sparsity-rule is max-p: use the torch backend (or auto, which picks it)"),
    ({}, {"sparsity": {"rule": "top-k"}}, {"VLLM_SPARSITY_BACKEND": "triton"},
     "VLLM_SPARSITY_BACKEND triton implements the top-p rule only; --additional-config "
     "sparsity.rule is top-k"),
])
def test_bad_rule_and_q_name_the_flags(flags, additional, env, message):
    with pytest.raises(SparsityConfigError) as e:
        resolve({"p": "0.5", **flags}, additional, env)
    assert message in str(e.value)


def test_rule_without_p_is_refused_not_ignored():
    with pytest.raises(SparsityConfigError, match="--sparsity-rule given without p"):
        resolve({"rule": "max-p"}, {}, {})


def test_config_object_checks_rule_and_q():
    with pytest.raises(SparsityConfigError, match="rule lq needs q"):
        SparsityConfig(p=0.5, rule="lq")
    with pytest.raises(SparsityConfigError, match="q is the exponent of the lq rule only"):
        SparsityConfig(p=0.5, q=2.0)
    with pytest.raises(SparsityConfigError, match="backend cpu implements the top-p rule only"):
        SparsityConfig(p=0.5, rule="top-k", backend="cpu")
    config = SparsityConfig(p=0.5, rule="lq", q=2.0)
    assert SparsityConfig.from_additional_config({"sparsity": config.to_dict()}) == config


def test_target_takes_a_comma_list_of_sites_in_model_order():
    assert resolve({"p": "0.5", "target": "intermediate,gate"}, {}, {}).target == \
        "gate,intermediate"
    assert resolve({"p": "0.5", "target": "intermediate,input"}, {}, {}).target == "all_inputs"
    config = resolve({}, {"sparsity": {"p": 0.5, "target": "up"}}, {})
    assert config.sites == ("up",)
    assert config.p_of("up") == 0.5 and config.p_of("input") == 1.0


@pytest.mark.parametrize("target", ["gate,gate", "gate,", "", "gate;up", "Input"])
def test_bad_site_lists_name_the_flag_and_the_sites(target):
    with pytest.raises(SparsityConfigError) as e:
        resolve({"p": "0.5", "target": target}, {}, {})
    assert str(e.value).startswith("--sparsity-target must be one of input, intermediate, "
                                   "all_inputs or a comma list of sites (input,gate,up,"
                                   "intermediate); got")


def test_p_per_site_from_each_source():
    want = SparsityConfig(p={"input": 0.95, "intermediate": 0.85}, target="all_inputs")
    assert resolve({"p": "input=0.95,intermediate=0.85"}, {}, {}) == want
    assert resolve({"p": " intermediate = 0.85 , input=0.95"}, {}, {}) == want  # model order
    assert resolve({}, {"sparsity": {"p": {"intermediate": 0.85, "input": 0.95}}}, {}) == want
    assert resolve({}, {"sparsity": {"p": "input=0.95,intermediate=0.85"}}, {}) == want
    assert resolve({}, {}, {"VLLM_SPARSITY_P": "input=0.95,intermediate=0.85"}) == want
    # No target given: the sites p names.
    config = resolve({"p": "gate=0.5,intermediate=0.7"}, {}, {})
    assert (config.target, config.p_of("gate"), config.p_of("intermediate"),
            config.p_of("input")) == ("gate,intermediate", 0.5, 0.7, 1.0)
    assert resolve({"p": "up=0.6", "target": "up"}, {}, {}).p == {"up": 0.6}
    assert config.to_dict()["p"] == {"gate": 0.5, "intermediate": 0.7}


@pytest.mark.parametrize("flags, additional, env, message", [
    ({"p": "inputs=0.9"}, {}, {}, "--sparsity-p: unknown site 'inputs'; sites: input, gate, up, "
     "intermediate"),
    ({"p": "input=1.5"}, {}, {}, "--sparsity-p[input] must be a number in [1e-06, 1], got '1.5'"),
    ({"p": "input=0.9,input=0.8"}, {}, {}, "--sparsity-p names a site twice"),
    ({"p": "input=0.9,0.8"}, {}, {}, "--sparsity-p must be a number in [1e-06, 1] or SITE=P "
     "pairs separated by commas (SITE in input, gate, up, intermediate), got 'input=0.9,0.8'"),
    ({"p": "input="}, {}, {}, "--sparsity-p[input] must be a number in [1e-06, 1], got ''"),
    ({}, {"sparsity": {"p": {"gate": 0}}}, {}, "--additional-config sparsity.p[gate] must be a "
     "number in [1e-06, 1], got 0"),
    ({}, {"sparsity": {"p": {"mlp": 0.5}}}, {}, "--additional-config sparsity.p: unknown site "
     "'mlp'"),
    ({}, {"sparsity": {"p": {}}}, {}, "--additional-config sparsity.p must name at least one "
     "site"),
    ({}, {}, {"VLLM_SPARSITY_P": "up=2"}, "VLLM_SPARSITY_P[up] must be a number in [1e-06, 1]"),
    ({"p": "input=0.9", "target": "all_inputs"}, {}, {}, "--sparsity-p gives p for the sites "
     "input but --sparsity-target all_inputs has the sites input, intermediate: name exactly "
     "the target's sites (or leave the target out: it is then the sites p names)"),
    ({"p": "gate=0.9,up=0.9"}, {}, {"VLLM_SPARSITY_TARGET": "gate"}, "--sparsity-p gives p for "
     "the sites gate, up but VLLM_SPARSITY_TARGET gate has the sites gate"),
])
def test_bad_p_per_site_names_the_flag_and_the_allowed_values(flags, additional, env, message):
    with pytest.raises(SparsityConfigError) as e:
        resolve(flags, additional, env)
    assert message in str(e.value)


# ---------------------------------------------------------------- mode


def test_mode_from_each_source_precedence_and_default():
    assert resolve({"p": "0.5"}, {}, {}).mode == "exact"
    assert resolve({"p": "0.5", "mode": "speed"}, {}, {}).mode == "speed"
    assert resolve({}, {"sparsity": {"p": 0.5, "mode": "speed"}}, {}).mode == "speed"
    env = {"VLLM_SPARSITY_P": "0.5", "VLLM_SPARSITY_MODE": "speed"}
    assert resolve({}, {}, env).mode == "speed"
    assert resolve({"mode": "exact"}, {"sparsity": {"mode": "speed"}}, env).mode == "exact"
    speed = SparsityConfig(p=0.5, mode="speed")
    assert SparsityConfig.from_additional_config({"sparsity": speed.to_dict()}) == speed


@pytest.mark.parametrize("flags, additional, env, message", [
    ({"mode": "fast"}, {}, {}, "--sparsity-mode must be one of exact, speed; got 'fast'"),
    ({"mode": ""}, {}, {}, "--sparsity-mode must be one of exact, speed; got ''"),
    ({}, {"sparsity": {"mode": "SPEED"}}, {}, "--additional-config sparsity.mode must be one of "
     "exact, speed; got 'SPEED'"),
    ({}, {"sparsity": {"mode": 1}}, {}, "--additional-config sparsity.mode must be one of exact, "
     "speed; got 1"),
    ({}, {}, {"VLLM_SPARSITY_MODE": "dense"}, "VLLM_SPARSITY_MODE must be one of exact, speed; "
     "got 'dense'"),
])
def test_bad_mode_names_its_source_and_the_allowed_values(flags, additional, env, message):
    with pytest.raises(SparsityConfigError) as e:
        resolve({"p": "0.5", **flags}, additional, env)
    assert str(e.value) == message


def test_mode_without_p_is_refused_and_the_object_checks_it():
    with pytest.raises(SparsityConfigError, match="--sparsity-mode given without p"):
        resolve({"mode": "speed"}, {}, {})
    with pytest.raises(SparsityConfigError, match="mode must be one of exact, speed; got 'x'"):
        SparsityConfig(p=0.5, mode="x")
