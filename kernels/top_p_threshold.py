"""Per-row top-p threshold on device, sort-free: one Triton program per row.

Maths: ``thr[m] = max { t : sum(|x[m, k]| for code(x[m, k]) >= t) >= p * sum_k |x[m, k]| }``, where
``code`` is the bit pattern of |x| read as an integer (it orders like |x|); entry (m, k) is kept iff
``code(x[m, k]) >= thr[m]``. This is the kept set of ``vllm_sparsity.rule.top_p_mask`` (the paper's
sort rule restated), with the same edge cases: zeros never kept, ``p >= 1`` keeps every nonzero
(thr = 1), a NaN row is kept whole (thr = 0), ±Inf keeps only the infinities, ties kept together.

How: a 16-ary search over the code space (16 bits for bf16/fp16, 32 for fp32). Each pass reads the
row once and sums, in float64, the mass at or above 16 candidate codes ``lo + j << shift``; the
largest j whose mass reaches the target fixes the next 4 bits of the threshold. bf16/fp16 take 4
passes, fp32 8 (a bisection would take 15 / 31); the first pass's candidate 0 is the row's whole
mass, so no pass of its own computes the target. One more pass counts (and writes) the kept
entries. Masses are float64 and never subtracted, so Inf rows give Inf >= Inf and no Inf - Inf
NaN. The float64 sums are exact for bf16/fp16 rows (see rule.py), so the result equals the torch
rule bit for bit although it sums in another order; for fp32 rows it can differ only when a
candidate's mass ties the target within float64 rounding.

No host synchronisation, no data-dependent shapes: p is read from a device tensor (one p for every
row, or one per row: row stride 0 or 1), and every output has a shape fixed by x.

Tensor parallelism: ``down_proj``'s input is sharded over K across TP ranks, and the rule needs
each row's global mass. ``top_p_threshold`` only sees the local shard (a per-shard rule, NOT the
paper's). ``top_p_partial_mass`` + ``top_p_threshold_sharded`` give the global rule: every pass
all-reduces a [M, 16] float64 tensor of candidate masses (4 small all-reduces per layer for bf16).
``triton_backend.apply_counted`` uses it for ``down_proj`` under tensor parallelism.

Source: the rule and its radix restatement are ``vllm_sparsity/rule.py`` (paper: Szatkowski et
al., "Universal Properties of Activation Sparsity in Modern LLMs", Sec. 3.1, ``get_topp_mask``).
"""

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from vllm_sparsity.kernels._registry import custom_op
from vllm_sparsity.kernels.common import (CODE_BITS, INF_CODE, check_p, check_x, interpreter_config,
                                          magnitude_code)

# Elements per chunk and warps of the threshold program. Each pass keeps a [16, BLOCK] float64
# accumulator in registers (16 candidates x BLOCK elements: 16 * BLOCK / (32 * NUM_WARPS) float64
# per thread, 16 here: one element per thread per chunk) and reduces it once after the row, where a
# per-chunk reduction of a [BLOCK, 16] tile spilled registers on Triton 3.6 and 3.8. No spills for
# sm_80 and sm_90a on Triton 3.6 to 3.9 (compile_check, kernels/version_matrix.py). More elements
# per thread multiply the accumulator's registers. Untimed: to be tuned on a GPU
# (kernels/bench/gpu_check.py sweeps both constants).
BLOCK = 512
NUM_WARPS = 16
# Under Triton's interpreter: one chunk per pass for rows up to INTERP_BLOCK (a [16, BLOCK] float64
# tile: 2 MiB at most), for the reasons of sparse_gemv's INTERP_TILE comment. bf16/fp16 rows give
# the same bits with any BLOCK (their float64 sums are exact, see above); fp32 rows as the module
# doc says. Tests set common.GPU_CONFIG_UNDER_INTERPRETER to run the GPU's BLOCK under the
# interpreter.
INTERP_BLOCK = 1 << 14
FANOUT = 16  # candidates per pass: 4 bits of the threshold per pass


@triton.jit
def _masses_at_candidates(x_row, K, lo, shift, CODE_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """[16] float64: mass of the row at or above code ``lo + j << shift`` (lo int64), j < 16;
    candidates past the largest code hold no mass."""
    j = tl.arange(0, 16)
    acc = tl.zeros([16, BLOCK], dtype=tl.float64)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0)
        # code >= lo + j << shift  <=>  (code - lo) >> shift >= j: one digit per element, compared
        # with the 16 candidates, instead of 16 candidate codes held per thread. int32: codes and
        # lo < 2^16 for bf16/fp16; for fp32, lo passes 2^31 only when no code reaches it.
        code = magnitude_code(x, CODE_BITS)
        if CODE_BITS == 15:
            digit = (code - lo.to(tl.int32)) >> shift
        else:
            digit = tl.where(code.to(tl.int64) >= lo, (code - lo.to(tl.int32)) >> shift, -1)
        a = tl.abs(x.to(tl.float32).to(tl.float64))
        acc += tl.where(digit[None, :] >= j[:, None], a[None, :], 0.0)
    return tl.sum(acc, axis=1)


