"""The top-p activation sparsity rule, in torch: the CPU backend and the reference for the kernels.

Paper (Szatkowski et al., "Universal Properties of Activation Sparsity in Modern LLMs", Sec. 3.1 and
its reference ``get_topp_mask``): per token row x [K], sort |x| descending, take the float64
cumulative sum, find the first index i where it reaches ``p * sum|x|``, keep every entry with
``|x| >= sorted[i]`` and zero the rest.

Sort-free, exact restatement. Let ``mass(v) = sum of |x_j| over |x_j| >= v``. ``mass`` only falls as
``v`` grows, and ``sorted[i]`` is exactly the largest value of |x| with ``mass(v) >= p * sum|x|``
(every larger value's mass is a cumulative sum before index i, so below the target). The bit
pattern of a non-negative float, read as an integer ("code"), orders the same way as its value, so
that value is found by a radix select over the codes: per row, a float64 histogram of |x| mass over
the top 8 bits of the code, a reverse cumulative sum to pick the bin where the target is reached,
then the same over the next bits of the entries in that bin (2 levels for bf16/fp16, 4 for fp32).
No sort, no host synchronisation, no data-dependent shapes, and ties are kept together exactly as by
the paper's ``>=``. The kept set equals the paper's whenever the float64 sums are exact, which holds
for bf16/fp16 rows (a row would need magnitudes spread over more than 2^30 to round).

Edge cases (defined here, tested in tests/test_rule.py):

- zero entries are never kept: an all-zero row keeps nothing (the paper keeps it whole; the output
  is the same zeros either way), and sparsity counts every zero of the output;
- ``p >= 1`` keeps every nonzero entry, so the output equals the input bit for bit;
- a row holding a NaN is kept whole, so the NaN reaches the output as in the dense model (the paper
  zeroes such a row, which would hide the fault);
- ±Inf carries all of a row's mass: only the infinite entries are kept (as in the paper);
- one massive outlier holding at least ``p`` of the mass is kept alone (paper, App. A.3).

Tensor parallelism: ``down_proj``'s input is sharded over K across TP ranks, and the rule needs each
row's global mass. With ``all_reduce`` (an in-place sum across the ranks) each level's histogram is
summed over the shards before it is read, so every rank finds the same threshold: that of the
whole row, applied to its own shard (the paper's rule, not a per-shard one).

The paper's other rules (Sec. 3 and App. A: top-k, max-p, L_q top-p) follow the top-p functions,
on the same radix select with other weights per entry, and ``RULES`` names them all.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from vllm_sparsity.codes import CODE as _CODE

# The rules, by name: a threshold function with the signature and contract of ``top_p_threshold``
# (x [M, K], p, all_reduce -> t [M, 1]; keep |x| >= t, NaN t keeps the row whole). A new rule is
# one function decorated with ``@register_rule(name)``. "lq" also takes its exponent as the keyword
# ``q``: bind it with ``functools.partial(RULES["lq"], q=Q)``.
RULES: dict[str, Callable[..., torch.Tensor]] = {}


def register_rule(name: str):
    """Decorator: add the threshold function to ``RULES`` under ``name``."""

    def register(threshold):
        RULES[name] = threshold
        return threshold

    return register


@register_rule("top-p")
def top_p_threshold(x: torch.Tensor, p: torch.Tensor | float,
                    all_reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Per-row magnitude threshold of the top-p rule.

    Args:
        x: activations [M, K], bf16, fp16 or fp32, any device; with ``all_reduce``, this rank's
            shard [M, K_rank] of rows whose K is split across ranks (same M and rows everywhere).
        p: share of each row's L1 mass to keep, in (0, 1]; a float, a float64 tensor [1] (a tensor
            can be changed in place between steps without recompiling a graph), or a float64
            tensor [M, 1] with one p per row (broadcast: each row follows its own p, e.g. the
            per-token p of requests that carry their own, ``state.RuntimeState.token_p``).
        all_reduce: None for whole rows; else an in-place sum across the ranks holding the other
            shards (e.g. ``torch.distributed.all_reduce``), called once per radix level with a
            float64 histogram on x's device: 2 calls for bf16/fp16 ([M, 256] then [M, 128]),
            4 for fp32 (3 x [M, 256] then [M, 128]). Every rank must call this function together.

    Returns:
        t [M, 1], dtype of x: entry (m, k) is kept iff ``|x[m, k]| >= t[m]``, except that
        ``t[m]`` is NaN for a row holding a NaN, meaning "keep the whole row" (see
        ``top_p_mask``). t > 0 otherwise, so zeros are never kept. With ``all_reduce``: the
        threshold of the whole rows, the same on every rank (a NaN in any shard keeps the row
        whole on every rank).

    Raises:
        ValueError: x is not 2-D or its dtype is not bf16, fp16 or fp32.
    """
    _check_x(x)
    # Weights |x|; the first histogram's sum is the row's L1 mass (NaN exactly for rows with a NaN).
    a = x.abs()
    prefix, target = _radix_select(a, a.to(torch.float64), lambda total: total * p, all_reduce)
    return _threshold(x, prefix, target, p)


