"""The CPU kernels (kernels/cpu/input_sparse_gemv.cpp, kernels/cpu_backend.py) against the torch rule
(vllm_sparsity.rule, the paper's kept set) and a float64 matmul of the masked input.

Tolerances (gemv_reference.py): bf16/fp16 products are exact in fp32, so the kernel errs only by
fp32 accumulation in its own order (at most (K + 1) * 2^-24 of sum |x w| + |bias|) and by rounding
to the output dtype (one ulp allowed). fp32: the products are fused into the sums (FMA), the
output is the fp32 accumulator itself, so only the accumulation bound applies.
"""

import os
import subprocess
import sys

import pytest
import torch
from gemv_reference import assert_close_to_ref, ref_sparse_gemv
from kernel_inputs import activations, ptensor, with_edge_rows
from reference import paper_top_p_mask

from vllm_sparsity.kernels import cpu_backend, crossover
from vllm_sparsity.rule import top_p_mask, top_p_sparsify, top_p_threshold

ISA, NO_ISA = cpu_backend.select_isa()
if NO_ISA is not None:  # a machine without the instruction set: nothing here can run
    pytest.skip(f"cpu kernels unavailable here: {NO_ISA}", allow_module_level=True)
BUILD_FAILED = cpu_backend._load()  # builds the extension on first use (cached)


@pytest.fixture(autouse=True)
def _built():
    """On a CPU that has the instruction set, a failed build fails every test here."""
    if BUILD_FAILED is not None:
        pytest.fail(f"the {ISA} build failed on a CPU that has its instruction set: "
                    f"{BUILD_FAILED}", pytrace=False)

ops = torch.ops.vllm_sparsity
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# The layers' crossover, fixed (crossover.ENV) so that both batch paths are tested whatever this
# CPU would measure; the measured crossover has its own tests (test_crossover.py).
M_MAX = 8


@pytest.fixture(autouse=True)
def fixed_crossover(monkeypatch):
    monkeypatch.setenv(crossover.ENV, str(M_MAX))


K, N = 301, 137  # odd: not a multiple of the vector width (8 or 16) nor of the group of 8 rows


def edge_batch(m, k, dtype, seed):
    """[m, k]: random rows, then (from row 4 on, m >= 6) the edge rows of ``with_edge_rows`` (zero,
    NaN, outlier, tie) and a row with +Inf and -Inf, spread over the batch."""
    x = with_edge_rows(activations(max(m, 6), k, dtype, seed=seed).float())
    x[4, 3], x[4, 7] = float("inf"), float("-inf")
    x = x[[5, 0, 1, 2, 3, 4]] if m == 6 else torch.cat([x[5:], x[[0, 1, 2, 3, 4]]])
    return x[:m].to(dtype)


