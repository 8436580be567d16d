"""The CPU backend under tensor parallelism: ``down_proj``'s input and weight split over K between
two gloo processes (uneven shards), the torch rule's histograms all-reduced across them, then the
sparse GEMV (up to the crossover) or the dense GEMM. Against the unsharded rule
(``rule.top_p_mask`` on the whole rows): each rank keeps exactly its slice of the whole rows' kept
set, and its partial product is that slice times its weight columns within fp32 accumulation
(``gemv_reference``). The ranks' crossovers differ (the override per rank) and ``prepare`` agrees
on the least; speed mode past it calls no all-reduce and runs the dense GEMM on x as it is."""

import os
import types

import pytest
import torch
import torch.distributed as dist
from gemv_reference import assert_close_to_ref, ref_sparse_gemv
from gloo_ranks import run_ranks
from kernel_inputs import activations, ptensor, with_edge_rows

from vllm_sparsity.kernels import cpu_backend, crossover
from vllm_sparsity.rule import top_p_mask

ISA, NO_ISA = cpu_backend.select_isa()
if NO_ISA is not None:  # a machine without the instruction set: nothing here can run
    pytest.skip(f"cpu kernels unavailable here: {NO_ISA}", allow_module_level=True)
BUILD_FAILED = cpu_backend._load()

K, N, SPLIT, P = 301, 137, 130, 0.6  # shards of 130 and 171 inputs
M_MAX = 4  # rank 0's crossover; rank 1's is M_MAX + 2, and both must run at M_MAX
MS = (1, M_MAX, M_MAX + 3)  # sparse GEMV (one row, the four edge rows), dense GEMM
DTYPES = (torch.bfloat16, torch.float32)
SHARDS = (slice(0, SPLIT), slice(SPLIT, K))


def rows(m, dtype):
    """[m, K]: the edge rows of ``with_edge_rows`` (zero, NaN, outlier, tie) first, then random
    ones; a random row alone for m = 1."""
    x = with_edge_rows(activations(8, K, torch.float32, seed=5))
    return (x[4:5] if m == 1 else x[:m]).to(dtype)


def weight(dtype):
    return (torch.randn(N, K, generator=torch.Generator().manual_seed(2)) * K**-0.5).to(dtype)


class _KeepWeights:
    """An inner linear method that leaves the weight as it is (dense GEMM: ``F.linear``)."""

    def process_weights_after_loading(self, layer):
        pass


def _shard_on_rank(rank, world_size):
    """One rank: its shard of each layer, prepared with the gloo all-reduce as the layer's hook;
    the backend's outputs in both modes and the hook's calls per call."""
    os.environ[crossover.ENV] = str(M_MAX + 2 * rank)
    cols = SHARDS[rank]
    calls = []

    def all_reduce(t):
        calls.append(tuple(t.shape))
        dist.all_reduce(t)

    out = {}
    for dtype in DTYPES:
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(weight(dtype)[:, cols].contiguous(), requires_grad=False)
        layer.quant_method = types.SimpleNamespace(all_reduce=all_reduce, inner=_KeepWeights())
        cpu_backend.prepare(layer)
        out[str(dtype), "crossover"] = cpu_backend.crossover_of(layer)
        for mode in ("exact", "speed"):
            for m in MS:
                x = rows(m, dtype)[:, cols].contiguous()
                calls.clear()
                y, kept, read = cpu_backend.apply_counted(layer, x, ptensor(P), None, all_reduce,
                                                          mode)
                out[str(dtype), mode, m] = (y, kept, read, len(calls))
        out[str(dtype), "dense"] = cpu_backend._DENSE[layer.sparsity_dense_id](
            rows(MS[-1], dtype)[:, cols].contiguous(), None)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if BUILD_FAILED is not None:
        pytest.fail(f"the {ISA} build failed on a CPU that has its instruction set: "
                    f"{BUILD_FAILED}", pytrace=False)
    return run_ranks(_shard_on_rank, 2, tmp_path_factory.mktemp("ranks"))


