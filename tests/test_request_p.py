"""p per request without a server: the per-token p buffer against a naive loop, the seam applying
each row's own p (against the paper's sort rule), admission checks and the prefix-cache salt. The
served path (HTTP, concurrent requests, 400s) is in test_serve.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from capture_guard import CaptureGuard
from layers import make_layer, sparse

from reference import paper_top_p_mask
from vllm_sparsity import _vllm_compat, plugin, request_p
from vllm_sparsity.config import SparsityConfig, SparsityConfigError
from vllm_sparsity.state import RuntimeState

NAN = math.nan


def naive_token_p(qsl, ps, n, server_p, site_on):
    """p of each real token (None for padding), one token at a time."""
    out = []
    for t in range(n):
        r = next((r for r in range(len(qsl) - 1) if qsl[r] <= t < qsl[r + 1]), None)
        if r is None:
            out.append(None)
        elif r < len(ps) and not math.isnan(ps[r]) and site_on:
            out.append(ps[r])
        else:
            out.append(server_p)
    return out


# vLLM's runner buffer [max_num_reqs + 1]: boundaries, then the token count repeated; the requests'
# own p (NaN: none), in batch order; tokens in the forward (padding included).
STEPS = [
    ([0, 5, 6, 7, 7, 7, 7, 7], [0.5, NAN, 0.7], 9),  # prefill + two decodes, padded
    ([0, 1, 2, 3, 4, 4, 4, 4], [NAN, NAN, NAN, NAN], 4),  # nobody carries one: server's p
    ([0, 3, 4, 9, 9, 9, 9, 9], [0.3, 0.99, 1.0], 12),
    ([0, 1, 2, 3, 4, 5, 6, 7], [0.2, NAN, 0.4, NAN, 0.6, NAN, 0.8], 7),  # a full batch
]


def test_token_p_buffer_equals_a_naive_loop_and_is_capture_safe():
    state = RuntimeState(SparsityConfig(p=0.9), torch.device("cpu"), 16, metrics_on=False)
    qsl = torch.zeros(8, dtype=torch.int32)
    state.bind_query_start_loc(qsl, "Runner")
    for target in ("all_inputs", "input"):  # "input": the intermediate site is off, p 1 for all
        state.set(target=target)
        for q, ps, n in STEPS + STEPS[:1]:  # the first again: a step after one without any p
            qsl.copy_(torch.tensor(q, dtype=torch.int32))  # vLLM writes its buffer in place
            state.set_request_p(ps)  # eager, before the graph
            with CaptureGuard() as guard:
                state.mark_phases(n, _vllm_compat.STEP)
            assert guard.violations == []
            for site in ("input", "intermediate"):
                on = site in state.config.sites
                want = naive_token_p(q, ps, n, 0.9 if on else 1.0, on)
                got = state.token_p[site][:n].tolist()
                assert [g for g, w in zip(got, want) if w is not None] == \
                    [w for w in want if w is not None], (target, q, ps, site)


@pytest.mark.parametrize("rule, keep_all", [("top-p", 1.0), ("max-p", 0.0)])
def test_request_p_replaces_every_target_sites_p(rule, keep_all):
    """Per-site server p (input 0.95, intermediate 0.85): a token without its own p gets its
    site's; one with p gets it at every site of the target; a site outside the target runs at the
    rule's keep-everything p (1 for top-p; 0 for max-p, whose p = 1 would keep only the max)."""
    state = RuntimeState(SparsityConfig(p={"input": 0.95, "intermediate": 0.85}, rule=rule),
                         torch.device("cpu"), 8, metrics_on=False)
    state.bind_query_start_loc(torch.tensor([0, 2, 3, 3], dtype=torch.int32), "Runner")
    state.set_request_p([0.5, NAN])
    state.mark_phases(3, _vllm_compat.STEP)
    assert state.token_p["input"][:3].tolist() == [0.5, 0.5, 0.95]
    assert state.token_p["intermediate"][:3].tolist() == [0.5, 0.5, 0.85]
    state.set(p=0.9, target="input")  # intermediate leaves the target
    state.mark_phases(3, _vllm_compat.STEP)
    assert state.token_p["input"][:3].tolist() == [0.5, 0.5, 0.9]
    assert state.token_p["intermediate"][:3].tolist() == [keep_all] * 3