def weights(dtype, n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5
    return w.to(dtype), torch.randn(n, generator=g).to(dtype)


def assert_close(y, x, p, w, bias, mask=None):
    ref, mag = ref_sparse_gemv(x, p, w, bias, mask)
    inf = ref.isinf()  # an Inf input reaches the output as the dense product does
    assert torch.equal(y.double()[inf], ref[inf])
    if y.dtype == torch.float32:
        bound = (x.shape[1] + 1) * 2.0**-24 * mag + 2.0**-126
        finite = ref.isfinite()
        assert torch.equal(y.isnan(), ref.isnan())
        assert ((y.double() - ref).abs()[finite] <= bound[finite]).all()
    else:
        assert_close_to_ref(y, ref, mag, x.shape[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.999, 1.0])
def test_threshold_is_the_torch_rule_bit_for_bit(dtype, p):
    x = edge_batch(12, K, dtype, seed=1)
    t = ops.cpu_top_p_threshold(x, ptensor(p))
    ref = top_p_threshold(x, ptensor(p))
    assert t.shape == (12, 1) and t.dtype == dtype
    int_view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(t.view(int_view), ref.view(int_view))  # NaN rows: the same NaN bits
    assert torch.equal((x.abs() >= t) | t.isnan(), top_p_mask(x, ptensor(p)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsify_is_the_torch_rule(dtype):
    x = edge_batch(40, K, dtype, seed=2)
    xs, kept = ops.cpu_top_p_sparsify(x, ptensor(0.7))
    ref_xs, ref_kept = top_p_sparsify(x, ptensor(0.7))
    int_view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(xs.view(int_view), ref_xs.view(int_view))
    assert torch.equal(kept, ref_kept)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.3, 0.5, 0.9, 1.0])
def test_gemv_every_decode_batch(dtype, p):
    w, b = weights(dtype)
    wt = w.t().contiguous()
    x = edge_batch(M_MAX, K, dtype, seed=3)
    for m in range(1, M_MAX + 1):  # per-row masks; the union of W rows read grows with m
        y, kept, rows_read = ops.cpu_input_sparse_gemv(x[:m], ptensor(p), wt, b)
        mask = top_p_mask(x[:m], ptensor(p))
        assert y.shape == (m, N) and y.dtype == dtype
        assert torch.equal(kept, mask.sum(-1))
        assert rows_read.tolist() == [int(mask.any(0).sum())]
        assert_close(y, x[:m], p, w, b)


@pytest.mark.parametrize("m", [1, 3, M_MAX])
def test_gemv_many_chunks_and_groups(m):
    # N spans several column chunks per thread (chunks of at most 8192 / m columns) with a ragged
    # last one; K leaves kept rows outside the groups of 8 (padded with zero rows).
    k, n = 1031, 4099
    w, _ = weights(torch.bfloat16, n=n, k=k, seed=4)
    x = activations(m, k, torch.bfloat16, seed=5)
    y, _, _ = ops.cpu_input_sparse_gemv(x, ptensor(0.6), w.t().contiguous(), None)
    assert_close(y, x, 0.6, w, None)


# Odd shapes: fewer rows than one group of 8 and columns than one vector; neither a multiple of the
# group nor of the vector width (8 or 16); more columns than one accumulator chunk (8192 / M).
ODD_SHAPES = [(5, 3), (301, 137), (1031, 8209)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, n", ODD_SHAPES)
def test_gemv_numerics_every_row_count(dtype, k, n):
    # M = 1 .. 16 (the kernel's limit; 1, 3, 16 on the large shape), with the edge rows (all zero, NaN, outlier, tie, +-Inf)
    # first, last, or absent; a bias; p < 1 and p = 1.
    w, b = weights(dtype, n=n, k=k, seed=9)
    wt = w.t().contiguous()
    x = edge_batch(16, max(k, 8), dtype, seed=10)[:, :k].contiguous()  # keeps NaN and +Inf
    assert int(ops.cpu_input_sparse_gemv_max_rows()) == 16
    for p in (0.6, 1.0):
        for m in (range(1, 17) if k * n < 10**6 else (1, 3, 16)):
            for rows in (x[:m], x[-m:]):  # edge rows at the end of the batch / at its start
                y, kept, rows_read = ops.cpu_input_sparse_gemv(rows, ptensor(p), wt, b)
                mask = top_p_mask(rows, ptensor(p))
                assert y.shape == (m, n) and y.dtype == dtype
                assert torch.equal(kept, mask.sum(-1))
                assert rows_read.tolist() == [int(mask.any(0).sum())]
                assert_close(y, rows, p, w, b)


def test_the_other_build_too(tmp_path, monkeypatch):
    # Both builds this CPU can run: this process loaded one (torch ops of the same names cannot be
    # loaded twice), a child process runs the numerics above on the other.
    other = {"avx512": "avx2", "avx2": "avx512"}[ISA]
    monkeypatch.setenv(cpu_backend.ISA_ENV, other)
    _, reason = cpu_backend.select_isa()
    if reason is not None:
        pytest.skip(f"cpu kernels unavailable here: {reason}")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         __file__, "-k", "numerics or disjoint", f"--basetemp={tmp_path / 'child'}"],
        env={**os.environ, cpu_backend.ISA_ENV: other}, capture_output=True, text=True,
        timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]


