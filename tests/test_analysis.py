"""The analyses without vLLM: effective rank and Jaccard (``activation_stats``) against naive loops
and hand-computed cases, and the workers' recorder (``analysis``) against a naive replay."""

from __future__ import annotations

import math
import threading
import time
import types

import numpy as np
import pytest
import torch

from vllm_sparsity import analysis
from vllm_sparsity.activation_stats import effective_rank, jaccard
from vllm_sparsity.counters import DECODE, PAD, PREFILL
from vllm_sparsity.eval.analyze import expert_rows, plot
from vllm_sparsity.eval.grid import layer_deltas


def naive_effective_rank(x: np.ndarray) -> float:
    """Roy & Vetterli from numpy's SVD, one singular value at a time."""
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    h = 0.0
    for v in s:
        q = v / s.sum()
        if q > 0:
            h -= q * math.log(q)
    return math.exp(h) / x.shape[1]


def naive_jaccard(a: list[bool], b: list[bool]) -> float:
    sa = {i for i, v in enumerate(a) if v}
    sb = {i for i, v in enumerate(b) if v}
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


@pytest.mark.parametrize("rows,dim", [(8, 5), (5, 8), (33, 640)])
def test_rank_one_batch_is_one_over_the_dimension(rows, dim):
    g = torch.Generator().manual_seed(rows)
    x = torch.outer(torch.randn(rows, generator=g), torch.randn(dim, generator=g))
    assert effective_rank(x) == pytest.approx(1 / dim, rel=1e-5)


@pytest.mark.parametrize("dim", [1, 4, 64])
def test_identity_and_scaled_orthogonal_batches_are_one(dim):
    assert effective_rank(torch.eye(dim)) == pytest.approx(1.0, rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(dim)))
    assert effective_rank(3.5 * q) == pytest.approx(1.0, rel=1e-9)


def test_a_hand_computed_case():
    # singular values 3 and 1: q = (3/4, 1/4), exp(H) = exp(-(.75 ln .75 + .25 ln .25)) = 1.7548
    x = torch.tensor([[3.0, 0.0], [0.0, -1.0], [0.0, 0.0]])
    assert effective_rank(x) == pytest.approx(1.7547654 / 2, rel=1e-6)


@pytest.mark.parametrize("rows,dim,dtype", [(16, 40, torch.float32), (50, 12, torch.float64),
                                            (64, 128, torch.bfloat16)])
def test_effective_rank_against_a_naive_svd(rows, dim, dtype):
    g = torch.Generator().manual_seed(dim)
    # Decaying column scales: a spectrum far from flat, like real activations.
    x = (torch.randn(rows, dim, generator=g) * torch.rand(dim, generator=g) ** 4).to(dtype)
    assert effective_rank(x) == pytest.approx(naive_effective_rank(x.double().numpy()), rel=1e-6)


def test_effective_rank_edge_cases():
    assert effective_rank(torch.zeros(4, 6)) == 0.0
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        effective_rank(torch.ones(6))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        effective_rank(torch.ones(0, 6))


def test_jaccard_hand_cases():
    t = torch.tensor
    a = t([True, True, False, False, True])
    assert float(jaccard(a, a)) == 1.0
    assert float(jaccard(a, ~a)) == 0.0
    assert float(jaccard(a, t([True, False, True, False, True]))) == 0.5  # {0,4} of {0,1,2,4}
    assert float(jaccard(t([False, False]), t([False, False]))) == 1.0  # identical, empty


def test_jaccard_against_naive_sets():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(50, 37, generator=g) < 0.3
    b = torch.rand(50, 37, generator=g) < 0.6
    got = jaccard(a, b)
    assert got.dtype == torch.float64 and got.shape == (50,)
    for i in range(50):
        assert float(got[i]) == pytest.approx(naive_jaccard(a[i].tolist(), b[i].tolist()),
                                              abs=1e-15)


