"""Input-sparse GEMV/GEMM: y = mask(x) @ Wt, loading only the weight rows of kept inputs.

Maths: ``y[m, n] = sum_k keep[m, k] * x[m, k] * Wt[k, n] (+ bias[n])``, ``keep[m, k] = code(x[m, k])
>= thr[m]`` (thr from ``top_p_threshold``; code: |x|'s bits with the sign cleared), fp32
accumulation, output in x's dtype.

Layout: the weight is K-major, ``Wt [K, N]`` contiguous (row k = everything input k touches, N
contiguous elements), so a dropped input skips one whole row: a masked-off load issues no memory
traffic. A program owns BLOCK_N outputs of BLOCK_M rows and walks K in BLOCK_K steps.

Batch policy (per-row semantics, union loading): each row's output uses only that row's kept
inputs (the other rows' kept entries are zeroed in its x tile), so y[m] is exactly
``mask_m(x_m) @ Wt`` for every M. A weight row is loaded when ANY row of the M tile keeps it: one
read of W serves all rows, which is what makes batching worthwhile, at the price that the bytes read
grow with the union of the row masks (towards dense as M grows); the caller sends large M to the
dense GEMM instead (``triton_backend.M_MAX``). Any M works here (M tiles of BLOCK_M rows).

Split-K: when N alone gives too few programs to fill the GPU, K is cut into ``split_k`` ranges
whose fp32 partials go to a workspace, summed by ``_split_k_reduce_kernel`` in a fixed order (split
0, 1, ...), so the result is bit-for-bit deterministic; no atomics anywhere.

Source: the input-sparse GEMV idea and K-major weight follow TEAL's ``kernels/sparse_gemv.py``
(https://github.com/FasterDecoding/TEAL), itself after Deja Vu; written afresh here for batches,
per-row masks, a threshold read on device and deterministic split-K.
"""

import functools

import torch
import triton
import triton.language as tl

from vllm_sparsity.kernels._registry import custom_op
from vllm_sparsity.kernels.common import check_x, interpreter_config, magnitude_code

# Untimed defaults, to be tuned on a GPU. BLOCK_M = 16 is tl.dot's smallest M: decode rows (M <= 8)
# leave MMA rows idle, which costs nothing that matters in a bandwidth-bound kernel. BLOCK_N = 64
# bf16 = 128 B per weight row: one full cache line per kept row per program. BLOCK_K = 128 keeps a
# 16 KB weight tile in flight per stage. 8 warps: with 4, the build for unaligned shapes spills on
# sm_90 (see compile_check).
BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 128
NUM_WARPS = 8
NUM_STAGES = 3
REDUCE_BLOCK = 1024
# Split K until about this many programs per SM exist; each split keeps >= MIN_K_BLOCKS K steps.
PROGRAMS_PER_SM = 2
MIN_K_BLOCKS = 4
DTYPES = (torch.bfloat16, torch.float16)

