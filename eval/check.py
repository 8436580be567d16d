"""The regression check: a sweep's results against a committed baseline.

Fails (one line per failed criterion) when
- the results are not comparable to the baseline (other tasks, document limit or target);
- accuracy at the deployed p falls below 99% of dense (normalized average of the primary metrics);
- critical sparsity falls below the low end of the baseline's paired-bootstrap interval, less a
  small tolerance (0.01): on one machine a rerun reproduces logprobs and activation counts
  exactly, but another CPU or batch composition changes float rounding and so, slightly, the
  measured sparsity.

The accuracy criterion is the point estimate, as the paper defines it; the message gives the
paired interval too, so that a failure caused by one flipped near-tie document in a small
sample can be told from a real drop.
"""

from __future__ import annotations

import math
from pathlib import Path

from vllm_sparsity.eval.stats import THRESHOLD

TOLERANCE = 0.01  # absolute sparsity


def make_baseline(results: dict, deployed_p: float, source: str) -> dict:
    """The parts of a sweep's results.json that later sweeps are checked against."""
    if not any(math.isclose(pt["p"], deployed_p) for pt in results["points"]):
        raise ValueError(f"the results have no point at p={deployed_p}")
    return {
        "model": Path(results["model"]).name, "target": results["target"],
        "tasks": results["tasks"], "limit": results["limit"], "grid": results["grid"],
        "deployed_p": deployed_p, "source": source,
        "critical_sparsity": results["critical_sparsity"],
        "points": [{k: pt[k] for k in ("p", "sparsity", "tasks", "average",
                                       "normalized_average")} for pt in results["points"]],
    }


def check(results: dict, baseline: dict, deployed_p: float | None = None,
          tolerance: float = TOLERANCE) -> list[str]:
    """Reasons the results fail against the baseline (empty when they pass)."""
    failures = []
    for key in ("tasks", "limit", "target"):
        if results[key] != baseline[key]:
            failures.append(f"not comparable: {key} is {results[key]!r}, the baseline's is "
                            f"{baseline[key]!r}")
    p = baseline["deployed_p"] if deployed_p is None else deployed_p
    point = next((pt for pt in results["points"] if math.isclose(pt["p"], p)), None)
    if point is None:
        failures.append(f"no point at the deployed p={p:g} in the results")
    elif point["normalized_average"] < THRESHOLD:
        worst = sorted(point["normalized"].items(), key=lambda kv: kv[1])
        lo, hi = point.get("normalized_average_interval", (math.nan, math.nan))
        failures.append(
            f"accuracy at the deployed p={p:g} is {point['normalized_average']:.3f} of dense "
            f"(< {THRESHOLD}; paired 95% interval [{lo:.3f}, {hi:.3f}]) at measured sparsity "
            f"{point['sparsity']['overall']:.3f}; per task: "
            + ", ".join(f"{t} {v:.3f}" for t, v in worst))
    crit = results["critical_sparsity"]["average"]
    lo = baseline["critical_sparsity"]["average"]["interval"][0]
    value = crit["sparsity"] if crit["sparsity"] is not None else 0.0
    if value < lo - tolerance:
        failures.append(
            f"critical sparsity {value:.3f} (p={crit.get('p')}) is below the baseline's interval "
            f"[{lo:.3f}, {baseline['critical_sparsity']['average']['interval'][1]:.3f}] "
            f"(tolerance {tolerance})")
    return failures


def summary(results: dict, baseline: dict, deployed_p: float | None = None) -> str:
    p = baseline["deployed_p"] if deployed_p is None else deployed_p
    point = next(pt for pt in results["points"] if math.isclose(pt["p"], p))
    crit, base = results["critical_sparsity"]["average"], baseline["critical_sparsity"]["average"]
    return (f"ok: at the deployed p={p:g} (measured sparsity {point['sparsity']['overall']:.3f}) "
            f"accuracy is {point['normalized_average']:.3f} of dense; critical sparsity "
            f"{crit['sparsity'] or 0.0:.3f} [{crit['interval'][0]:.3f}, {crit['interval'][1]:.3f}], "
            f"baseline {base['sparsity']:.3f} [{base['interval'][0]:.3f}, "
            f"{base['interval'][1]:.3f}]")