def test_jaccard_refuses_other_shapes_and_dtypes():
    with pytest.raises(ValueError, match="bool masks of one shape"):
        jaccard(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool masks of one shape"):
        jaccard(torch.ones(3), torch.ones(3))


# ---------------------------------------------------------------- the recorder


def replay(steps, tokens, rank_batch, dim=6, seed=0):
    """Feed a SiteRecorder ``steps`` (lists of row phases) with random x and masks; return its
    result and what a naive replay computes from the same data."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.full((32,), PAD, dtype=torch.int64)
    rec = analysis.SiteRecorder(phase, tokens)
    kept_rows, zeroed, total = [], 0, 0
    cons, drift, first, prev, decode_steps = [], [], None, None, 0
    for phases in steps:
        x = torch.randn(len(phases), dim, generator=g)
        mask = torch.rand(len(phases), dim, generator=g) < 0.5
        phase[:len(phases)] = torch.tensor(phases)
        rec(x, mask)
        real = [i for i, ph in enumerate(phases) if ph != PAD]
        for i in real:
            zeroed += dim - int(mask[i].sum())
            total += dim
            if len(kept_rows) < tokens:
                kept_rows.append(x[i])
        if len(real) == 1 and phases[real[0]] == DECODE:
            m = mask[real[0]].tolist()
            decode_steps += 1
            if first is None:
                first = m
            else:
                cons.append(naive_jaccard(m, prev))
                drift.append(naive_jaccard(m, first))
            prev = m
        elif real:
            first = prev = None
    ranks = [naive_effective_rank(torch.stack(kept_rows[i:i + rank_batch]).numpy())
             for i in range(0, len(kept_rows) - rank_batch + 1, rank_batch or 1)
             if rank_batch]
    naive = {"zeroed": zeroed, "total": total, "rows": len(kept_rows), "decode_steps": decode_steps,
             "consecutive_pairs": len(cons), "consecutive_sum": sum(cons),
             "drift_pairs": len(drift), "drift_sum": sum(drift), "rank_batches": len(ranks),
             "rank_sum": sum(ranks), "dim": dim}
    return rec.result(rank_batch), naive


def test_recorder_against_a_naive_replay():
    P, D = PREFILL, DECODE
    steps = ([[P] * 5] + [[D]] * 6  # request 1: prefill, 6 single-row decode steps
             + [[P] * 3, [D] * 1, [D], [D, PAD, PAD]]  # request 2, padded last step
             + [[D, D], [D], [D]]  # a batch of two ends the sequence; a new one starts
             + [[PAD, PAD]] + [[D]] * 2)  # a dummy run changes nothing
    got, naive = replay(steps, tokens=16, rank_batch=5)
    assert naive["consecutive_pairs"] == 5 + 2 + 1 + 2
    assert naive["rows"] == 16 and naive["rank_batches"] == 3
    for key, value in naive.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_recorder_keeps_no_rows_with_tokens_zero():
    got, naive = replay([[PREFILL] * 4, [DECODE], [DECODE]], tokens=0, rank_batch=0)
    assert got["rows"] == 0 and got["rank_batches"] == 0 and got["consecutive_pairs"] == 1
    assert got == pytest.approx(naive)


def test_arm_body_is_checked():
    assert analysis.check_arm_body({"tokens": 64, "rank_batch": 16}) == (64, 16)
    assert analysis.check_arm_body({"tokens": 64}) == (64, 64)
    assert analysis.check_arm_body({"tokens": 0, "rank_batch": 7}) == (0, 0)
    for body, field in [({"tokens": -1}, "tokens"), ({"tokens": 1.5}, "tokens"),
                        ({"tokens": True}, "tokens"), ({"tokens": 10 ** 9}, "tokens"),
                        ({"tokens": 8, "rank_batch": 9}, "rank_batch"),
                        ({"tokens": 8, "rank_batch": 1}, "rank_batch"),
                        ({"rank_batch": 8}, "body"), ({"tokens": 8, "p": 1}, "body"), ([], "body")]:
        with pytest.raises(ValueError, match=field):
            analysis.check_arm_body(body)


def fake_state(split: bool = False):
    """A RuntimeState stand-in with two sites of one layer, one of them a sparse_site.Site-like object,
    and a routed experts' site (``sparse_moe.ExpertSite``-like: per-expert counters)."""
    linear = types.SimpleNamespace(quant_method=types.SimpleNamespace(
        observer=None, layer_index=0, site="input", all_reduce=(lambda t: t) if split else None))
    act = types.SimpleNamespace(observer=None, layer_index=0, site="gate", all_reduce=None)
    experts = types.SimpleNamespace(observer=None, layer_index=1, site="input", all_reduce=None,
                                    sparsity_expert_stats=torch.zeros(4, 2, dtype=torch.int64))
    return types.SimpleNamespace(layers=[("mlp.gate_up_proj", linear), ("mlp.act_fn.gate", act),
                                         ("mlp.experts.routed_experts.input", experts)],
                                 phase=torch.full((8,), DECODE, dtype=torch.int64), analysis=None,
                                 analysis_job=None)


def fetch_done(state, timeout_s: float = 60.0):
    """``analysis.fetch`` asked again until the worker's background computation has finished."""
    deadline = time.monotonic() + timeout_s
    reply = analysis.fetch(state)
    while analysis.is_pending(reply):
        assert time.monotonic() < deadline, "analysis still computing"
        time.sleep(0.01)
        reply = analysis.fetch(state)
    return reply


def test_arm_refuses_a_compiled_model_and_split_sites():
    state = fake_state()
    reply = analysis.arm(state, 8, 4, "the model is compiled (compilation mode VLLM_COMPILE)")
    assert "--enforce-eager" in reply["error"] and "compiled" in reply["error"]
    assert state.layers[0][1].quant_method.observer is None
    assert "tensor parallelism" in analysis.arm(fake_state(split=True), 8, 4, None)["error"]


def test_arm_fetch_and_merge():
    state = fake_state()
    assert analysis.fetch(state) is None  # nothing armed
    assert analysis.arm(state, 4, 2, None) == {"sites": 2}  # not the routed experts' site
    assert state.layers[2][1].observer is None
    linear, act = state.layers[0][1].quant_method.observer, state.layers[1][1].observer
    x = torch.arange(12.0).view(1, 12)
    for mask in ([True] * 6 + [False] * 6, [True] * 3 + [False] * 9):
        linear(x, torch.tensor([mask]))
    act(x[:, :4], torch.tensor([[True, False, False, False]]))
    reply = fetch_done(state)
    assert analysis.fetch(state) is None  # the results were handed over once
    assert state.layers[0][1].quant_method.observer is None and state.analysis is None
    merged = analysis.merge([None, reply, reply])  # two workers with the same numbers: summed
    first, second = merged["layers"]
    assert (first["site"], first["dim"], first["zeroed"], first["total"]) == ("input", 12, 30, 48)
    assert first["sparsity"] == 30 / 48
    assert first["consecutive_pairs"] == 2 and first["consecutive_jaccard"] == 0.5  # {0,1,2}/{..5}
    assert (second["site"], second["consecutive_jaccard"], second["effective_rank"]) == \
        ("gate", None, None)
    with pytest.raises(ValueError, match="POST /v1/sparsity/analysis first"):
        analysis.merge([None])


def test_layer_deltas():
    before = {"layers": [{"layer": 0, "site": "input", "zeroed": 5, "total": 10},
                         {"layer": 0, "site": "gate", "zeroed": 1, "total": 4}]}
    after = {"layers": [{"layer": 0, "site": "input", "zeroed": 12, "total": 30},
                        {"layer": 0, "site": "gate", "zeroed": 1, "total": 8}]}
    assert layer_deltas(before, after) == {(0, "input"): (7, 20), (0, "gate"): (0, 4)}
    # A dense MLP and routed experts at one layer and site: one row of their sums.
    before["layers"].append({"layer": 0, "site": "input", "zeroed": 2, "total": 2})
    after["layers"].append({"layer": 0, "site": "input", "zeroed": 3, "total": 12})
    assert layer_deltas(before, after) == {(0, "input"): (8, 30), (0, "gate"): (0, 4)}


def test_expert_rows_per_expert_sparsity_between_two_answers():
    def answer(zeroed, total):
        return {"experts": [{"layer": 2, "site": "intermediate", "name": "mlp.experts",
                             "zeroed": zeroed, "total": total, "split": False}]}

    rows = expert_rows(answer([1, 0, 5], [10, 0, 20]), answer([4, 0, 11], [20, 0, 30]))
    assert rows == [{"layer": 2, "site": "intermediate", "experts": 3, "experts_seen": 2,
                     "min": 3 / 10, "mean": (3 / 10 + 6 / 10) / 2, "max": 6 / 10,
                     "sparsity": [3 / 10, None, 6 / 10]}]
    assert expert_rows({"layers": []}, {"layers": []}) == []  # a dense model


def test_eager_only_reason_reads_vllm_modes():
    from vllm.config import CompilationMode, CUDAGraphMode

    from vllm_sparsity._vllm_compat import eager_only_reason

    def config(mode, graphs):
        return types.SimpleNamespace(compilation_config=types.SimpleNamespace(
            mode=mode, cudagraph_mode=graphs))

    assert eager_only_reason(config(CompilationMode.NONE, CUDAGraphMode.NONE)) is None
    assert "compiled" in eager_only_reason(config(CompilationMode.VLLM_COMPILE,
                                                  CUDAGraphMode.NONE))
    assert "CUDA graphs" in eager_only_reason(config(CompilationMode.NONE,
                                                     CUDAGraphMode.FULL_AND_PIECEWISE))


def test_the_seam_hands_an_armed_recorder_the_rule_mask_and_compiles_without_one():
    from layers import make_layer, sparse

    from reference import paper_top_p_mask

    K, N, p = 96, 16, 0.6
    layer = make_layer(K, N, seed=2)
    state = sparse(layer, p, max_tokens=16)  # every token prefill
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, K, generator=g) * torch.rand(K, generator=g) ** 3).to(torch.bfloat16)
    off = layer.quant_method.apply(layer, x)
    # Off: the seam traces into one graph (an armed recorder's host syncs would break it).
    compiled = torch.compile(lambda x: layer.quant_method.apply(layer, x), backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(x), off)
    assert analysis.arm(state, 4, 2, None) == {"sites": 1}
    assert torch.equal(layer.quant_method.apply(layer, x), off)  # recording changes no output
    result = fetch_done(state)["sites"][0][3]
    mask = paper_top_p_mask(x.float(), p)
    assert (result["zeroed"], result["total"], result["rows"]) == (int((~mask).sum()), 5 * K, 4)