def test_steps_without_requests_use_the_servers_p():
    state = RuntimeState(SparsityConfig(p=0.8), torch.device("cpu"), 8, metrics_on=False)
    state.bind_query_start_loc(torch.tensor([0, 2, 4, 4], dtype=torch.int32), "Runner")
    state.set_request_p([0.3, 0.4])
    state.mark_phases(4, _vllm_compat.STEP)
    assert state.token_p["input"][:4].tolist() == [0.3, 0.3, 0.4, 0.4]
    for step in (_vllm_compat.NO_REQUESTS, _vllm_compat.MICRO_BATCH):
        state.mark_phases(4, step)
        assert state.token_p["input"].tolist() == [0.8] * 8, step
    state.set(p=0.6)  # the route: every token at the new p until the next step
    assert state.token_p["intermediate"].tolist() == [0.6] * 8


def test_request_ps_in_batch_order():
    params = {"a": SimpleNamespace(extra_args={"sparsity_p": 0.5}),
              "b": SimpleNamespace(extra_args=None), "c": None,
              "d": SimpleNamespace(extra_args={"other": 1})}
    got = request_p.request_ps(["d", "a", "c", "b"], params.get)
    assert [None if math.isnan(p) else p for p in got] == [None, 0.5, None, None]


def test_seam_applies_each_tokens_request_p():
    """One layer in a bound state: three requests (p 0.3, the server's 0.9, 0.6) of a step; each
    output row must equal the dense GEMM of the row sparsified by the paper's rule at its p."""
    K, N = 96, 40
    layer = make_layer(K, N, seed=2)
    state = sparse(layer, 0.9, max_tokens=16)
    state.bind_query_start_loc(torch.tensor([0, 4, 5, 7, 7], dtype=torch.int32), "Runner")
    state.set_request_p([0.3, NAN, 0.6])
    state.mark_phases(7, _vllm_compat.STEP)
    x = torch.randn(7, K).to(torch.bfloat16)
    y = layer.quant_method.apply(layer, x)
    token_ps = [0.3] * 4 + [0.9] + [0.6] * 2
    for t, p in enumerate(token_ps):
        xs = torch.where(paper_top_p_mask(x[t:t + 1].float(), p), x[t:t + 1], 0)
        assert torch.equal(y[t:t + 1], F.linear(xs, layer.weight)), (t, p)
    # A request at the server's p gives what the scalar p gives.
    assert torch.equal(y[4:5], F.linear(torch.where(paper_top_p_mask(x[4:5].float(), 0.9),
                                                    x[4:5], 0), layer.weight))