def test_rows_with_disjoint_masks_do_not_leak():
    # Row 0 keeps only input 0, row 1 only input 1: both W rows are read, each output row must see
    # only its own input.
    x = torch.zeros(2, 16, dtype=torch.bfloat16)
    x[0, 0], x[1, 1] = 2.0, 3.0
    x[0, 1], x[1, 0] = 0.001, 0.001  # dropped at p = 0.9
    w = (torch.arange(16 * 40) % 32).reshape(40, 16).to(torch.bfloat16)  # products exact in bf16
    y, kept, rows_read = ops.cpu_input_sparse_gemv(x, ptensor(0.9), w.t().contiguous(), None)
    assert torch.equal(y.float(), torch.stack([2.0 * w[:, 0].float(), 3.0 * w[:, 1].float()]))
    assert kept.tolist() == [1, 1] and rows_read.tolist() == [2]


def test_p_one_equals_dense():
    w, b = weights(torch.bfloat16)
    x = activations(4, K, torch.bfloat16, seed=6)
    y, kept, _ = ops.cpu_input_sparse_gemv(x, ptensor(1.0), w.t().contiguous(), b)
    assert torch.equal(kept, (x != 0).sum(-1))
    dense = x.double() @ w.double().t() + b.double()
    assert_close_to_ref(y, dense, x.double().abs() @ w.double().abs().t() + b.double().abs(), K)


