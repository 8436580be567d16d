"""The Triton backend behind InputSparseLinearMethod: K-major weight, batch policy, integration."""

import pytest
import torch
import torch.distributed as dist
from kernel_inputs import activations, ptensor, with_edge_rows  # first: interpreter on
from gemv_reference import assert_close_to_ref, ref_sparse_gemv
from gloo_ranks import run_ranks
from layers import PlainLinear, expected_stats, sparse

from reference import paper_top_p_mask
from vllm_sparsity import rule, sparse_linear
from vllm_sparsity.counters import DECODE
from vllm_sparsity.kernels import triton_backend

K, N = 200, 72


def make_layer(dtype=torch.bfloat16, seed=0):
    import layers

    return layers.make_layer(K, N, dtype, seed)


def apply(layer, x, p, bias=None):
    """``(y, kept)`` of the backend's ``apply_counted`` for whole rows."""
    return triton_backend.apply_counted(layer, x, p, bias)[:2]


def test_prepare_stores_one_k_major_copy_behind_the_same_parameter():
    layer = make_layer()
    param, before = layer.weight, layer.weight.detach().clone()
    triton_backend.prepare(layer)
    assert layer.weight is param and param.weight_loader == "loader"
    assert param.shape == (N, K) and param.stride() == (1, N)  # [N, K] view of [K, N] storage
    assert param.untyped_storage().nbytes() == N * K * param.element_size()  # no second copy
    assert torch.equal(param, before)
    assert triton_backend.kmajor_weight(layer).is_contiguous()
    triton_backend.prepare(layer)  # idempotent
    assert param.stride() == (1, N) and torch.equal(param, before)


def test_prepare_refuses_what_the_kernels_cannot_run():
    layer = make_layer(torch.float32)
    assert "float32" in triton_backend.unsupported_reason(layer)
    with pytest.raises(ValueError, match="triton sparsity backend"):
        triton_backend.prepare(layer)
    assert triton_backend.unsupported_reason(make_layer()) is None


@pytest.mark.parametrize("m", [1, triton_backend.M_MAX, triton_backend.M_MAX + 1, 33])
@pytest.mark.parametrize("with_bias", [False, True])
def test_apply_both_sides_of_m_max(m, with_bias):
    layer = make_layer()
    triton_backend.prepare(layer)
    bias = torch.randn(N).to(torch.bfloat16) if with_bias else None
    x = with_edge_rows(activations(max(m, 4), K, torch.bfloat16, seed=m))[:m]
    y, kept = apply(layer, x, ptensor(0.6), bias)
    assert y.shape == (m, N) and y.dtype == torch.bfloat16
    assert torch.equal(kept, rule.top_p_sparsify(x, 0.6)[1])
    assert_close_to_ref(y, *ref_sparse_gemv(x, 0.6, layer.weight.detach(), bias), K)


def test_apply_is_deterministic():
    layer = make_layer()
    triton_backend.prepare(layer)
    x = activations(3, K, torch.bfloat16, seed=9)
    a, _ = apply(layer, x, ptensor(0.5))
    b, _ = apply(layer, x, ptensor(0.5))
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("tokens", [(1, 3), (2, 7)])  # 3 rows: sparse path; 14 rows: dense path
def test_input_sparse_linear_method_triton_matches_torch(tokens):
    """Same layer through both backends of the seam: outputs agree, counters are identical."""
    layers = {}
    for name in ("torch", "triton"):
        layers[name] = make_layer()
        sparse(layers[name], 0.7, backend=name)
    assert layers["triton"].weight.stride() == (1, N)
    bias = torch.randn(N).to(torch.bfloat16)
    x = activations(tokens[0] * tokens[1], K, torch.bfloat16, seed=3).view(*tokens, K)
    out = {n: l.quant_method.apply(l, x, bias) for n, l in layers.items()}
    assert out["triton"].shape == out["torch"].shape == (*tokens, N)
    ref, mag = ref_sparse_gemv(x.view(-1, K), 0.7, layers["torch"].weight.detach(), bias)
    for y in out.values():
        assert_close_to_ref(y.view(-1, N), ref, mag, K)
    assert torch.equal(layers["torch"].sparsity_stats, layers["triton"].sparsity_stats)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        sparse_linear.InputSparseLinearMethod(PlainLinear(), "input", 0, backend="cuda")