def test_counters_per_request_p_equal_the_paper_rule_per_p():
    """Two steps with requests at p 0.3 and 0.6 mixed with one without p (and padding): each p's
    row of the layer's per-p counters holds exactly the zeroed and total activations of its
    tokens under the paper's rule; the tokens without p go to the last row; the worker snapshot and
    the merge give them per p and site."""
    from vllm_sparsity import counters

    K, N = 96, 40
    layer = make_layer(K, N, seed=4)
    state = sparse(layer, 0.9, max_tokens=16)
    qsl = torch.zeros(5, dtype=torch.int32)
    state.bind_query_start_loc(qsl, "Runner")
    want = {0.3: [0, 0], 0.6: [0, 0], None: [0, 0]}
    steps = [([0, 4, 5, 7, 7], [0.3, NAN, 0.6], 8), ([0, 1, 2, 3, 3], [0.6, 0.3, NAN], 4)]
    for seed, (q, ps, n) in enumerate(steps):
        qsl.copy_(torch.tensor(q, dtype=torch.int32))
        state.set_request_p(ps)
        state.mark_phases(n, _vllm_compat.STEP)
        x = torch.randn(n, K, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        layer.quant_method.apply(layer, x)
        for r, p in enumerate(ps):
            for t in range(q[r], q[r + 1]):
                kept = int(paper_top_p_mask(x[t:t + 1].float(), 0.9 if math.isnan(p) else p).sum())
                row = want[None if math.isnan(p) else p]
                row[0] += K - kept
                row[1] += K
    stats = layer.sparsity_p_stats.tolist()
    assert stats[state.p_slots[0.3]] == want[0.3] and stats[state.p_slots[0.6]] == want[0.6]
    # The last row (never published): tokens without p, and padding (token 7, then token 3).
    assert stats[request_p.P_SLOTS][1] == want[None][1] + 2 * K
    assert sum(row[1] for row in stats) == K * 12
    merged = counters.merge_by_p([counters.snapshot(state, 0, None)])
    assert merged["counters"] == {"0.3": {"input": dict(zip(("zeroed", "total"), want[0.3]))},
                                  "0.6": {"input": dict(zip(("zeroed", "total"), want[0.6]))}}
    state.reset_counters()
    assert not layer.sparsity_p_stats.any()


def test_request_slots_match_a_lookup():
    slot_p = torch.full((request_p.P_SLOTS,), NAN, dtype=torch.float64)
    slot_p[:3] = torch.tensor([0.5, 0.7, 0.25], dtype=torch.float64)
    ps = [0.7, NAN, 0.25, 0.9, 0.5]
    got = request_p.request_slots(torch.tensor(ps, dtype=torch.float64), slot_p).tolist()
    table = {0.5: 0, 0.7: 1, 0.25: 2}
    assert got == [table.get(p, request_p.P_SLOTS) for p in ps]


def test_merge_by_p_sums_split_shards_and_matches_p_across_workers():
    """TP rank 1 adds only its shard of a split input; two replicas (DP) that gave one p different
    rows are matched by p."""
    from vllm_sparsity import counters

    def snap(tp_rank, slots, rows_in, rows_down):
        return {"tp_rank": tp_rank, "p_slots": slots, "request_p_applied": True,
                "sites": [[0, "input", "a", 0, False], [0, "intermediate", "b", 0, True]],
                "p_stats": [rows_in, rows_down]}

    a = snap(0, {"0.5": 0}, [[1, 10], [0, 0]], [[2, 20], [0, 0]])
    b = snap(1, {"0.5": 0}, [[1, 10], [0, 0]], [[3, 20], [0, 0]])  # same tokens, other shard
    c = snap(0, {"0.7": 0, "0.5": 1}, [[4, 10], [5, 10]], [[6, 20], [7, 20]])  # another replica
    got = counters.merge_by_p([a, b, c])
    assert got["applied"] and got["counters"] == {
        "0.5": {"input": {"zeroed": 1 + 5, "total": 20}, "intermediate": {"zeroed": 2 + 3 + 7,
                                                                         "total": 60}},
        "0.7": {"input": {"zeroed": 4, "total": 10}, "intermediate": {"zeroed": 6, "total": 20}}}


@pytest.mark.parametrize("value", [0, -0.5, 1.5, "0.5", None, True, [0.5], NAN, 1e-7])
def test_bad_request_p_is_refused_naming_the_field(value):
    with pytest.raises(SparsityConfigError, match=r"vllm_xargs\.sparsity_p must be a number in "
                                                  r"\[1e-06, 1\]"):
        request_p.requested_p({"sparsity_p": value})


def test_good_request_p_and_none():
    assert request_p.requested_p({"sparsity_p": 0.8}) == 0.8
    assert request_p.requested_p({"sparsity_p": 1}) == 1.0
    assert request_p.requested_p(None) is None and request_p.requested_p({"x": 1}) is None


def test_request_p_0_is_max_p_only():
    """0 is max-p's keep-everything p (rule.KEEP_ALL_P): a request may ask for the dense model."""
    assert request_p.requested_p({"sparsity_p": 0}, "max-p") == 0.0
    with pytest.raises(ValueError, match=r"vllm_xargs\.sparsity_p must be a number in "
                                         r"\[1e-06, 1\], got 0$"):
        request_p.requested_p({"sparsity_p": 0}, "top-p")
    with pytest.raises(ValueError, match="got -0.5; under the max-p rule also 0"):
        request_p.requested_p({"sparsity_p": -0.5}, "max-p")


def test_admission_refuses_p_on_a_server_without_sparsity():
    params = SimpleNamespace(extra_args={"sparsity_p": 0.5})
    with pytest.raises(ValueError, match="runs without sparsity"):
        plugin._check_request_p(SimpleNamespace(additional_config={}), params)
    on = SimpleNamespace(additional_config={"sparsity": {"p": 0.9, "target": "all_inputs",
                                                         "backend": "torch"}})
    plugin._check_request_p(on, params)  # accepted
    plugin._check_request_p(SimpleNamespace(additional_config={}),
                            SimpleNamespace(extra_args=None))
    # 0 on a max-p server only (its keep-everything p), checked against the server's rule.
    dense = SimpleNamespace(extra_args={"sparsity_p": 0})
    with pytest.raises(ValueError, match=r"vllm_xargs\.sparsity_p must be a number"):
        plugin._check_request_p(on, dense)
    max_p = SimpleNamespace(additional_config={"sparsity": {"p": 0.5, "rule": "max-p"}})
    plugin._check_request_p(max_p, dense)


def test_prefix_cache_salt_depends_on_the_p():
    def salt(extra, cache_salt=None):
        request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra),
                                  cache_salt=cache_salt)
        plugin._salt_request_p(request)
        return request.cache_salt

    assert salt(None) is None and salt({"other": 1}, "user") == "user"  # untouched without p
    salts = {salt({"sparsity_p": p}) for p in (0.5, 0.7, 0.70000001)}
    assert len(salts) == 3 and None not in salts
    assert salt({"sparsity_p": 0.5}) == salt({"sparsity_p": 0.5})
    assert salt({"sparsity_p": 0.5}, "user") != salt({"sparsity_p": 0.5})  # keeps the user's salt
    assert salt({"sparsity_p": 0.5}, "user").startswith("user")


