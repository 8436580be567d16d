"""The activation counters: the seam's device counts against independent references (the paper's
sort rule, exact fractions), the token phases, and the one merge of the workers' snapshots that
both the /v1/sparsity route and /metrics read."""

from __future__ import annotations

import pytest
import torch
from layers import expected_stats, make_layer, sparse

from vllm_sparsity import counters
from vllm_sparsity.clock import LATENCY_BUCKETS_S
from vllm_sparsity.counters import COLS_READ, DECODE, HIST, PAD, PREFILL, TOTAL, ZEROED


def sparse_layer(K, N, phases, batch_phase, p=0.7, metrics=True):
    layer = make_layer(K, N, seed=1)
    state = sparse(layer, p, metrics=metrics, max_tokens=len(phases) + 64)
    state.phase[:len(phases)] = torch.tensor(phases)
    state.phase[len(phases):] = PAD
    state.batch_phase.fill_(batch_phase)
    return layer


def varied_rows(M, K, seed):
    """Rows whose sparsity under the rule spreads over many buckets: heavier tails per row, and
    exact zeros in some."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for m in range(M):
        row = torch.randn(K, generator=g) * torch.rand(K, generator=g).pow(1 + 3 * m / M)
        row[torch.rand(K, generator=g) < 0.1 * (m % 3)] = 0
        rows.append(row)
    return torch.stack(rows).to(torch.bfloat16)


def test_seam_counts_per_token_phase_and_histogram():
    K, N, p = 200, 24, 0.7  # K = 200: bucket edges fall on whole counts of zeroed inputs
    phases = [PREFILL] * 9 + [DECODE] * 4 + [PAD] * 3
    x = varied_rows(len(phases), K, seed=5)
    layer = sparse_layer(K, N, phases, DECODE, p=p)
    layer.quant_method.apply(layer, x)
    want = expected_stats(x, p, phases, DECODE, K)  # torch backend: dense GEMM reads all K
    assert len(set(want[PREFILL, HIST:COLS_READ].nonzero().flatten().tolist())) > 3
    assert torch.equal(layer.sparsity_stats, want)
    # The route's counters: prefill + decode, padding left out.
    assert counters.zeroed_total(layer.sparsity_stats).tolist() == want[:PAD, :2].sum(0).tolist()


def test_without_metrics_the_seam_keeps_only_the_route_counters():
    K, N, p = 200, 24, 0.7
    phases = [PREFILL] * 5 + [DECODE] * 2 + [PAD] * 2
    x = varied_rows(len(phases), K, seed=6)
    layer = sparse_layer(K, N, phases, DECODE, p=p, metrics=False)
    layer.quant_method.apply(layer, x)
    want = expected_stats(x, p, phases, DECODE, K)
    assert torch.equal(layer.sparsity_stats[:, :HIST], want[:, :HIST])
    assert layer.sparsity_stats[:, HIST:].sum() == 0


def test_seam_counts_survive_torch_compile_with_a_dynamic_batch():
    K, N, p = 200, 24, 0.6
    phases = [PREFILL, DECODE, DECODE, PREFILL, PAD, DECODE, PREFILL]
    layer = sparse_layer(K, N, phases, PREFILL, p=p)
    compiled = torch.compile(lambda x: layer.quant_method.apply(layer, x), backend="aot_eager",
                             fullgraph=True, dynamic=True)
    xs = [varied_rows(m, K, seed=m) for m in (3, 7)]
    for x in xs:
        compiled(x)
    want = sum(expected_stats(x, p, phases[:len(x)], PREFILL, K) for x in xs)
    assert torch.equal(layer.sparsity_stats, want)


def naive_phases(qsl: list[int], n: int) -> tuple[list[int], int]:
    """Phases by a loop over the requests: decode if its query length is 1, prefill otherwise,
    padding past the last request; the batch's is the least (PREFILL < DECODE < PAD)."""
    phases = [PAD] * n
    for start, end in zip(qsl, qsl[1:]):
        for t in range(start, min(end, n)):
            phases[t] = DECODE if end - start == 1 else PREFILL
    return phases, min(phases + [PAD])


# vLLM's runner buffer [max_num_reqs + 1]: the step's boundaries, then its token count repeated.
@pytest.mark.parametrize("qsl, n", [
    ([0, 5, 6, 7, 7, 7, 7], 9),  # mixed, padded tokens
    ([0, 1, 2, 3, 3, 3], 4),  # decode batch, padded requests
    ([0, 4, 4], 4),
    ([0, 1, 5, 5], 5),
    ([0, 3, 3], 0),  # an empty forward
])
def test_token_phases_from_query_start_loc(qsl, n):
    want, want_batch = naive_phases(qsl, n)
    index = torch.arange(16, dtype=torch.int32)
    got, got_batch = counters.token_phases(torch.tensor(qsl, dtype=torch.int32), index[:n])
    assert got.tolist() == want and got_batch.tolist() == [want_batch]


