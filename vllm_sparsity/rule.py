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
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_sparsity.codes import CODE as _CODE

# The rules, by name: a threshold function with the signature and contract of ``top_p_threshold``
# (x [M, K], p, all_reduce -> t [M, 1]; keep |x| >= t, NaN t keeps the row whole). A new rule is
# one function decorated with ``@register_rule(name)``.
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
        p: share of each row's L1 mass to keep, in (0, 1]; a float or a float64 tensor [1] (a tensor
            can be changed in place between steps without recompiling a graph).
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
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [num_tokens, dim], got shape {tuple(x.shape)}")
    if x.dtype not in _CODE:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    int_dtype, bits_left, digits, inf_code = _CODE[x.dtype]
    a = x.abs()
    # The sign bit is clear after abs(), so the integer view is the (monotone) magnitude code.
    code = a.view(int_dtype).to(torch.int64)
    a64 = a.to(torch.float64)
    prefix = torch.zeros_like(code[:, :1])  # the threshold's code bits found so far
    above = torch.zeros(x.shape[0], 1, dtype=torch.float64, device=x.device)  # mass above prefix
    target = None
    for level, bits in enumerate(digits):
        bits_left -= bits
        digit = (code >> bits_left) & ((1 << bits) - 1)
        in_bin = a64 if level == 0 else torch.where(
            (code >> (bits_left + bits)) == prefix, a64, 0.0)
        hist = torch.zeros(x.shape[0], 1 << bits, dtype=torch.float64, device=x.device)
        hist.scatter_add_(1, digit, in_bin)
        if all_reduce is not None:  # masses of the whole rows: every rank takes the same digit
            all_reduce(hist)
        if target is None:  # the first histogram holds the whole row: its sum is the total
            target = hist.sum(dim=-1, keepdim=True) * p  # NaN exactly for rows holding a NaN
        # mass(digit >= d) for every d; the largest d whose mass reaches the target is the digit.
        reach = hist.flip(-1).cumsum(-1).flip(-1) + above
        d = ((reach >= target).sum(dim=-1, keepdim=True) - 1).clamp(min=0)
        last = (1 << bits) - 1
        above = torch.where(d < last, reach.gather(1, (d + 1).clamp(max=last)), above)
        prefix = (prefix << bits) | d
    # Code 1 is the smallest positive magnitude: keep every nonzero (p >= 1, or a row whose float64
    # total absorbed tiny entries). An all-zero row (target 0) searches up to the top code, a NaN
    # pattern: +Inf instead keeps nothing, as zeros are never kept.
    prefix = prefix.clamp(min=1, max=inf_code)
    # float64: a float p just below 1 would round up to 1 in float32 (torch's default dtype).
    prefix = torch.where(torch.as_tensor(p, dtype=torch.float64, device=x.device) >= 1.0, 1, prefix)
    # Back to a value ([M, 1] only): the full-size comparison then stays in floating point, which
    # compilers vectorise (an integer bitcast of the whole block is several times slower on CPU).
    t = prefix.to(int_dtype).view(x.dtype)
    return torch.where(target.isnan(), torch.full_like(t, float("nan")), t)


def top_p_mask(x: torch.Tensor, p: torch.Tensor | float,
               all_reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Boolean mask [M, K] of the entries of x [M, K] that the top-p rule keeps (see module doc;
    ``all_reduce`` as ``top_p_threshold``: x is then one shard of K, and so is the mask)."""
    t = top_p_threshold(x, p, all_reduce)
    return (x.abs() >= t) | t.isnan()


def top_p_sparsify(x: torch.Tensor, p: torch.Tensor | float,
                   all_reduce: Callable[[torch.Tensor], None] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the top-p rule to each row of x.

    Args:
        x: activations [M, K], bf16/fp16/fp32.
        p: share of L1 mass kept per row, in (0, 1] (float or float64 tensor [1]).
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