@pytest.mark.parametrize("m", [1, 3, 8, 9])
def test_triton_backend_reports_the_weight_columns_it_read(m):
    p = 0.6
    x = activations(m, K, torch.bfloat16, seed=m)
    layer = make_layer()
    state = sparse(layer, p, backend="triton", metrics=True)
    state.phase[:m] = DECODE
    state.batch_phase.fill_(DECODE)
    layer.quant_method.apply(layer, x)
    union = int(paper_top_p_mask(x.float(), p).any(dim=0).sum())
    # Sparse GEMV: the union of the kept inputs; else dense.
    read = union if m <= triton_backend.M_MAX else K
    assert read < K or m > triton_backend.M_MAX
    assert torch.equal(layer.sparsity_stats, expected_stats(x, p, [DECODE] * m, DECODE, read))


def test_branch_on_batch_size_survives_torch_compile():
    """Traced once with a dynamic batch, the op still picks sparse or dense per call: the branch
    runs inside the custom op, not in the graph."""
    layer = make_layer()
    triton_backend.prepare(layer)
    p = ptensor(0.6)
    compiled = torch.compile(lambda x: apply(layer, x, p), backend="aot_eager",
                             fullgraph=True, dynamic=True)
    for m in (2, 12, 5):
        x = activations(m, K, torch.bfloat16, seed=m)
        y, kept = compiled(x)
        assert torch.equal(kept, rule.top_p_sparsify(x, 0.6)[1])
        assert_close_to_ref(y, *ref_sparse_gemv(x, 0.6, layer.weight.detach()), K)


def test_custom_op_registered_with_fake_impl():
    layer = make_layer()
    triton_backend.prepare(layer)
    for m in (2, 10):
        x = activations(m, K, torch.bfloat16)
        torch.library.opcheck(torch.ops.vllm_sparsity.input_sparse_linear,
                              (x, ptensor(0.5), triton_backend.kmajor_weight(layer), None,
                               triton_backend.M_MAX))
        thr = torch.full((m,), 0x3F00, dtype=torch.int32)
        torch.library.opcheck(torch.ops.vllm_sparsity.thresholded_linear,
                              (x, thr, triton_backend.kmajor_weight(layer), None,
                               triton_backend.M_MAX))


# Tensor parallelism: down_proj's K = 200 split into uneven shards of 90 and 110 columns.
TP_SPLIT = 90
TP_MS = (5, 12)  # sparse GEMV path (M <= M_MAX), mask + dense GEMM path


def _tp_rows(m):
    return with_edge_rows(activations(m, K, torch.bfloat16, seed=m))


def _tp_backend_on_rank(rank, world_size):
    """One rank of test_sharded_intermediate_site_applies_the_global_rule: its shard of down_proj
    (the columns of W and of x it holds under TP = 2), all-reduced over the gloo group."""
    cols = slice(0, TP_SPLIT) if rank == 0 else slice(TP_SPLIT, K)
    layer = make_layer(seed=1)
    layer.weight.data = layer.weight.data[:, cols].contiguous()
    triton_backend.prepare(layer)
    return {m: triton_backend.apply_counted(layer, _tp_rows(m)[:, cols].contiguous(), ptensor(0.6),
                                     None, dist.all_reduce) for m in TP_MS}