def test_bad_arguments_are_named():
    x = activations(2, K, torch.bfloat16)
    wt = weights(torch.bfloat16)[0].t().contiguous()
    with pytest.raises(RuntimeError, match="p must be a float64"):
        ops.cpu_input_sparse_gemv(x, torch.tensor([0.5]), wt, None)
    with pytest.raises(RuntimeError, match="wt must be a contiguous K-major"):
        ops.cpu_input_sparse_gemv(x, ptensor(0.5), wt.t(), None)
    with pytest.raises(RuntimeError, match="x has 17 rows"):
        ops.cpu_input_sparse_gemv(activations(17, K, torch.bfloat16), ptensor(0.5), wt, None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kmajor_weight_is_the_transpose_in_2mib_aligned_memory(dtype):
    w, _ = weights(dtype, n=N, k=K)
    wt = ops.cpu_kmajor_weight(w[:, 1:])  # a strided view: the copy reads it through its strides
    assert wt.dtype == dtype and wt.shape == (K - 1, N) and wt.is_contiguous()
    assert torch.equal(wt, w[:, 1:].t())
    assert wt.data_ptr() % (2 << 20) == 0  # huge-page aligned, what madvise needs
    with pytest.raises(RuntimeError, match=r"w must be a dense 2-D weight \[N, K\]"):
        ops.cpu_kmajor_weight(w[0])
    with pytest.raises(RuntimeError, match=r"cpu_kmajor_weight.*SparseCPU"):  # the dispatcher
        ops.cpu_kmajor_weight(w.to_sparse())


def prepared_layer(dtype, n=N, k=K):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    layer = torch.nn.Module()
    w, _ = weights(dtype, n=n, k=k)
    layer.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    cpu_backend.prepare(layer, UnquantizedLinearMethod())
    return layer, w


@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_both_batch_paths(dtype):
    layer, w = prepared_layer(dtype)
    # The K-major copy, beside vLLM's own dense weight (packed, or plain [N, K] for its fallback).
    assert layer.sparsity_wt.shape == (K, N) and layer.sparsity_wt.is_contiguous()
    assert torch.equal(layer.sparsity_wt, w.t()) and layer.sparsity_wt.data_ptr() % (2 << 20) == 0
    assert layer.weight.numel() == 0 or layer.weight.stride() == (K, 1)
    x = edge_batch(M_MAX + 3, K, dtype, seed=7)
    for m in (1, M_MAX, M_MAX + 1, M_MAX + 3):  # sparse GEMV, then the rule + vLLM's dense GEMM
        y, kept, rows_read = cpu_backend.apply_counted(layer, x[:m], ptensor(0.5))
        mask = top_p_mask(x[:m], ptensor(0.5))
        assert torch.equal(kept, mask.sum(-1))
        assert rows_read.tolist() == [int(mask.any(0).sum()) if m <= M_MAX else K]
        assert_close(y, x[:m], 0.5, w, None)


def test_backend_under_torch_compile():
    # The batch branch is taken inside the op at run time: one compiled graph serves both paths.
    layer, w = prepared_layer(torch.bfloat16)
    p = ptensor(0.5)

    @torch.compile(fullgraph=True, dynamic=True)
    def f(x):
        return cpu_backend.apply_counted(layer, x, p)

    x = activations(M_MAX + 2, K, torch.bfloat16, seed=8)
    for m in (1, M_MAX + 2, 2):
        y, kept, rows_read = f(x[:m])
        assert torch.equal(kept, top_p_mask(x[:m], p).sum(-1))
        assert rows_read.tolist()[0] < K if m <= M_MAX else rows_read.tolist() == [K]
        assert_close(y, x[:m], 0.5, w, None)
    p.fill_(0.9)  # changed in place: read inside the op, no recompile needed
    y, kept, _ = f(x[:1])
    assert torch.equal(kept, top_p_mask(x[:1], p).sum(-1))


PER_ROW_P = [0.5, 0.9, 1.0, 0.3, 0.7, 0.5, 0.99, 0.1, 0.8, 0.6, 0.95, 0.4]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 12])
def test_per_row_p_is_each_rows_sort_rule(dtype, m):
    # Per-request p: p float64 [M, 1] (the per-token buffer's slice); each row at its own p must be
    # the paper's sort rule, in all three ops (12 rows: past M_MAX's sparse GEMV too).
    x = edge_batch(m, K, dtype, seed=4)
    ps = PER_ROW_P[:m]
    p = torch.tensor(ps, dtype=torch.float64)[:, None]
    rows = torch.stack([paper_top_p_mask(x[i:i + 1], pi)[0] for i, pi in enumerate(ps)])
    t = ops.cpu_top_p_threshold(x, p)
    assert torch.equal((x.abs() >= t) | t.isnan(), rows)
    xs, kept = ops.cpu_top_p_sparsify(x, p)
    assert torch.equal(kept, rows.sum(-1))
    assert torch.equal(xs != 0, rows & (x != 0))
    if m <= M_MAX:
        w, bias = weights(dtype)
        y, kept, _ = ops.cpu_input_sparse_gemv(x, p, w.t().contiguous(), bias)
        assert torch.equal(kept, rows.sum(-1))
        assert_close(y, x, p, w, bias, rows)


def test_per_row_p_of_the_wrong_length_is_refused():
    x = activations(4, K, torch.bfloat16)
    with pytest.raises(RuntimeError, match="one element or be contiguous"):
        ops.cpu_top_p_threshold(x, torch.full((3, 1), 0.5, dtype=torch.float64))


def _make_kernels(tmp_path, **env):
    """``make kernels``'s command in a fresh cache (its own build folder), with ``env`` added."""
    full = {**os.environ, "VLLM_SPARSITY_CACHE": str(tmp_path), **env}
    return subprocess.run([sys.executable, "-m", "vllm_sparsity.kernels.cpu_backend"],
                          capture_output=True, text=True, env=full, timeout=600)


def test_make_kernels_fails_when_the_build_fails(tmp_path):
    proc = _make_kernels(tmp_path, CXX="false")  # a compiler that fails every command
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert f"the {ISA} build failed on a CPU that has its instruction set" in proc.stderr


def test_make_kernels_passes_on_a_cpu_without_the_instruction_set(tmp_path):
    # torch's capability lowered to DEFAULT: no build fits; the torch backend serves.
    proc = _make_kernels(tmp_path, ATEN_CPU_CAPABILITY="default", CXX="false")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "unavailable (the torch backend serves)" in proc.stdout