def test_process_inputs_wrapper_turns_errors_into_validation_errors(monkeypatch):
    """The admission hook as vLLM calls it: a ValueError from the check becomes vLLM's
    VLLMValidationError (HTTP 400) naming the field; a good request gets its salt."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    def fake_process_inputs(self, request_id, prompt, params, *args, **kwargs):
        return SimpleNamespace(sampling_params=params, cache_salt=None)

    monkeypatch.setattr(InputProcessor, "process_inputs", fake_process_inputs)
    _vllm_compat.on_process_inputs(plugin._check_request_p, plugin._salt_request_p,
                                   request_p.FIELD)
    processor = object.__new__(InputProcessor)
    processor.vllm_config = SimpleNamespace(additional_config={"sparsity": {
        "p": 0.9, "target": "all_inputs", "backend": "torch"}})
    with pytest.raises(VLLMValidationError) as e:
        processor.process_inputs("r", "prompt", SimpleNamespace(extra_args={"sparsity_p": 2}))
    assert e.value.parameter == "vllm_xargs.sparsity_p" and "[1e-06, 1]" in str(e.value)
    request = processor.process_inputs("r", "prompt",
                                       SimpleNamespace(extra_args={"sparsity_p": 0.5}))
    assert request.cache_salt == request_p.salted(None, 0.5)