def assert_within_accumulation(y, x, w, mask):
    """y (bf16: also one rounding to bf16; fp32: the accumulator itself) within fp32
    accumulation of the float64 product of x's kept entries and w."""
    ref, mag = ref_sparse_gemv(x, None, w, mask=mask)
    if y.dtype != torch.float32:
        assert_close_to_ref(y, ref, mag, x.shape[1])
        return
    finite = ref.isfinite()
    assert torch.equal(y.isnan(), ref.isnan())
    bound = (x.shape[1] + 1) * 2.0**-24 * mag + 2.0**-126
    assert ((y.double() - ref).abs()[finite] <= bound[finite]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_each_rank_keeps_its_slice_of_the_unsharded_rule(ranks, dtype, m):
    x, w = rows(m, dtype), weight(dtype)
    full = top_p_mask(x, ptensor(P))  # the unsharded rule
    per_shard = []
    for out, cols in zip(ranks, SHARDS):
        assert out[str(dtype), "crossover"]["m_max"] == M_MAX  # the least of the two ranks'
        y, kept, read, reduces = out[str(dtype), "exact", m]
        assert torch.equal(kept, full[:, cols].sum(-1))
        shard_k = cols.stop - cols.start
        assert read.tolist() == [int(full[:, cols].any(0).sum()) if m <= M_MAX else shard_k]
        assert reduces == (2 if dtype == torch.bfloat16 else 4)  # one per radix level
        assert_within_accumulation(y, x[:, cols], w[:, cols], full[:, cols])
        per_shard.append(top_p_mask(x[:, cols].contiguous(), ptensor(P)))
    if m > 1:  # the test can fail: each shard's own rule keeps another set
        assert not torch.equal(torch.cat(per_shard, 1), full)


@pytest.mark.parametrize("dtype", DTYPES)
def test_speed_mode_skips_the_rule_and_its_all_reduces_past_the_crossover(ranks, dtype):
    for out, cols in zip(ranks, SHARDS):
        shard_k = cols.stop - cols.start
        for m in MS:
            y, kept, read, reduces = out[str(dtype), "speed", m]
            exact = out[str(dtype), "exact", m]
            if m <= M_MAX:  # the rule as in exact mode
                assert torch.equal(kept, exact[1]) and reduces == exact[3]
                torch.testing.assert_close(y, exact[0], rtol=0, atol=0, equal_nan=True)
                continue
            assert reduces == 0 and kept.tolist() == [shard_k] * m and read.tolist() == [shard_k]
            torch.testing.assert_close(y, out[str(dtype), "dense"], rtol=0, atol=0, equal_nan=True)
            x = rows(m, dtype)[:, cols]
            assert_within_accumulation(y, x, weight(dtype)[:, cols], torch.ones_like(x, dtype=bool))


def test_sharded_path_survives_torch_compile(monkeypatch):
    """One traced graph keeps the batch branch and calls the hook at run time, inside the op. The
    hook doubles every histogram, as if two ranks held the same shard: the global rule of [x, x]
    keeps what x's own rule keeps."""
    if BUILD_FAILED is not None:
        pytest.fail(f"the {ISA} build failed: {BUILD_FAILED}", pytrace=False)
    monkeypatch.setenv(crossover.ENV, str(M_MAX))
    calls = []

    def doubling(t):
        calls.append(1)
        t.mul_(2)

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight(torch.bfloat16), requires_grad=False)
    layer.quant_method = types.SimpleNamespace(all_reduce=doubling, inner=_KeepWeights())
    cpu_backend.prepare(layer)
    p = ptensor(P)
    compiled = torch.compile(lambda x: cpu_backend.apply_counted(layer, x, p, None, doubling),
                             backend="aot_eager", fullgraph=True, dynamic=True)
    for m in (2, M_MAX + 3, 3):
        x = rows(m, torch.bfloat16)
        calls.clear()
        y, kept, read = compiled(x)
        mask = top_p_mask(x, p)
        assert torch.equal(kept, mask.sum(-1)) and len(calls) == 2
        assert read.tolist() == [int(mask.any(0).sum()) if m <= M_MAX else K]
        assert_within_accumulation(y, x, weight(torch.bfloat16), mask)