def top_p_mask(x: torch.Tensor, p: torch.Tensor | float,
               all_reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Boolean mask [M, K] of the entries of x [M, K] that the top-p rule keeps (see module doc;
    ``all_reduce`` as ``top_p_threshold``: x is then one shard of K, and so is the mask)."""
    return kept_mask(x, p, top_p_threshold, all_reduce)


def top_p_sparsify(x: torch.Tensor, p: torch.Tensor | float,
                   all_reduce: Callable[[torch.Tensor], None] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the top-p rule to each row of x.

    Args:
        x: activations [M, K], bf16/fp16/fp32.
        p: share of L1 mass kept per row, in (0, 1] (float, float64 tensor [1] or [M, 1]).
        all_reduce: None, or x is this rank's shard of K and the rule is that of the whole rows
            (see ``top_p_threshold``).

    Returns:
        ``(y, kept)``: y [M, K], same dtype, kept entries bit-identical to x and the rest exactly
        zero; kept [M] int64, how many entries of each row are kept (nonzero unless a NaN row;
        with ``all_reduce``: of this rank's shard, which may keep none).

    Raises:
        ValueError: as ``top_p_threshold``.
    """
    mask = top_p_mask(x, p, all_reduce)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)), mask.sum(dim=-1)


# --- The paper's other rules (Sec. 3 and App. A), on one radix select shared with top-p. ---
#
# Every rule below returns a threshold t [M, 1] with top_p_threshold's contract: entry kept iff
# |x| >= t, t NaN keeps the row whole (a NaN in the row, in any shard under ``all_reduce``),
# t > 0 so zeros are never kept. ``all_reduce`` is the same in-place sum hook, called once per
# radix level with a float64 histogram (2 calls for bf16/fp16, 4 for fp32, same shapes as top-p).


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [num_tokens, dim], got shape {tuple(x.shape)}")
    if x.dtype not in _CODE:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")


_SMALLEST_FLOAT64 = math.ulp(0.0)  # 2^-1074