def test_sharded_intermediate_site_applies_the_global_rule(tmp_path):
    """Two gloo processes, each holding one K-shard of down_proj's input and weight: each rank
    keeps its slice of the whole rows' top-p set, on both sides of M_MAX."""
    ranks = run_ranks(_tp_backend_on_rank, 2, tmp_path)
    w = make_layer(seed=1).weight.detach()
    for m in TP_MS:
        x = _tp_rows(m)
        full = rule.top_p_mask(x, 0.6)
        per_shard = []
        for out, cols in zip(ranks, (slice(0, TP_SPLIT), slice(TP_SPLIT, K))):
            y, kept, columns_read = out[m]
            assert torch.equal(kept, full[:, cols].sum(-1))
            read = full[:, cols].any(0).sum() if m <= triton_backend.M_MAX else x[:, cols].shape[1]
            assert columns_read.tolist() == [read]
            assert_close_to_ref(y, *ref_sparse_gemv(x[:, cols], 0.6, w[:, cols],
                                                    mask=full[:, cols]), cols.stop - cols.start)
            per_shard.append(rule.top_p_mask(x[:, cols], 0.6))
        assert not torch.equal(torch.cat(per_shard, 1), full)  # the per-shard rule differs


def test_sharded_path_survives_torch_compile():
    """The sharded path traces whole (threshold passes and all-reduces in the graph) and keeps the
    batch-size branch. The all-reduce doubles every mass, as if both ranks held the same shard:
    the global rule of [x, x] keeps what x's own rule keeps."""
    layer = make_layer()
    triton_backend.prepare(layer)
    p = ptensor(0.6)

    def sharded(x):
        return triton_backend.apply_counted(layer, x, p, None, lambda t: t.mul_(2))

    compiled = torch.compile(sharded, backend="aot_eager", fullgraph=True, dynamic=True)
    for m in (2, 12, 5):
        x = with_edge_rows(activations(max(m, 4), K, torch.bfloat16, seed=m))[:m]
        y, kept, _ = compiled(x)
        assert torch.equal(kept, rule.top_p_sparsify(x, 0.6)[1])
        assert_close_to_ref(y, *ref_sparse_gemv(x, 0.6, layer.weight.detach()), K)


@pytest.mark.parametrize("m", [3, triton_backend.M_MAX + 1])  # sparse GEMV, then mask + dense GEMM
def test_apply_with_one_p_per_row(m):
    layer = make_layer()
    triton_backend.prepare(layer)
    ps = torch.linspace(0.3, 1.0, m, dtype=torch.float64)
    x = activations(m, K, torch.bfloat16, seed=m)
    y, kept = apply(layer, x, ps[:, None])
    rows = torch.stack([paper_top_p_mask(x[i:i + 1].float(), float(pi))[0]
                        for i, pi in enumerate(ps)])
    assert torch.equal(kept, rows.sum(-1))
    assert_close_to_ref(y, *ref_sparse_gemv(x, None, layer.weight.detach(), None, rows), K)


def test_speed_mode_past_m_max_is_the_dense_gemm_and_the_crossover_is_reported():
    layer = make_layer()
    triton_backend.prepare(layer)
    assert triton_backend.crossover_of(layer) == {
        "m_max": triton_backend.M_MAX, "measured": False,
        "source": "fixed (triton_backend.M_MAX), not yet measured on a GPU"}
    p = ptensor(0.6)
    for m in (triton_backend.M_MAX, triton_backend.M_MAX + 1):
        x = activations(m, K, torch.bfloat16, seed=m)
        exact = triton_backend.apply_counted(layer, x, p, None, None, "exact")
        for all_reduce in (None, lambda t: t.mul_(2)):  # whole rows; two ranks of the same shard
            y, kept, read = triton_backend.apply_counted(layer, x, p, None, all_reduce, "speed")
            if m <= triton_backend.M_MAX:  # the rule, as in exact mode
                assert torch.equal(y, exact[0]) and torch.equal(kept, exact[1])
                continue
            assert torch.equal(y, torch.nn.functional.linear(x, layer.weight))
            assert kept.tolist() == [K] * m and read.tolist() == [K]
            assert not torch.equal(y, exact[0])