@triton.jit
def _top_p_threshold_kernel(
    x_ptr, p_ptr, thr_ptr, kept_ptr, y_ptr, K, stride_xm, stride_ym, stride_pm,
    CODE_BITS: tl.constexpr, INF_CODE: tl.constexpr, BLOCK: tl.constexpr, WRITE_Y: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    p = tl.load(p_ptr + row * stride_pm)  # float64; stride 0: one p for every row
    # Pass 0 searches the top 4 bits from lo = 0: its candidate 0 (code >= 0) is the row's mass.
    FIRST_SHIFT: tl.constexpr = CODE_BITS + 1 - 4
    masses = _masses_at_candidates(x_row, K, tl.zeros([], dtype=tl.int64), FIRST_SHIFT, CODE_BITS,
                                   BLOCK)
    total = tl.sum(tl.where(tl.arange(0, 16) == 0, masses, 0.0), axis=0)
    target = total * p
    # Masses fall as j grows: the count reaching the target, minus one, is the largest such j
    # (clamped like the torch rule when rounding leaves none).
    lo = (tl.maximum(tl.sum((masses >= target).to(tl.int32), axis=0) - 1, 0).to(tl.int64)
          << FIRST_SHIFT)
    # p >= 1 and NaN rows have fixed thresholds below: skip the search (p = 1 is common: it is
    # how a site outside the current target is switched off).
    if (p < 1.0) & (total == total):
        for i in range(1, (CODE_BITS + 1) // 4):
            shift = FIRST_SHIFT - 4 * i
            # A new name: reassigning ``masses`` would carry its 16 float64 through the loop.
            pass_masses = _masses_at_candidates(x_row, K, lo, shift, CODE_BITS, BLOCK)
            j = tl.maximum(tl.sum((pass_masses >= target).to(tl.int32), axis=0) - 1, 0)
            lo += j.to(tl.int64) << shift
    # A zero target (all-zero row) finds the code space's top, past every code: +Inf's code keeps
    # nothing there, like the torch rule; every other row's threshold is already below.
    thr = tl.maximum(tl.minimum(lo, INF_CODE), 1).to(tl.int32)
    thr = tl.where(p >= 1.0, 1, thr)  # code 1 is the smallest positive magnitude: keep nonzeros
    thr = tl.where(total != total, 0, thr)  # NaN row: code 0 keeps it whole
    tl.store(thr_ptr + row, thr)
    kept = tl.zeros([BLOCK], dtype=tl.int32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0)
        keep = (magnitude_code(x, CODE_BITS) >= thr) & (offs < K)
        kept += keep.to(tl.int32)
        if WRITE_Y:
            tl.store(y_ptr + row * stride_ym + offs, tl.where(keep, x, tl.zeros_like(x)),
                     mask=offs < K)
    tl.store(kept_ptr + row, tl.sum(kept, axis=0).to(tl.int64))


@triton.jit
def _top_p_partial_mass_kernel(x_ptr, lo_ptr, out_ptr, K, stride_xm, shift,
                               CODE_BITS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lo = tl.load(lo_ptr + row)
    masses = _masses_at_candidates(x_ptr + row * stride_xm, K, lo, shift, CODE_BITS, BLOCK)
    tl.store(out_ptr + row * 16 + tl.arange(0, 16), masses)


def _block(K: int) -> int:
    """Elements per chunk of a row of K: BLOCK, or under the interpreter the row rounded up to a
    power of two, up to INTERP_BLOCK."""
    if interpreter_config():
        return min(triton.next_power_of_2(max(K, 1)), INTERP_BLOCK)
    return BLOCK


def launch(x: torch.Tensor, p: torch.Tensor, y: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_p_threshold`` without the custom-op dispatch (for launchers that are ops
    themselves): ``(thr, kept)``, and when ``y`` [M, K] is given, the sparsified x written into
    it."""
    check_x(x)
    stride_pm = check_p(p, x)
    M, K = x.shape
    thr = torch.empty(M, dtype=torch.int32, device=x.device)
    kept = torch.empty(M, dtype=torch.int64, device=x.device)
    if M > 0:
        _top_p_threshold_kernel[(M,)](
            x, p, thr, kept, x if y is None else y, K, x.stride(0), 0 if y is None else y.stride(0),
            stride_pm, CODE_BITS=CODE_BITS[x.dtype], INF_CODE=INF_CODE[x.dtype], BLOCK=_block(K),
            WRITE_Y=y is not None, num_warps=NUM_WARPS)
    return thr, kept


def _threshold_fake(x, p):
    return x.new_empty(x.shape[0], dtype=torch.int32), x.new_empty(x.shape[0], dtype=torch.int64)


@custom_op("top_p_threshold", _threshold_fake)
def top_p_threshold(x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-p threshold code and kept count (``torch.ops.vllm_sparsity.top_p_threshold``).

    Args:
        x: activations [M, K], bf16, fp16 or fp32, unit stride along K; CUDA (CPU under
            TRITON_INTERPRET=1). K is any size (one program loops over the row).
        p: float64 tensor on x's device: share of each row's L1 mass kept, in (0, 1]; one
            element for every row, or one per row ([M] or [M, 1], contiguous: per-request p).

    Returns:
        ``(thr, kept)``: thr int32 [M], entry (m, k) is kept iff ``code(x[m, k]) >= thr[m]``
        (code: |x|'s bits, sign cleared); kept int64 [M], entries kept per row. Outside NaN rows,
        thr is the bit pattern of ``vllm_sparsity.rule.top_p_threshold``'s value.

    Raises:
        ValueError: x is not 2-D bf16/fp16/fp32 with unit last stride on a usable device, or p is
            not a float64 tensor on x's device with one element or one per row.
    """
    return launch(x, p)


def sparsify(x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_p_sparsify`` without the custom-op dispatch: ``(y, kept)``."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _, kept = launch(x, p, y)
    return y, kept


def _sparsify_fake(x, p):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.int64)


@custom_op("top_p_sparsify", _sparsify_fake)
def top_p_sparsify(x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p rule applied to x (``torch.ops.vllm_sparsity.top_p_sparsify``); same contract as
    ``vllm_sparsity.rule.top_p_sparsify``: ``(y, kept)``, y [M, K] in x's dtype with kept entries
    bit-identical and the rest +0, kept int64 [M]. Arguments and errors as ``top_p_threshold``."""
    return sparsify(x, p)


def _partial_mass_fake(x, lo, shift):
    return x.new_empty(x.shape[0], FANOUT, dtype=torch.float64)


@custom_op("top_p_partial_mass", _partial_mass_fake)
def top_p_partial_mass(x: torch.Tensor, lo: torch.Tensor, shift: int) -> torch.Tensor:
    """Candidate masses of one search pass (``torch.ops.vllm_sparsity.top_p_partial_mass``).

    ``out[m, j] = sum(|x[m, k]| for code(x[m, k]) >= lo[m] + j << shift)``, float64.
    Summing ``out`` over shards of K (an all-reduce) gives the masses of the whole row.

    Args:
        x: [M, K] shard, as ``top_p_threshold``.
        lo: int64 [M], the threshold bits found so far (0 at the first pass).
        shift: bit position of this pass's 4-bit digit (12, 8, 4, 0 for bf16/fp16; 28..0 for fp32).

    Returns:
        float64 [M, 16].

    Raises:
        ValueError: as ``top_p_threshold``, or lo is not int64 [M] on x's device.
    """
    check_x(x)
    if lo.dtype != torch.int64 or lo.shape != (x.shape[0],) or lo.device != x.device:
        raise ValueError(f"lo must be int64 [{x.shape[0]}] on {x.device}, got {lo.dtype} "
                         f"{tuple(lo.shape)} on {lo.device}")
    out = torch.empty(x.shape[0], FANOUT, dtype=torch.float64, device=x.device)
    if x.shape[0] > 0:
        _top_p_partial_mass_kernel[(x.shape[0],)](
            x, lo.contiguous(), out, x.shape[1], x.stride(0), shift,
            CODE_BITS=CODE_BITS[x.dtype], BLOCK=_block(x.shape[1]), num_warps=NUM_WARPS)
    return out


def top_p_threshold_sharded(x: torch.Tensor, p: torch.Tensor,
                            all_reduce: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Global top-p threshold of rows whose K is sharded across ranks (tensor parallelism).

    Every rank calls this with its shard; ``all_reduce(t)`` must sum ``t`` across the ranks in place
    (e.g. ``torch.distributed.all_reduce`` on the TP group). It is called once per pass with a
    float64 [M, 16] tensor: 4 times for bf16/fp16, 8 for fp32. No host synchronisation.

    Args:
        x: this rank's shard [M, K_shard], as ``top_p_threshold``.
        p: float64 tensor on x's device, in (0, 1]: one element, or one per row ([M] / [M, 1]).
        all_reduce: in-place sum over the ranks holding the other shards.

    Returns:
        thr int32 [M], identical on every rank, with the meaning of ``top_p_threshold``'s thr for
        the unsharded rows (keep ``code >= thr`` of the local shard; pass it to ``sparse_gemv``).

    Raises:
        ValueError: as ``top_p_threshold``.
    """
    check_x(x)
    check_p(p, x)
    p = p.reshape(-1)  # [1] or [M]: broadcasts against the per-row totals [M]
    bits = CODE_BITS[x.dtype]
    lo = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    total = target = None
    for shift in range(bits + 1 - 4, -1, -4):
        masses = top_p_partial_mass(x, lo, shift)
        all_reduce(masses)
        if total is None:  # the first pass's candidate 0 is code >= 0: the whole row's mass
            total = masses[:, 0].clone()
            target = total * p
        j = ((masses >= target[:, None]).sum(dim=-1) - 1).clamp(min=0)
        lo = lo + (j << shift)
    thr = lo.clamp(1, INF_CODE[x.dtype])
    thr = torch.where(p >= 1.0, torch.ones_like(thr), thr)
    thr = torch.where(total.isnan(), torch.zeros_like(thr), thr)
    return thr.to(torch.int32)