def _radix_select(a: torch.Tensor, weight: torch.Tensor,
                  target_of: Callable[[torch.Tensor], torch.Tensor],
                  all_reduce: Callable[[torch.Tensor], None] | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the largest magnitude code c with ``W(c) >= target``, where ``W(c)`` is the sum of
    ``weight`` over the entries whose magnitude code is >= c (the module doc's radix select, with
    any non-negative weight: |x| for top-p, |x|^q for lq, 1 for top-k).

    Args:
        a: |x| [M, K] (or this rank's shard), x checked by ``_check_x``.
        weight: float64 [M, K], >= 0, NaN at NaN entries (so the row's total is NaN).
        target_of: the row totals [M, 1] (sum of weight, over all shards) -> float64 targets [M, 1].
        all_reduce: as ``top_p_threshold``.

    Returns:
        (code int64 [M, 1], target float64 [M, 1]). The code is 0 when no positive weight reaches
        the target (it exceeds the weight of the nonzero entries), the top code for a row without
        weight (target 0); a NaN target gives an arbitrary code (the caller keeps the row whole).
    """
    int_dtype, bits_left, digits, _ = _CODE[a.dtype]
    # The sign bit is clear after abs(), so the integer view is the (monotone) magnitude code.
    code = a.view(int_dtype).to(torch.int64)
    prefix = torch.zeros_like(code[:, :1])  # the threshold's code bits found so far
    above = torch.zeros(a.shape[0], 1, dtype=torch.float64, device=a.device)  # weight above prefix
    target = None
    for level, bits in enumerate(digits):
        bits_left -= bits
        digit = (code >> bits_left) & ((1 << bits) - 1)
        in_bin = weight if level == 0 else torch.where(
            (code >> (bits_left + bits)) == prefix, weight, 0.0)
        hist = torch.zeros(a.shape[0], 1 << bits, dtype=torch.float64, device=a.device)
        hist.scatter_add_(1, digit, in_bin)
        if all_reduce is not None:  # weights of the whole rows: every rank takes the same digit
            all_reduce(hist)
        if target is None:  # the first histogram holds the whole row: its sum is the total
            # At least the smallest positive float64 where the row has weight: a target of 0
            # (p * total underflowed) is reached at the largest weighted entry, as by the sort
            # rule's first index, not above it (which would keep nothing). A row without weight
            # keeps its target 0, reached at every digit: its code runs to the top, +Inf after
            # the clamp in ``_threshold`` (the kernels' threshold too). NaN stays NaN.
            total = hist.sum(dim=-1, keepdim=True)
            target = target_of(total)
            target = torch.where(total > 0, target.clamp(min=_SMALLEST_FLOAT64), target)
        # W(digit >= d) for every d; the largest d whose weight reaches the target is the digit.
        reach = hist.flip(-1).cumsum(-1).flip(-1) + above
        d = ((reach >= target).sum(dim=-1, keepdim=True) - 1).clamp(min=0)
        last = (1 << bits) - 1
        above = torch.where(d < last, reach.gather(1, (d + 1).clamp(max=last)), above)
        prefix = (prefix << bits) | d
    return prefix, target


def _threshold(x: torch.Tensor, code: torch.Tensor, target: torch.Tensor,
               p: torch.Tensor | float) -> torch.Tensor:
    """Threshold value [M, 1] in x's dtype from a radix-selected code: at least the smallest
    positive magnitude, at most +Inf; every nonzero for ``p >= 1``; NaN where the target is NaN."""
    int_dtype, _, _, inf_code = _CODE[x.dtype]
    # Code 1 is the smallest positive magnitude: keep every nonzero (p >= 1, a row whose float64
    # total absorbed tiny entries). The top clamp bounds a row without weight (an all-zero one:
    # +Inf, it keeps nothing, as zeros are never kept) and the arbitrary code of a NaN row.
    code = code.clamp(min=1, max=inf_code)
    # float64: a float p just below 1 would round up to 1 in float32 (torch's default dtype).
    code = torch.where(torch.as_tensor(p, dtype=torch.float64, device=x.device) >= 1.0, 1, code)
    # Back to a value ([M, 1] only): the full-size comparison then stays in floating point, which
    # compilers vectorise (an integer bitcast of the whole block is several times slower on CPU).
    t = code.to(int_dtype).view(x.dtype)
    return torch.where(target.isnan(), torch.full_like(t, float("nan")), t)


def _counts(a: torch.Tensor) -> torch.Tensor:
    """float64 [M, K] from |x|: weight 1 per entry (zeros included), NaN at NaN entries."""
    return torch.where(a.isnan(), a.to(torch.float64), 1.0)


@register_rule("top-k")
def top_k_threshold(x: torch.Tensor, p: torch.Tensor | float,
                    all_reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Per-row magnitude threshold of the top-k rule (paper Sec. 3 and App. A): keep the k largest
    |x| of each row, with ``k = max(1, floor(p * K + 0.5))``, i.e. p * K rounded to the nearest
    integer, halves up, in float64 (K the whole row's length, summed over the shards under
    ``all_reduce``). Nearest, not ceil: a decimal p carries float noise (0.07 * 100 is
    7.000000000000001 in float64, whose ceil would keep 8).

    Ties at the k-th largest magnitude are kept together (so possibly more than k); zeros are never
    kept (so possibly fewer: a row with fewer than k nonzeros keeps all of them). ``p >= 1`` keeps
    every nonzero. ±Inf is the largest magnitude: kept first and counted as one entry like any
    other. A row holding a NaN is kept whole (t NaN).

    Args:
        x: as ``top_p_threshold``.
        p: kept fraction of K, in (0, 1]; a float or a float64 tensor [1].
        all_reduce: as ``top_p_threshold``: the histograms are per-row entry counts, summed over
            the ranks (float64, exact below 2^53 entries).

    Returns:
        t [M, 1], dtype of x, with ``top_p_threshold``'s contract.

    Raises:
        ValueError: x is not 2-D or its dtype is not bf16, fp16 or fp32.
    """
    _check_x(x)
    # The first histogram counts every entry of the whole row: its total is K (NaN with a NaN).
    def k_of(total):  # nearest integer to p * K, halves up, at least 1
        return (total * p + 0.5).floor().clamp(min=1)

    a = x.abs()
    code, target = _radix_select(a, _counts(a), k_of, all_reduce)
    return _threshold(x, code, target, p)


@register_rule("max-p")
def max_p_threshold(x: torch.Tensor, p: torch.Tensor | float,
                    all_reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Per-row magnitude threshold of the max-p rule (paper Sec. 3 and App. A): keep
    ``|x| >= p * max|x|``, the product taken in float64 (t is the smallest value of x's dtype at
    least that), so the largest entry is always kept.

    ``p >= 1`` (p is capped at 1) keeps only the entries equal to the max: that is the rule, unlike
    top-p it does not keep every nonzero. An all-zero row keeps nothing; a row holding ±Inf keeps
    only its infinite entries (p * Inf = Inf); a row holding a NaN is kept whole (t NaN).

    Args:
        x: as ``top_p_threshold``.
        p: fraction of the row's largest magnitude, in (0, 1]; a float or a float64 tensor [1].
        all_reduce: as ``top_p_threshold``. The hook only sums, so the global max is found as a
            radix select over per-row entry counts (the largest code with at least one entry at or
            above it; the histograms, not the max, are summed over the ranks): same calls and
            shapes as top-p. Without it the max is a plain ``amax``.

    Returns:
        t [M, 1], dtype of x, with ``top_p_threshold``'s contract.

    Raises:
        ValueError: x is not 2-D or its dtype is not bf16, fp16 or fp32.
    """
    _check_x(x)
    int_dtype, _, _, inf_code = _CODE[x.dtype]
    a = x.abs()
    if all_reduce is None:
        top = a.amax(dim=-1, keepdim=True).to(torch.float64)  # NaN for a row with a NaN
    else:
        # Target: one entry (total * 0 + 1 keeps a NaN row's NaN; counts are never infinite).
        code, target = _radix_select(a, _counts(a), lambda total: total * 0 + 1, all_reduce)
        top = code.to(int_dtype).view(x.dtype).to(torch.float64)
        top = torch.where(target.isnan(), target, top)
    bound = top * torch.as_tensor(p, dtype=torch.float64, device=x.device).clamp(max=1.0)
    t = bound.to(x.dtype)  # rounded to nearest: step one code up where that fell below the bound
    code = t.view(int_dtype).to(torch.int64) + (t.to(torch.float64) < bound).to(torch.int64)
    t = code.clamp(min=1, max=inf_code).to(int_dtype).view(x.dtype)  # zeros never kept
    return torch.where(bound.isnan(), torch.full_like(t, float("nan")), t)


@register_rule("lq")
def lq_threshold(x: torch.Tensor, p: torch.Tensor | float,
                 all_reduce: Callable[[torch.Tensor], None] | None = None, *,
                 q: float) -> torch.Tensor:
    """Per-row magnitude threshold of the generalised L_q top-p rule (paper Sec. 3 and App. A):
    keep the smallest set of largest |x| whose sum of |x|^q reaches ``p * sum |x|^q``, q > 0.
    ``q = 1`` is top-p, bit for bit (``top_p_threshold``); larger q favours the largest entries.

    |x|^q and the masses are float64 (``torch.pow``), so the kept set is the sort rule's whenever
    those sums are exact, as for top-p. Edge cases as top-p: zeros never kept, ``p >= 1`` keeps
    every nonzero, ties kept together, a NaN row kept whole, ±Inf carries all of a row's mass
    (only the infinite entries are kept). Float64 range: an |x|^q that overflows (fp32 |x| = 1e38
    with q > 8.1) counts as Inf, so only the largest magnitude (and its ties) is kept; a row whose
    every |x|^q underflows to 0 has nothing to rank by and keeps every nonzero.

    Args:
        x: as ``top_p_threshold``.
        p: share of each row's L_q mass (sum of |x|^q) to keep, in (0, 1]; float or float64 [1].
        all_reduce: as ``top_p_threshold`` (histograms of |x|^q).
        q: the exponent, a finite float > 0 (keyword only; a constant of a compiled graph).

    Returns:
        t [M, 1], dtype of x, with ``top_p_threshold``'s contract.

    Raises:
        ValueError: x is not 2-D or its dtype is not bf16, fp16 or fp32; q is not a finite number
            > 0.
    """
    _check_x(x)
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q < float("inf"):
        raise ValueError(f"q must be a finite number > 0 (the L_q exponent), got {q!r}")
    a = x.abs()
    code, target = _radix_select(a, a.to(torch.float64).pow(float(q)), lambda total: total * p,
                                 all_reduce)
    # A row with nonzeros whose |x|^q all underflow has no weight to rank by: keep every nonzero
    # (code 1). An all-zero row keeps top-p's +Inf. Per shard under TP: a shard's own nonzeros.
    code = torch.where((target == 0) & (a.amax(dim=-1, keepdim=True) > 0), 1, code)
    return _threshold(x, code, target, p)


# p at which each rule keeps every nonzero entry: what a site outside the target runs at, so the
# target can change at runtime without retracing a graph. Max-p at 1 keeps only the max; at 0 its
# bound p * max|x| is 0, and zeros are never kept. (Tested in tests/test_rules.py.)
KEEP_ALL_P = {"top-p": 1.0, "top-k": 1.0, "max-p": 0.0, "lq": 1.0}


def threshold_of(name: str, q: float | None = None) -> Callable[..., torch.Tensor]:
    """The threshold function of rule ``name`` (a key of ``RULES``), with ``q`` bound for "lq".
    Raises ValueError for an unknown rule, or lq without a q."""
    if name not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {name!r}")
    if name == "lq":
        if q is None:
            raise ValueError("the lq rule needs q (the L_q exponent, a finite number > 0)")
        return functools.partial(RULES["lq"], q=q)
    return RULES[name]


def sparsify(x: torch.Tensor, p: torch.Tensor | float,
             threshold: Callable[..., torch.Tensor] = top_p_threshold,
             all_reduce: Callable[[torch.Tensor], None] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_p_sparsify`` for any rule: ``threshold`` is a function of ``RULES`` (see
    ``threshold_of``). x [M, K] bf16/fp16/fp32; returns ``(y [M, K], kept int64 [M])``: kept
    entries bit-identical to x, the rest exactly zero; a NaN threshold keeps the row whole.
    Raises ValueError as the threshold function."""
    mask = kept_mask(x, p, threshold, all_reduce)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)), mask.sum(dim=-1)


def kept_mask(x: torch.Tensor, p: torch.Tensor | float,
              threshold: Callable[..., torch.Tensor] = top_p_threshold,
              all_reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Boolean mask [M, K] of the entries of x [M, K] (bf16/fp16/fp32) that the rule of
    ``threshold`` (a function of ``RULES``) keeps at p: ``|x| >= t``, or the whole row where t is
    NaN. Raises ValueError as the threshold function."""
    t = threshold(x, p, all_reduce)
    return (x.abs() >= t) | t.isnan()
