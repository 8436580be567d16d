"""The input-sparse GEMV against a plain-torch reference: the torch rule's masked input times W."""

import pytest
import torch
from kernel_inputs import activations, ptensor, with_edge_rows  # first: interpreter on
from kernel_inputs import launch_config  # noqa: F401  (fixture: both launch configurations)
from gemv_reference import assert_close_to_ref, ref_sparse_gemv

from vllm_sparsity.kernels import common
from vllm_sparsity.kernels import sparse_gemv as sg
from vllm_sparsity.kernels import top_p_threshold as tpt
from vllm_sparsity.rule import top_p_mask

# K and N are not multiples of BLOCK_K (128) and BLOCK_N (64, or 256 under the interpreter's
# launch configuration); K spans 3 K blocks. Tests that take the ``launch_config`` fixture run under
# both configurations (the GPU's: 3 N blocks and a 4-way default split-K on CPU).
K, N = 300, 136


def weights(dtype, n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5
    return w.to(dtype), torch.randn(n, generator=g).to(dtype)


def run(x, p, w, bias=None, split_k=0):
    thr, _ = tpt.top_p_threshold(x, ptensor(p))
    return sg.sparse_gemv(x, thr, w.t().contiguous(), bias, split_k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.9, 1.0])
def test_matches_reference_every_decode_batch(dtype, p, launch_config):
    w, b = weights(dtype)
    x = with_edge_rows(activations(8, K, dtype, seed=1))
    x = x[[4, 0, 5, 1, 6, 2, 7, 3]]  # edge rows (zero, NaN, outlier, tie) spread over the batch
    for m in range(1, 9):  # rows are masked per row; only the union of loaded W rows changes
        y = run(x[:m], p, w, b)
        assert y.shape == (m, N) and y.dtype == dtype
        assert_close_to_ref(y, *ref_sparse_gemv(x[:m], p, w, b), K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_prefill_batch(dtype, launch_config):
    # 33 rows: three M tiles of BLOCK_M = 16, the last one nearly empty.
    w, _ = weights(dtype)
    x = with_edge_rows(activations(33, K, dtype, seed=2))
    assert_close_to_ref(run(x, 0.5, w), *ref_sparse_gemv(x, 0.5, w), K)


@pytest.mark.parametrize("split_k", [1, 2, 3, 0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_split_k_and_bias(split_k, with_bias, launch_config):
    # 0 is the shape-based default (GPU configuration: split 4 ways on CPU, see _num_sms;
    # interpreter's: no split); 3 leaves a short last split.
    w, b = weights(torch.bfloat16, n=70, k=700)
    b = b if with_bias else None
    x = activations(3, 700, torch.bfloat16, seed=3)
    assert_close_to_ref(run(x, 0.7, w, b, split_k), *ref_sparse_gemv(x, 0.7, w, b), 700)


def test_p_one_equals_dense():
    w, b = weights(torch.float16)
    x = activations(4, K, torch.float16, seed=4)
    ref = x.double() @ w.double().t() + b.double()
    assert_close_to_ref(run(x, 1.0, w, b), ref, x.double().abs() @ w.double().abs().t()
                        + b.double().abs(), K)


def test_rows_with_disjoint_masks_do_not_leak():
    # Row 0 keeps only input 0, row 1 only input 1: the union loads both W rows, and each output
    # row must still see only its own input.
    x = torch.zeros(2, 16, dtype=torch.bfloat16)
    x[0, 0], x[1, 1] = 2.0, 3.0
    x[0, 1], x[1, 0] = 0.001, 0.001  # dropped at p = 0.9
    w = torch.arange(16 * 4, dtype=torch.float32).reshape(4, 16).to(torch.bfloat16)
    y = run(x, 0.9, w)
    assert torch.equal(y.float(), torch.stack([2.0 * w[:, 0].float(), 3.0 * w[:, 1].float()]))


@pytest.mark.parametrize("dtype, k", [(torch.bfloat16, 250), (torch.float16, 700)])
def test_exact_on_small_integers(dtype, k, launch_config):
    # x in -3..3, w in -1..1: every partial sum is a small integer, exact in fp32, and every result
    # is below 256 (bf16) / 2048 (fp16) in magnitude (asserted), exact in the output dtype: any
    # summation order must give the reference exactly.
    # Integer rows are full of ties, which the rule keeps together.
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-3, 4, (6, k), generator=g).to(dtype)
    w = torch.randint(-1, 2, (40, k), generator=g).to(dtype)
    x[:, :k - 80] = x[:, :k - 80].clamp(-1, 1)  # most entries small, so p < 1 drops many
    for p, split_k in ((0.5, 1), (0.5, 3), (0.8, 0)):
        ref, _ = ref_sparse_gemv(x, p, w)
        assert (ref.abs() < (256 if dtype == torch.bfloat16 else 2048)).all()
        assert torch.equal(run(x, p, w, None, split_k).double(), ref)


@pytest.mark.parametrize("split_k", [1, 3])
def test_deterministic(split_k, launch_config):
    w, b = weights(torch.bfloat16, n=70, k=700)
    x = activations(5, 700, torch.bfloat16, seed=6)
    first = run(x, 0.5, w, b, split_k)
    assert torch.equal(first.view(torch.int16), run(x, 0.5, w, b, split_k).view(torch.int16))


def test_default_split_k_depends_on_shape_only(monkeypatch):
    cpu = torch.device("cpu")
    assert sg.default_split_k(64, 128 * 64, cpu) == 1  # interpreter configuration: never split
    monkeypatch.setattr(sg, "interpreter_config", lambda: False)  # the GPU configuration
    assert sg.default_split_k(200, 300, cpu) == sg.default_split_k(200, 300, cpu)
    assert sg.default_split_k(64 * 1000, 4096, cpu) == 1  # enough N blocks: no split
    assert sg.default_split_k(64, 128 * 64, cpu) > 1  # one N block, long K: split


def test_launch_configs():
    """The GPU configuration is the module's constants (what compile_check builds); the
    interpreter's runs the demo model's MLP linears (N = 4096 and 640) as one program, no split."""
    gpu = {"BLOCK_M": sg.BLOCK_M, "BLOCK_N": sg.BLOCK_N, "BLOCK_K": sg.BLOCK_K,
           "REDUCE_BLOCK": sg.REDUCE_BLOCK, "num_warps": sg.NUM_WARPS, "num_stages": sg.NUM_STAGES}
    assert common.interpreter_config()
    for m, n, k in ((1, 4096, 640), (6, 640, 2048), (8, 20, 40)):
        cfg = sg.launch_config(m, n)
        assert cfg["BLOCK_N"] >= n and cfg["BLOCK_N"] * cfg["BLOCK_K"] <= sg.INTERP_TILE
        assert cfg["BLOCK_K"] == sg.BLOCK_K and cfg["BLOCK_M"] == sg.BLOCK_M
        assert sg.default_split_k(n, k, torch.device("cpu")) == 1
        assert tpt._block(k) >= k
    assert tpt._block(32768) == tpt.INTERP_BLOCK
    common.GPU_CONFIG_UNDER_INTERPRETER = True
    try:
        assert sg.launch_config(1, 4096) == gpu and tpt._block(640) == tpt.BLOCK
    finally:
        common.GPU_CONFIG_UNDER_INTERPRETER = False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n, k", [(1, 300, 700), (5, 70, 300), (17, 136, 129)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_interpreter_config_gives_the_gpu_configs_bits(dtype, m, n, k, with_bias, monkeypatch):
    """Both configurations compute the same masked product, whatever BLOCK_N: the same bits.

    Inputs are small multiples of powers of two, so every fp32 product and partial sum is exact
    and the result cannot depend on summation order: under the interpreter ``tl.dot`` is numpy's
    matmul, whose order inside a block depends on the block's shape and the BLAS build. What is
    compared is what the configurations must agree on: masks, indexing, tiling, bias."""
    g = torch.Generator().manual_seed(m)
    w = (torch.randint(-8, 9, (n, k), generator=g) * 2.0**-4).to(dtype)
    x = (torch.randint(-16, 17, (m, k), generator=g) * 2.0**-3).to(dtype)
    b = (torch.randint(-8, 9, (n,), generator=g) * 2.0**-2).to(dtype)
    thr, _ = tpt.top_p_threshold(x, ptensor(0.7))
    wt, b = w.t().contiguous(), b if with_bias else None
    fast = sg.sparse_gemv(x, thr, wt, b)
    monkeypatch.setattr(common, "GPU_CONFIG_UNDER_INTERPRETER", True)
    assert sg.launch_config(m, n)["BLOCK_N"] == sg.BLOCK_N
    gpu = sg.sparse_gemv(x, thr, wt, b, 1)
    assert torch.equal(fast.view(torch.int16), gpu.view(torch.int16))
    kept = top_p_mask(x, 0.7).float()  # the torch rule (thr holds the same set as codes)
    exact = (x.float() * kept) @ w.float().t() + (b.float() if with_bias else 0)
    assert torch.equal(fast.float(), exact.to(dtype).float())  # exact, so equal to the reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split_k", [1, 2])
def test_output_rounds_to_nearest_even(dtype, split_k, launch_config):
    """y = 1 + 0.75 ulp(1) is exact in fp32: the output rounds it up to 1 + ulp(1), as the GPU's
    fp32 -> bf16/fp16 conversion does (Triton 3.9's interpreter truncates bf16 casts: to 1)."""
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    x = torch.zeros(1, 256, dtype=dtype)
    x[0, 0] = x[0, 200] = 1.0  # with split_k = 2, one term in each split
    w = torch.zeros(2, 256, dtype=dtype)
    w[:, 0] = torch.tensor([1.0, -1.0])
    w[:, 200] = torch.tensor([0.75 * ulp, -0.75 * ulp])  # 3 * 2^-9 (bf16), 3 * 2^-12 (fp16)
    y = run(x, 1.0, w, None, split_k)
    assert y.tolist() == [[1 + ulp, -1 - ulp]]


def test_bad_arguments_raise():
    x = activations(2, 32, torch.bfloat16)
    thr, _ = tpt.top_p_threshold(x, ptensor(0.5))
    wt = torch.zeros(32, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x must be one of"):
        sg.sparse_gemv(x.float(), thr, wt.float())
    with pytest.raises(ValueError, match="wt must be contiguous"):
        sg.sparse_gemv(x, thr, torch.zeros(8, 32, dtype=torch.bfloat16).t())
    with pytest.raises(ValueError, match="wt must be"):
        sg.sparse_gemv(x, thr, torch.zeros(31, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="thr must be"):
        sg.sparse_gemv(x, thr.long(), wt)
    with pytest.raises(ValueError, match="bias must be"):
        sg.sparse_gemv(x, thr, wt, torch.zeros(9, dtype=torch.bfloat16))


def test_custom_op_registered_with_fake_impl():
    w, b = weights(torch.bfloat16, n=20, k=40)
    x = activations(2, 40, torch.bfloat16)
    thr, _ = tpt.top_p_threshold(x, ptensor(0.5))
    torch.library.opcheck(torch.ops.vllm_sparsity.sparse_gemv, (x, thr, w.t().contiguous(), b, 0))