def test_plot_of_a_model_with_only_routed_experts(tmp_path):
    import matplotlib  # noqa: F401  (the eval extra)
    before = {"experts": [{"layer": layer, "site": "input", "name": f"l{layer}", "split": False,
                           "zeroed": [0, 0], "total": [0, 0]} for layer in (0, 1)]}
    after = {"experts": [{"layer": layer, "site": "input", "name": f"l{layer}", "split": False,
                          "zeroed": [3, 5], "total": [10, 10]} for layer in (0, 1)]}
    result = {"sites": {"input": {"points": [{"p": 0.9, "target": "input", "layers": []}]}},
              "moe_experts": {"points": [{"p": 0.9, "target": "input",
                                          "layers": expert_rows(before, after)}]}}
    assert [f.name for f in plot(result, tmp_path)] == ["experts.png"]
    assert (tmp_path / "experts.png").stat().st_size > 1000


def test_fetch_computes_off_the_callers_thread_and_answers_pending_meanwhile(monkeypatch):
    """The worker RPC must return at once (the engine loop waits on it): the effective ranks are
    computed in a thread of their own, and every fetch until then answers PENDING."""
    release, started = threading.Event(), threading.Event()
    real = analysis.SiteRecorder.result

    def slow_result(self, rank_batch):
        started.set()
        assert release.wait(30)
        return real(self, rank_batch)

    monkeypatch.setattr(analysis.SiteRecorder, "result", slow_result)
    state = fake_state()
    analysis.arm(state, 4, 2, None)
    state.layers[0][1].quant_method.observer(torch.ones(2, 6), torch.ones(2, 6, dtype=torch.bool))
    t0 = time.monotonic()
    assert analysis.is_pending(analysis.fetch(state))
    assert started.wait(30)
    assert analysis.is_pending(analysis.fetch(state))  # still computing: asked again, same answer
    assert time.monotonic() - t0 < 5 and state.analysis is None  # disarmed at the first call
    release.set()
    reply = fetch_done(state)
    assert [row[:2] for row in reply["sites"]] == [[0, "input"], [0, "gate"]]
    assert reply["sites"][0][3]["total"] == 12
    analysis.arm(state, 4, 2, None)  # armed, then disarmed: nothing is left to fetch
    assert analysis.disarm(state) is not None and analysis.fetch(state) is None
