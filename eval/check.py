"""The regression check: a sweep's results against a committed baseline.

Refuses (``ValueError``) results that are not comparable to the baseline (other tasks, document
limit or target). Fails (one line per failed criterion) when
- accuracy at the deployed p is below 99% of dense (normalized average of the primary metrics);
- critical sparsity is below the baseline's paired-bootstrap interval.

By default both are judged with the paired bootstrap intervals, so that sampling noise does not
fail the job: accuracy fails when even the upper end of its interval is below 0.99; critical
sparsity fails when even the upper end of its interval is below the low end of the baseline's.
Why: at CI sizes (40 documents a task) one flipped near-tie document moves the average by 1-3%,
and sparse points are not bit-reproducible between server runs (at p = 0.95 on the demo model two
runs differed by up to 3.5 nats in a document's log-likelihood and by one document per task). A
point estimate past a limit while the interval still reaches it is reported as a warning.
``strict=True`` judges the point estimates instead: right for large samples, where the intervals
are tight.

Sparsity comparisons allow ``TOLERANCE``: the same p measured 0.3508 and 0.3512 in two runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from vllm_sparsity.eval.stats import THRESHOLD

TOLERANCE = 0.01  # absolute sparsity
COMPARED = ("tasks", "limit", "target")  # what must match between results and baseline
RESULTS_KEYS = ("model", "tasks", "limit", "target", "points", "critical_sparsity")


def _read(path: Path, flag: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"{flag} {path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"{flag} {path}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{flag} {path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_results(path: Path, flag: str = "--results") -> dict:
    """A sweep's ``results.json``; a baseline or any other file given instead exits with one
    sentence naming ``flag`` (``SystemExit``)."""
    data = _read(path, flag)
    if "deployed_p" in data:
        raise SystemExit(f"{flag} {path} is a baseline (it has 'deployed_p'), not a sweep's "
                         "results: pass the results.json that `vllm-sparsity eval sweep --out DIR` "
                         "wrote in DIR")
    missing = [k for k in RESULTS_KEYS if k not in data]
    if missing:
        raise SystemExit(f"{flag} {path} is not a sweep's results.json (it has no "
                         f"{', '.join(map(repr, missing))})")
    return data


def read_baseline(path: Path, flag: str = "--baseline") -> dict:
    """A baseline written by ``make_baseline``; a results file or any other file given instead
    exits with one sentence naming ``flag`` (``SystemExit``)."""
    data = _read(path, flag)
    if "deployed_p" not in data:
        if all(k in data for k in RESULTS_KEYS):
            raise SystemExit(f"{flag} {path} is a sweep's results file, not a baseline (it has no "
                             f"'deployed_p'): make one with `vllm-sparsity eval baseline --results "
                             f"{path} --deployed-p P --out BASELINE.json`")
        raise SystemExit(f"{flag} {path} is not a baseline (it has no 'deployed_p'); baselines "
                         "are written by `vllm-sparsity eval baseline`")
    missing = [k for k in (*COMPARED, "critical_sparsity") if k not in data]
    if missing:
        raise SystemExit(f"{flag} {path} is not a baseline (it has no "
                         f"{', '.join(map(repr, missing))})")
    return data


def differences(results: dict, baseline: dict) -> list[str]:
    """The settings that make results and baseline incomparable, one phrase each."""
    return [f"{key} {results[key]!r} where the baseline has {baseline[key]!r}"
            for key in COMPARED if results[key] != baseline[key]]


def make_baseline(results: dict, deployed_p: float, source: str) -> dict:
    """The parts of a sweep's results.json that later sweeps are checked against."""
    if not any(math.isclose(pt["p"], deployed_p) for pt in results["points"]):
        raise ValueError(f"the results have no point at p={deployed_p}")
    return {
        "model": Path(results["model"]).name, "target": results["target"],
        "tasks": results["tasks"], "limit": results["limit"], "grid": results["grid"],
        "deployed_p": deployed_p, "source": source,
        "critical_sparsity": results["critical_sparsity"],
        "points": [{k: pt[k] for k in ("p", "sparsity", "tasks", "average", "normalized_average",
                                       "normalized_average_interval")}
                   for pt in results["points"]],
    }


def check(results: dict, baseline: dict, deployed_p: float | None = None, strict: bool = False,
          tolerance: float = TOLERANCE) -> tuple[list[str], list[str]]:
    """(failures, warnings) of the results against the baseline; no failures means it passes.

    Raises:
        ValueError: the results are not comparable to the baseline (``differences``).
    """
    failures, warnings = [], []
    if diff := differences(results, baseline):
        raise ValueError("the results are not comparable to the baseline: " + "; ".join(diff))
    p = baseline["deployed_p"] if deployed_p is None else deployed_p
    point = next((pt for pt in results["points"] if math.isclose(pt["p"], p)), None)
    if point is None:
        failures.append(f"no point at the deployed p={p:g} in the results")
    elif point["normalized_average"] < THRESHOLD:
        lo, hi = point["normalized_average_interval"]
        line = (f"accuracy at the deployed p={p:g} is {point['normalized_average']:.3f} of dense "
                f"(paired 95% interval [{lo:.3f}, {hi:.3f}]; limit {THRESHOLD}) at measured "
                f"sparsity {point['sparsity']['overall']:.3f}; per task: "
                + ", ".join(f"{t} {v:.3f}" for t, v in sorted(point["normalized"].items(),
                                                             key=lambda kv: kv[1])))
        (failures if strict or hi < THRESHOLD else warnings).append(line)

    crit, base = results["critical_sparsity"]["average"], baseline["critical_sparsity"]["average"]
    value = crit["sparsity"] if crit["sparsity"] is not None else 0.0
    if value < base["interval"][0] - tolerance:
        line = (f"critical sparsity {value:.3f} (p={crit.get('p')}, interval "
                f"[{crit['interval'][0]:.3f}, {crit['interval'][1]:.3f}]) is below the baseline's "
                f"interval [{base['interval'][0]:.3f}, {base['interval'][1]:.3f}] "
                f"(tolerance {tolerance})")
        significant = crit["interval"][1] < base["interval"][0] - tolerance
        (failures if strict or significant else warnings).append(line)
    return failures, warnings


def summary(results: dict, baseline: dict, deployed_p: float | None = None) -> str:
    p = baseline["deployed_p"] if deployed_p is None else deployed_p
    point = next(pt for pt in results["points"] if math.isclose(pt["p"], p))
    crit, base = results["critical_sparsity"]["average"], baseline["critical_sparsity"]["average"]
    lo, hi = point["normalized_average_interval"]
    return (f"ok: at the deployed p={p:g} (measured sparsity {point['sparsity']['overall']:.3f}) "
            f"accuracy is {point['normalized_average']:.3f} of dense [{lo:.3f}, {hi:.3f}]; "
            f"critical sparsity {crit['sparsity'] or 0.0:.3f} [{crit['interval'][0]:.3f}, "
            f"{crit['interval'][1]:.3f}], baseline {base['sparsity']:.3f} "
            f"[{base['interval'][0]:.3f}, {base['interval'][1]:.3f}]")