def site_rows(zeroed, total, read, columns):
    row = [0] * counters.WIDTH
    row[counters.ZEROED], row[counters.TOTAL] = zeroed, total
    row[counters.HIST] = total // 100
    row[counters.COLS_READ], row[counters.COLS_TOTAL] = read, columns
    return [row, [x * 2 for x in row], [7] * counters.WIDTH]  # prefill, decode, padding


def worker(tp_rank, sites, stats, latency=None):
    """A worker's snapshot (``counters.snapshot``); sites rows [layer, site, bytes/column, split]
    (the layer's name is filled in)."""
    return {"settings": {"p": 0.9, "target": "input", "backend": "auto", "rule": "top-p",
                         "q": None, "resolved_backend": "triton", "targets": ["input"],
                         "started_target": "input"},
            "p_by_site": {"input": 0.9}, "tp_rank": tp_rank,
            "sites": [[layer, site, f"layers.{layer}.mlp", per_column, split]
                      for layer, site, per_column, split in sites],
            "stats": stats, "latency": latency}


def test_merge_takes_counts_from_tp_rank_0_and_sums_bytes_over_shards():
    lat = {"counts": [[1] + [0] * len(LATENCY_BUCKETS_S), [0, 2] + [0] * 14][:2],
           "sums": [0.5, 0.25]}
    per_worker = [
        worker(0, [[0, "input", 100, 0]], [site_rows(30, 100, 60, 100)], lat),  # stage 0, TP 0
        worker(1, [[0, "input", 100, 0]], [site_rows(30, 100, 60, 100)], lat),  # stage 0, TP 1
        worker(0, [[1, "input", 100, 0]], [site_rows(50, 100, 80, 100)], lat),  # stage 1, TP 0
        None,
    ]
    merged = counters.merge(per_worker)
    layer0 = merged["sites"][(0, "input")]
    assert layer0["rows"][PREFILL][counters.ZEROED] == 30  # not doubled by the TP replica
    assert layer0["rows"][DECODE][counters.COLS_READ] == 120
    assert layer0["skipped_bytes"] == [2 * 40 * 100, 2 * 80 * 100]  # both shards' bytes
    assert merged["sites"][(1, "input")]["rows"][PREFILL][counters.ZEROED] == 50
    assert merged["latency"]["counts"][PREFILL][0] == 2  # two pipeline stages, TP rank 0 only
    assert merged["latency"]["sums"] == [1.0, 0.5]
    assert counters.merge([None, None]) is None


def test_merge_sums_the_counters_of_an_input_split_over_tp_ranks():
    # down_proj under TP: each rank counts its shard of K for the same tokens.
    per_worker = [worker(0, [[0, "intermediate", 10, 1]], [site_rows(30, 100, 60, 100)]),
                  worker(1, [[0, "intermediate", 10, 1]], [site_rows(40, 120, 70, 120)])]
    rows = counters.merge(per_worker)["sites"][(0, "intermediate")]["rows"]
    for phase, scale in ((PREFILL, 1), (DECODE, 2)):
        assert rows[phase][counters.ZEROED] == scale * (30 + 40)
        assert rows[phase][counters.TOTAL] == scale * (100 + 120)
        assert rows[phase][counters.COLS_READ] == scale * (60 + 70)
        assert rows[phase][counters.COLS_TOTAL] == scale * (100 + 120)
        assert rows[phase][counters.HIST] == scale * (100 // 100)  # rank 0's histogram only


def test_route_and_metrics_read_the_same_merge_of_a_split_input():
    # gate_up_proj's input is replicated (TP rank 0 speaks for it), down_proj's is split (summed).
    per_worker = [
        worker(0, [[0, "input", 10, 0], [0, "intermediate", 10, 1]],
               [site_rows(30, 100, 100, 100), site_rows(30, 100, 100, 100)]),
        worker(1, [[0, "input", 10, 0], [0, "intermediate", 10, 1]],
               [site_rows(30, 100, 100, 100), site_rows(40, 120, 120, 120)]),
        None]
    merged = counters.merge(per_worker)
    rows = counters.route_layers(merged)
    # prefill + decode (decode rows are twice the prefill ones), padding left out
    assert [(r["site"], r["zeroed"], r["total"], r["split"]) for r in rows] == [
        ("input", 3 * 30, 3 * 100, False), ("intermediate", 3 * 70, 3 * 220, True)]
    assert rows[0]["name"] == "layers.0.mlp" and rows[0]["layer"] == 0
    for row in rows:
        entry = merged["sites"][(row["layer"], row["site"])]["rows"]
        assert row["zeroed"] == entry[PREFILL][ZEROED] + entry[DECODE][ZEROED]
        assert row["total"] == entry[PREFILL][TOTAL] + entry[DECODE][TOTAL]
    assert merged["settings"]["target"] == "input"
