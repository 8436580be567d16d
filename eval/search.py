"""Adaptive search for the critical sparsity: bisection over a grid of p instead of every point.

The grid's answer (``stats.critical``) is the most sparse point whose normalized average accuracy
(accuracy / dense accuracy on the same documents, averaged over tasks) is >= 0.99. Where that holds
for every point less sparse than some point and fails beyond it (pass/fail monotone in sparsity),
bisection finds the same point in about log2(len(grid)) + 2 points: the rule's dense point
(``grid.dense_p``: p = 1.0, or for max-p the run without the plugin; passes by definition), the
grid's sparsest point (its lowest p, or its highest for max-p: ``grid.sparser_as_p_rises``; fails,
or the search ends there: every point passes), then the middle of the bracket (last passing,
first failing) until

- the two are neighbours on the grid (``adjacent``);
- the measured sparsity between them is below ``tol`` (``tolerance``): the answer is known to
  within ``tol`` of sparsity, and the passing end is returned;
- ``max_points`` points were measured (``budget``): the passing end is returned, with the width
  of the bracket still open;
- or the sparsest point passes (``sparsest_passes``).

Each point is judged as the grid judges it: its normalized average against 0.99 (point estimate,
so that the search and the grid define critical sparsity alike). The paired bootstrap that gives
the grid its interval also gives each judged point an interval of its normalized average (the same
document draws for dense and point); a decision whose interval contains 0.99 is marked
``within_noise``. When noise makes pass/fail non-monotone, bisection returns a passing point next
to a failing one (a local boundary): every point the grid holds between the two ends is never
measured, so a more sparse passing point elsewhere, which the grid would report, can be missed.
The trace (every point in order, with its decision) shows where this may have happened.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vllm_sparsity.eval import stats
from vllm_sparsity.eval.grid import check_order


def judge(dense: dict[str, np.ndarray], point: dict[str, np.ndarray], n_boot: int = 2000,
          level: float = 0.95, seed: int = 0, threshold: float = stats.THRESHOLD) -> dict:
    """One point against the dense point on the same documents.

    Args:
        dense, point: task -> [N_task] per-document primary metric (same documents, same order).

    Returns:
        ``{"normalized_average", "interval": [lo, hi], "passes", "within_noise"}``.
    """
    correct = {t: np.stack([dense[t], point[t]]) for t in dense}
    norm = float(stats.normalized(correct, 0)[1][1])
    weights = stats.draw_weights({t: c.shape[1] for t, c in correct.items()}, n_boot, seed)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats.normalized(correct, 0, weights)[1][1], [tail, 100 - tail])
    return {"normalized_average": norm, "interval": [float(lo), float(hi)],
            "passes": norm >= threshold, "within_noise": bool(lo < threshold <= hi)}


def bisect(grid: list[float | None],
           measure: Callable[[float | None], tuple[float, dict[str, np.ndarray]]],
           tol: float = 0.02, max_points: int | None = None, rule: str = "top-p",
           **judge_kw) -> dict:
    """Search ``grid`` for the critical point.

    Args:
        grid: p values as ``grid.ordered_grid`` orders them for ``rule``: its dense point first
            (1.0, or ``grid.DENSE`` (None) for max-p), then sparsity growing along it (descending
            p; ascending for max-p).
        measure: p -> (measured sparsity overall, task -> [N_task] per-document primary metric).
        tol: stop when the bracket's measured sparsity width is below this (absolute, 0..1).
        max_points: the budget of measured points, dense included (>= 2); None: no limit.
        rule: the server's rule (a key of ``rule.RULES``): which point is dense, which way
            sparsity grows.

    Returns:
        ``{"trace": [...], "critical": {"p", "sparsity"}, "bracket": {"pass_p", "fail_p",
        "width"}, "stopped": reason, "points": n}``; ``trace`` lists the points in the order
        measured with their decisions (``judge``'s fields plus ``p``, ``sparsity``).

    Raises:
        ValueError: a grid not ordered for ``rule`` (``grid.check_order``); ``tol`` or
            ``max_points`` out of range.
    """
    check_order(grid, rule)
    if not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    if max_points is not None and max_points < 2:
        raise ValueError(f"max_points must be >= 2 (the dense and one sparse point), got "
                         f"{max_points}")
    trace, sparsity = [], {}
    dense_sparsity, dense = measure(grid[0])
    sparsity[0] = dense_sparsity
    trace.append({"p": grid[0], "sparsity": dense_sparsity, "normalized_average": 1.0,
                  "interval": [1.0, 1.0], "passes": True, "within_noise": False})

    def visit(i: int) -> bool:
        s, docs = measure(grid[i])
        sparsity[i] = s
        trace.append({"p": grid[i], "sparsity": s, **judge(dense, docs, **judge_kw)})
        return trace[-1]["passes"]

    good, bad, stopped = 0, None, None
    if len(grid) == 1:
        stopped = "adjacent"
    elif visit(len(grid) - 1):
        good, stopped = len(grid) - 1, "sparsest_passes"
    else:
        bad = len(grid) - 1
    while stopped is None:
        if bad - good <= 1:
            stopped = "adjacent"
        elif sparsity[bad] - sparsity[good] < tol:
            stopped = "tolerance"
        elif max_points is not None and len(trace) >= max_points:
            stopped = "budget"
        else:
            mid = (good + bad) // 2
            if visit(mid):
                good = mid
            else:
                bad = mid
    return {"trace": trace, "points": len(trace), "stopped": stopped, "tol": tol,
            "max_points": max_points,
            "critical": {"p": grid[good], "sparsity": sparsity[good]},
            "bracket": {"pass_p": grid[good], "fail_p": None if bad is None else grid[bad],
                        "width": None if bad is None else sparsity[bad] - sparsity[good]}}