# Launch configuration under Triton's interpreter (CPU, TRITON_INTERPRET=1); same kernels, other
# launch parameters. The interpreter runs every program instance, and every trip of its loops, as
# Python over numpy: the cost is a fixed overhead per op per program per trip plus numpy work
# proportional to the tile elements, so the GPU's many small programs (BLOCK_N = 64, K split to fill
# the SMs) are pure overhead there. So: one program spans N (BLOCK_N = N rounded up to a power of
# two, up to INTERP_TILE / BLOCK_K elements per weight tile, which bounds the memory of a tile's
# numpy temporaries), no split-K by default, and the reduce kernel (explicit split_k only) in blocks
# of INTERP_REDUCE_BLOCK. BLOCK_M and BLOCK_K stay the GPU's: each output then sums the same fp32
# chunk partials in the same order as the GPU configuration without split-K, so the two give the
# same bits (numpy's matmul sums a chunk in an order that does not depend on N), and the GPU
# configurations' tests also hold for this one; a larger BLOCK_K would save more on long K
# (down_proj: 16 trips) but give other bits. The threshold kernel does the same with its BLOCK
# (top_p_threshold.INTERP_BLOCK); kernels/bench/profile_interpreter.py measures the difference.
# Tests set common.GPU_CONFIG_UNDER_INTERPRETER to run the GPU configurations (split-K included)
# under the interpreter instead.
INTERP_TILE = 1 << 19
INTERP_REDUCE_BLOCK = 1 << 16


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, thr_ptr, wt_ptr, bias_ptr, out_ptr, M, N, K, k_per_split,
    stride_xm, stride_wk, stride_os, stride_om,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Rows past M get a threshold above every code: they keep nothing and load nothing.
    thr = tl.load(thr_ptr + offs_m, mask=m_ok, other=0x7FFFFFFF)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # The fill of masked-off weight loads, already a tile of the weight's dtype: a scalar 0.0 would
    # be broadcast, then cast to bf16 per load, which the interpreter does bit by bit (slowly).
    w_zero = tl.zeros([BLOCK_K, BLOCK_N], dtype=wt_ptr.dtype.element_ty)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        keep = (magnitude_code(x, 15) >= thr[:, None]) & k_ok[None, :]
        x = tl.where(keep, x, tl.zeros_like(x))
        any_keep = tl.max(keep.to(tl.int32), axis=0) > 0  # union over the tile's rows
        w = tl.load(wt_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :],
                    mask=any_keep[:, None] & n_ok[None, :], other=w_zero)
        if UPCAST_DOT:
            # Interpreter only: its tl.dot multiplies bf16 operands as raw uint16 bits (triton 3.9
            # runtime/interpreter.py create_dot). bf16 x bf16 products are exact in fp32, so this
            # computes the same sums as the bf16 MMA the GPU runs. bf16 is the top half of an fp32:
            # the upcast shifts the bits, the exact value of ``.to(tl.float32)``, which the
            # interpreter computes with a generic, much slower bit-by-bit converter.
            x = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
            w = (w.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    out_mask = m_ok[:, None] & n_ok[None, :]
    out_offs = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if PARTIAL:  # fp32 partial sums of split pid_s, summed by _split_k_reduce_kernel
        tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + out_offs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_k_reduce_kernel(part_ptr, bias_ptr, out_ptr, MN, N, SPLIT_K, HAS_BIAS: tl.constexpr,
                           BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    ptrs = part_ptr + offs
    for _ in range(0, SPLIT_K):  # splits in a fixed order: deterministic
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += MN  # pointer arithmetic is 64-bit: no int32 overflow of s * M * N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # GPU configuration under the interpreter: small, so that split-K shows on CPU
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_split_k(N: int, K: int, device: torch.device) -> int:
    """Splits of K for an [*, K] x [K, N] product: enough programs to give every SM
    ``PROGRAMS_PER_SM``, each split at least ``MIN_K_BLOCKS`` blocks of K; 1 under the
    interpreter's configuration. Depends on shapes only, so a given shape always reduces in the
    same order."""
    if interpreter_config():
        return 1
    n_blocks = triton.cdiv(N, BLOCK_N)
    want = triton.cdiv(PROGRAMS_PER_SM * _num_sms(device), n_blocks)
    return max(1, min(want, triton.cdiv(K, BLOCK_K) // MIN_K_BLOCKS))


def launch_config(M: int, N: int) -> dict:
    """Block sizes and compile options of ``_sparse_gemv_kernel`` for an [M, *] x [*, N] product
    (the GPU's constants, or the interpreter's, see INTERP_TILE), and the reduce kernel's block."""
    if interpreter_config():
        block_n = min(triton.next_power_of_2(N), max(INTERP_TILE // BLOCK_K, BLOCK_N))
        reduce_block = min(triton.next_power_of_2(M * N), INTERP_REDUCE_BLOCK)
    else:
        block_n, reduce_block = BLOCK_N, REDUCE_BLOCK
    return {"BLOCK_M": BLOCK_M, "BLOCK_N": block_n, "BLOCK_K": BLOCK_K,
            "REDUCE_BLOCK": reduce_block, "num_warps": NUM_WARPS, "num_stages": NUM_STAGES}


def _sparse_gemv_fake(x, thr, wt, bias=None, split_k=0):
    return x.new_empty(x.shape[0], wt.shape[1])


@custom_op("sparse_gemv", _sparse_gemv_fake)
def sparse_gemv(x: torch.Tensor, thr: torch.Tensor, wt: torch.Tensor,
                bias: torch.Tensor | None = None, split_k: int = 0) -> torch.Tensor:
    """``y = mask(x) @ wt (+ bias)``, reading only the rows of wt that some row of x keeps
    (``torch.ops.vllm_sparsity.sparse_gemv``).

    Args:
        x: activations [M, K], bf16 or fp16, unit stride along K; CUDA (CPU under
            TRITON_INTERPRET=1). Any M; meant for decode batches (see the module doc).
        thr: int32 [M], per-row threshold code from ``top_p_threshold``: x[m, k] is used iff
            ``code(x[m, k]) >= thr[m]`` (0 keeps the row whole, 1 keeps every nonzero).
        wt: the K-major weight [K, N], x's dtype, contiguous.
        bias: optional [N], x's dtype, added in fp32 before the output is rounded.
        split_k: ranges K is cut into; 0 picks ``default_split_k`` (shape-only).

    Returns:
        y [M, N], x's dtype; deterministic (same inputs, same bits).

    Raises:
        ValueError: a tensor has the wrong shape, dtype, layout or device.
    """
    return _sparse_gemv(x, thr, wt, bias, split_k)


def _sparse_gemv(x, thr, wt, bias=None, split_k=0):
    """``sparse_gemv`` without the custom-op dispatch (for launchers that are ops themselves)."""
    check_x(x, "x", DTYPES)
    M, K = x.shape
    if wt.dim() != 2 or wt.shape[0] != K or wt.dtype != x.dtype or wt.device != x.device:
        raise ValueError(f"wt must be [K={K}, N] {x.dtype} on {x.device}, got {wt.dtype} "
                         f"{tuple(wt.shape)} on {wt.device}")
    N = wt.shape[1]
    if N > 1 and wt.stride() != (N, 1):
        raise ValueError(f"wt must be contiguous (K-major [K, N]), got strides {wt.stride()}")
    if thr.dtype != torch.int32 or thr.shape != (M,) or thr.device != x.device:
        raise ValueError(f"thr must be int32 [{M}] on {x.device}, got {thr.dtype} "
                         f"{tuple(thr.shape)} on {thr.device}")
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype
                             or bias.device != x.device or bias.stride() != (1,)):
        raise ValueError(f"bias must be contiguous [{N}] {x.dtype} on {x.device}, got "
                         f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")
    if split_k < 0:
        raise ValueError(f"split_k must be >= 0, got {split_k}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(M, N))
    cfg = launch_config(M, N)
    block_k = cfg["BLOCK_K"]
    split_k = split_k or default_split_k(N, K, x.device)
    # Whole BLOCK_K steps per split; recompute the count so that no split is empty.
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    partial = split_k > 1
    # Triton 3.9's interpreter casts fp32 to bf16 by truncation (runtime/interpreter.py cast_impl
    # passes no rounding mode) where the GPU rounds to nearest even: a bias of half an ulp on every
    # output. Under the interpreter the kernels write bf16 results as fp32, and torch rounds them.
    interp_bf16 = triton.knobs.runtime.interpret and x.dtype == torch.bfloat16
    y_k = torch.empty(M, N, dtype=torch.float32, device=x.device) if interp_bf16 else y
    out = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device) if partial else y_k
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), split_k, triton.cdiv(M, cfg["BLOCK_M"]))
    _sparse_gemv_kernel[grid](
        x, thr.contiguous(), wt, wt if bias is None else bias, out, M, N, K, k_per_split,
        x.stride(0), wt.stride(0), M * N, N,
        HAS_BIAS=bias is not None, PARTIAL=partial, UPCAST_DOT=interp_bf16,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if partial:
        _split_k_reduce_kernel[(triton.cdiv(M * N, cfg["REDUCE_BLOCK"]),)](
            out, wt if bias is None else bias, y_k, M * N, N, split_k,
            HAS_BIAS=bias is not None, BLOCK=cfg["REDUCE_BLOCK"], num_warps=4)
    return y.copy_(y_k) if interp_bf16 else y
