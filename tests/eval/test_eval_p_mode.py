"""``eval sweep --p-mode`` without a server: which mode a server's answer selects, the sparsity of
one p from the per-p counters against a hand count, and the lm-eval model whose requests carry p.
The two modes' results on a real server are compared in test_eval_sweep.py."""

import pytest

from vllm_sparsity.config import SparsityConfigError
from vllm_sparsity.eval.errors import ServerError
from vllm_sparsity.eval.grid import measured_sparsity, p_mode


def test_auto_picks_request_only_where_the_server_applies_it():
    applies = {"request_p": {"applied": True}}
    assert p_mode(applies, "auto") == "request"
    assert p_mode({"request_p": {"applied": False}}, "auto") == "global"
    assert p_mode({}, "auto") == "global"  # a plugin from before p per request
    assert p_mode(applies, "global") == "global"
    # An attached server at another target than the sweep's: auto sets it point by point.
    assert p_mode(applies, "auto", target_fits=False) == "global"
    with pytest.raises(ServerError, match="--p-mode request: the server does not apply"):
        p_mode({}, "request")


def _answer(counters, layers=()):
    return {"layers": list(layers), "request_p": {"applied": True, "counters": counters}}


def test_measured_sparsity_of_one_p_from_the_per_p_counters():
    before = _answer({"0.7": {"input": {"zeroed": 10, "total": 100},
                              "intermediate": {"zeroed": 5, "total": 50}}})
    after = _answer({"0.7": {"input": {"zeroed": 70, "total": 200},
                             "intermediate": {"zeroed": 45, "total": 150}},
                     "0.5": {"input": {"zeroed": 90, "total": 100}}})
    got = measured_sparsity(before, after, "all_inputs", 0.7)
    assert got == {"input": 60 / 100, "intermediate": 40 / 100, "overall": 100 / 200,
                   "activations": 200}
    # A p first seen between the readings counts from zero; only the target's sites enter.
    assert measured_sparsity(before, after, "input", 0.5) == {"input": 0.9, "overall": 0.9,
                                                              "activations": 100}
    # A p the server never counted: no activations (the sweep refuses such a point).
    assert measured_sparsity(before, after, "input", 0.3)["activations"] == 0
    # Without p: the per-layer counters, as before.
    layers_b = [{"layer": 0, "site": "input", "zeroed": 1, "total": 10}]
    layers_a = [{"layer": 0, "site": "input", "zeroed": 4, "total": 20}]
    assert measured_sparsity(_answer({}, layers_b), _answer({}, layers_a), "input") == {
        "input": 0.3, "overall": 0.3, "activations": 10}


def test_lm_eval_model_adds_the_p_to_every_request():
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from vllm_sparsity.eval.lm_eval_model import SparsityCompletionsAPI

    model = object.__new__(SparsityCompletionsAPI)  # no tokenizer: only the payload is built
    plain = object.__new__(LocalCompletionsAPI)
    for m in (model, plain):
        m.model, m._max_gen_toks = "gemma", 16
    model.sparsity_p = 0.7
    for generate, gen_kwargs in ((False, None), (True, {"until": ["\n"], "max_gen_toks": 8})):
        got = model._create_payload([[2, 5, 9]], generate=generate, gen_kwargs=dict(gen_kwargs or {}))
        want = plain._create_payload([[2, 5, 9]], generate=generate,
                                     gen_kwargs=dict(gen_kwargs or {}))
        assert got == {**want, "vllm_xargs": {"sparsity_p": 0.7}}
    with pytest.raises(SparsityConfigError, match=r"sparsity_p must be a number in \[1e-06, 1\]"):
        SparsityCompletionsAPI(sparsity_p="1.5", model="gemma")
    assert model.sparsity_p == 0.7
