"""The regression check: a sweep's results against a committed baseline.

Refuses (``errors.NotComparable``, exit 3) results that are not comparable to the baseline:
other tasks, document limit, target, model, dtype, device, rule, q, vLLM or plugin version
(``comparable.py``; a field a file does not record is not compared, with a warning). Fails (one
line per failed criterion, exit 1) when
- accuracy at the deployed p is below 99% of dense (normalized average of the primary metrics);
- critical sparsity is below the baseline's paired-bootstrap interval;
- the log-likelihood of the gold continuations at the deployed p dropped (``loglik_shift``).

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

The log-likelihood comparison is the sharper signal: accuracy over a CI sample moves in steps of
one document, while every document's gold log-likelihood (lm-eval's samples carry it) moves with
any change of the model's numbers. Per document, the results' value at the deployed p minus the
baseline's at the same p, the same document; per task their mean; the tasks' average, with a
paired bootstrap interval (``stats.mean_shift``, 99%: a rerun whose sparse points differ by
rounding is symmetric noise and should fire at most 0.5% of the time). It fails when even the
upper end of that interval is below ``-loglik_tol`` nats per document (strict or not: a point
estimate of it is never 0 for sparse reruns). An identical rerun gives 0 in every resample, so it
never fires. Generative tasks carry no log-likelihood and are left out of it; a baseline or
results file without per-document log-likelihoods (made before they were recorded) gives a
warning instead. ``summary`` also prints what the deployed p costs against dense in the same
results (``sparsity_cost``): the scale to choose ``loglik_tol`` against (eval/README.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from vllm_sparsity.config import describe_p
from vllm_sparsity.eval import comparable
from vllm_sparsity.eval.errors import NotComparable, UsageError
from vllm_sparsity.eval.stats import THRESHOLD, mean_shift

TOLERANCE = 0.01  # absolute sparsity
LOGLIK_LEVEL = 0.99  # the log-likelihood shift's bootstrap interval (see the module docstring)
COMPARED = ("tasks", "limit", "target")  # a baseline holds at least these (comparable.py: more)
RESULTS_KEYS = ("model", "tasks", "limit", "target", "points", "critical_sparsity")


def _read(path: Path, flag: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{flag} {path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_results(path: Path, flag: str = "--results") -> dict:
    """A sweep's ``results.json``; a baseline or any other file given instead exits with one
    sentence naming ``flag`` (``errors.UsageError``)."""
    data = _read(path, flag)
    if "deployed_p" in data:
        raise UsageError(f"{flag} {path} is a baseline (it has 'deployed_p'), not a sweep's "
                         "results: pass the results.json that `vllm-sparsity eval sweep --out DIR` "
                         "wrote in DIR")
    missing = [k for k in RESULTS_KEYS if k not in data]
    if missing:
        raise UsageError(f"{flag} {path} is not a sweep's results.json (it has no "
                         f"{', '.join(map(repr, missing))})")
    return data


def read_baseline(path: Path, flag: str = "--baseline") -> dict:
    """A baseline written by ``make_baseline``; a results file or any other file given instead
    exits with one sentence naming ``flag`` (``errors.UsageError``)."""
    data = _read(path, flag)
    if "deployed_p" not in data:
        if all(k in data for k in RESULTS_KEYS):
            raise UsageError(f"{flag} {path} is a sweep's results file, not a baseline (it has no "
                             f"'deployed_p'): make one with `vllm-sparsity eval baseline --results "
                             f"{path} --deployed-p P --out BASELINE.json`")
        raise UsageError(f"{flag} {path} is not a baseline (it has no 'deployed_p'); baselines "
                         "are written by `vllm-sparsity eval baseline`")
    missing = [k for k in (*COMPARED, "critical_sparsity") if k not in data]
    if missing:
        raise UsageError(f"{flag} {path} is not a baseline (it has no "
                         f"{', '.join(map(repr, missing))})")
    return data


def same_p(a: float | dict[str, float], b: float | dict[str, float]) -> bool:
    """Whether two points' p are the same: two numbers, or two per-site p naming the same sites,
    equal to float rounding (``math.isclose``); a number never equals a per-site p; the dense
    reference of max-p (p None, ``grid.DENSE``) equals only itself."""
    if a is None or b is None:
        return a is b
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and set(a) == set(b)
                and all(math.isclose(a[site], b[site]) for site in a))
    return math.isclose(a, b)


def make_baseline(results: dict, deployed_p: float | dict[str, float], source: str) -> dict:
    """The parts of a sweep's results.json that later sweeps are checked against; ``deployed_p``
    (a number or per site) must be the p of one of its points (``same_p``), else ValueError."""
    if not any(same_p(pt["p"], deployed_p) for pt in results["points"]):
        raise ValueError(f"the results have no point at p={describe_p(deployed_p)}")
    return {
        "model": Path(results["model"]).name, "target": results["target"],
        "tasks": results["tasks"], "limit": results["limit"], "grid": results["grid"],
        **{k: results[k] for k in ("rule", "q", "serving") if k in results},
        "deployed_p": deployed_p, "source": source,
        "critical_sparsity": results["critical_sparsity"],
        "points": [{k: pt[k] for k in ("p", "sparsity", "tasks", "average", "normalized_average",
                                       "normalized_average_interval")}
                   for pt in results["points"]],
    }


def _at(points: list[dict], p: float | dict[str, float]) -> dict | None:
    return next((pt for pt in points if same_p(pt["p"], p)), None)


def _loglik_diff(a: dict, b: dict, tasks: list[str], names: tuple[str, str]) -> dict:
    """task -> [N] per-document gold log-likelihood of point ``a`` minus point ``b`` (tasks that
    carry it on both). NotComparable when a task's two points hold different numbers of
    documents (``names``: the two sides, for the message)."""
    diff = {}
    for t in tasks:
        r, q = a["tasks"].get(t, {}).get("loglik"), b["tasks"].get(t, {}).get("loglik")
        if r is None or q is None:
            continue
        if len(r) != len(q):
            raise NotComparable(f"task {t} has {len(r)} documents in the {names[0]} and {len(q)} "
                                f"in the {names[1]}")
        diff[t] = np.asarray(r, float) - np.asarray(q, float)
    return diff


def loglik_shift(results: dict, baseline: dict, p: float | dict[str, float], n_boot: int = 2000,
                 level: float = LOGLIK_LEVEL) -> dict | None:
    """Paired per-document gold log-likelihood (nats) of the results minus the baseline's, both
    at ``p``: ``stats.mean_shift``'s dict plus ``p``; None when either side has no point at ``p``
    or no task with per-document log-likelihoods at it.

    Raises:
        NotComparable: a task whose two runs hold different numbers of documents.
    """
    rp, bp = _at(results["points"], p), _at(baseline["points"], p)
    if rp is None or bp is None:
        return None
    diff = _loglik_diff(rp, bp, results["tasks"], ("results", "baseline"))
    return {"p": p, **mean_shift(diff, n_boot, level)} if diff else None


def sparsity_cost(results: dict, p: float | dict[str, float], n_boot: int = 2000,
                  level: float = LOGLIK_LEVEL) -> dict | None:
    """What the point at ``p`` costs in gold log-likelihood against the dense point (p = 1.0) of
    the same results, paired per document (nats, ``stats.mean_shift``'s dict); None without both
    points or per-document log-likelihoods. The scale ``--loglik-tol`` is chosen against."""
    rp, dense = _at(results["points"], p), _at(results["points"], 1.0)
    if rp is None or dense is None:
        return None
    diff = _loglik_diff(rp, dense, results["tasks"], ("point", "dense point"))
    return mean_shift(diff, n_boot, level) if diff else None


def check(results: dict, baseline: dict, deployed_p: float | dict[str, float] | None = None,
          strict: bool = False, tolerance: float = TOLERANCE, loglik_tol: float = 0.0
          ) -> tuple[list[str], list[str]]:
    """(failures, warnings) of the results against the baseline; no failures means it passes.
    ``deployed_p`` (default the baseline's): a number or per site, matched with ``same_p``.

    Raises:
        NotComparable: the results are not comparable to the baseline (``comparable.refuse``,
            whose warnings about fields a side does not record are its caller's to print).
    """
    failures, warnings = [], []
    comparable.refuse(results, baseline, "the results and the baseline")
    p = baseline["deployed_p"] if deployed_p is None else deployed_p
    point = _at(results["points"], p)
    if point is None:
        failures.append(f"no point at the deployed p={describe_p(p)} in the results")
    elif point["normalized_average"] < THRESHOLD:
        lo, hi = point["normalized_average_interval"]
        line = (f"accuracy at the deployed p={describe_p(p)} is "
                f"{point['normalized_average']:.3f} of dense (paired 95% interval [{lo:.3f}, "
                f"{hi:.3f}]; limit {THRESHOLD}) at measured sparsity "
                f"{point['sparsity']['overall']:.3f}; per task: "
                + ", ".join(f"{t} {v:.3f}" for t, v in sorted(point["normalized"].items(),
                                                             key=lambda kv: kv[1])))
        (failures if strict or hi < THRESHOLD else warnings).append(line)

    crit, base = results["critical_sparsity"]["average"], baseline["critical_sparsity"]["average"]
    value = crit["sparsity"] if crit["sparsity"] is not None else 0.0
    if value < base["interval"][0] - tolerance:
        p_crit = crit.get("p")
        line = (f"critical sparsity {value:.3f} (p="
                f"{describe_p(p_crit) if isinstance(p_crit, dict) else p_crit}, interval "
                f"[{crit['interval'][0]:.3f}, {crit['interval'][1]:.3f}]) is below the baseline's "
                f"interval [{base['interval'][0]:.3f}, {base['interval'][1]:.3f}] "
                f"(tolerance {tolerance})")
        significant = crit["interval"][1] < base["interval"][0] - tolerance
        (failures if strict or significant else warnings).append(line)

    shift = loglik_shift(results, baseline, p) if point is not None else None
    if shift is None and point is not None:
        warnings.append(f"no per-document log-likelihoods at p={describe_p(p)} in both the "
                        "results and the baseline (generative tasks only, or a file from before "
                        "they were recorded): the log-likelihood comparison was skipped")
    elif shift is not None and shift["interval"][1] < -loglik_tol:
        lo, hi = shift["interval"]
        failures.append(
            f"gold log-likelihood at the deployed p={describe_p(p)} is {shift['shift']:+.3f} "
            f"nats per document against the baseline's same documents (paired "
            f"{shift['level']:.0%} interval [{lo:+.3f}, {hi:+.3f}]; limit {-loglik_tol:+g}); "
            "per task: "
            + ", ".join(f"{t} {v:+.3f}" for t, v in sorted(shift["tasks"].items(),
                                                            key=lambda kv: kv[1])))
    return failures, warnings


def summary(results: dict, baseline: dict, deployed_p: float | dict[str, float] | None = None
            ) -> str:
    p = baseline["deployed_p"] if deployed_p is None else deployed_p
    point = _at(results["points"], p)
    crit, base = results["critical_sparsity"]["average"], baseline["critical_sparsity"]["average"]
    lo, hi = point["normalized_average_interval"]
    shift = loglik_shift(results, baseline, p)
    cost = sparsity_cost(results, p)
    ll = ("" if shift is None else f"; gold log-likelihood {shift['shift']:+.3f} nats per "
          f"document [{shift['interval'][0]:+.3f}, {shift['interval'][1]:+.3f}] against the "
          "baseline")
    ll += ("" if cost is None else f"; the deployed p costs {cost['shift']:+.3f} nats per "
           f"document [{cost['interval'][0]:+.3f}, {cost['interval'][1]:+.3f}] against dense")
    return (f"ok: at the deployed p={describe_p(p)} (measured sparsity "
            f"{point['sparsity']['overall']:.3f}) "
            f"accuracy is {point['normalized_average']:.3f} of dense [{lo:.3f}, {hi:.3f}]; "
            f"critical sparsity {crit['sparsity'] or 0.0:.3f} [{crit['interval'][0]:.3f}, "
            f"{crit['interval'][1]:.3f}], baseline {base['sparsity']:.3f} "
            f"[{base['interval'][0]:.3f}, {base['interval'][1]:.3f}]{ll}")
