"""The analyses' maths: effective rank of a batch of activations, Jaccard overlap of kept sets.

Pure torch, no state: ``analysis`` (the workers' collection) calls these, and the tests check them
against naive loops and hand-computed cases.
"""

from __future__ import annotations

import torch


def effective_rank(x: torch.Tensor) -> float:
    """Normalised effective rank of a batch of activations (paper App. E, after Roy & Vetterli,
    "The effective rank: a measure of effective dimensionality", EUSIPCO 2007).

    With s the singular values of x and q = s / sum(s), the effective rank is exp(H(q)),
    H(q) = -sum q_i log q_i (0 log 0 = 0), here divided by the dimension K: 1/K for a rank-1
    batch, 1 for a batch whose K singular values are all equal (e.g. the identity). A batch of
    B < K rows has at most B nonzero singular values, so its value is at most B/K: compare
    values computed with the same B and K.

    Args:
        x: [B, K] activations (B tokens, K the site's dimension), float32/float64/bf16/fp16;
            computed in float64 (``singular_values``).

    Returns:
        exp(H(q)) / K in [1/K, min(B, K)/K]; 0.0 for an all-zero batch (no direction at all).

    Raises:
        ValueError: x is not 2-D, or is empty.
    """
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty [B, K] tensor, got shape {tuple(x.shape)}")
    s = singular_values(x)
    total = s.sum()
    if total <= 0:
        return 0.0
    q = s / total
    q = q[q > 0]
    return float(torch.exp(-(q * q.log()).sum())) / x.shape[1]


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values of x [B, K], float64 [min(B, K)], as the square roots of the eigenvalues of
    the smaller Gram matrix (x x^T or x^T x, in float64): a [B, B] eigenproblem instead of a
    [B, K] SVD, many times faster for B << K. Values below about sqrt(eps) * max(s) lose their
    relative precision, which moves the effective rank by far less than its reported digits."""
    x = x.to(torch.float64)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    return torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().flip(0)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jaccard index |A ∩ B| / |A ∪ B| of kept sets given as masks, per row (paper Sec. 4.6: the
    overlap of the entries kept at two decode steps).

    Args:
        a, b: bool [..., K], True where an entry is kept; same shape.

    Returns:
        float64 [...], in [0, 1]; 1 where both sets are empty (two identical, empty sets).

    Raises:
        ValueError: shapes differ or a mask is not bool.
    """
    if a.shape != b.shape or a.dtype != torch.bool or b.dtype != torch.bool:
        raise ValueError(f"a and b must be bool masks of one shape, got {a.dtype} "
                         f"{tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    inter = (a & b).sum(dim=-1, dtype=torch.float64)
    union = (a | b).sum(dim=-1, dtype=torch.float64)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
