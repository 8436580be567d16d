"""From a sweep folder's points to ``results.json``, ``critical_sparsity.json``, ``curves.png`` and
``report.md``. lm-eval's own files (``points/p<p>/lm_eval/<model>/results_*.json`` and
``samples_<task>_*.jsonl``) are read, never rewritten.

A point's p is a number or per site (``{site: p}``, ``grid.Point``); critical sparsity is judged
on the measured sparsity of each point (``stats.paired_bootstrap``), so both kinds enter alike.
Curves are drawn against measured sparsity, and points are named with ``grid.point_name``. The
dense reference is the first point of ``grid.ordered_grid`` for the sweep's rule (p = 1.0, or for
max-p the run without the plugin, p null)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vllm_sparsity.eval import convert, registry, stats
from vllm_sparsity.eval.errors import NotComparable
from vllm_sparsity.eval.grid import ordered_grid, point_dir, point_name
from vllm_sparsity.sites import sites_of


def _one(pattern: str, folder: Path) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one {pattern} under {folder}, found {len(found)}")
    return found[0]


def _samples_file(pdir: Path, task: str) -> Path:
    # samples_<task>_<date>.jsonl; a glob alone would also match samples_<task>_cot_<date>.jsonl.
    name = re.compile(rf"samples_{re.escape(task)}_\d{{4}}-\d\d-\d\dT")
    found = [f for f in sorted(pdir.glob("lm_eval/*/samples_*.jsonl")) if name.match(f.name)]
    if len(found) != 1:
        raise FileNotFoundError(f"expected one samples_{task}_<date>.jsonl under {pdir}, found "
                                f"{len(found)}")
    return found[0]


def read_samples(path: Path, leaf: registry.Leaf) -> list[dict]:
    """lm-eval's per-document records of one task, for the leaf's filter, in doc_id order."""
    with path.open() as f:
        samples = [json.loads(line) for line in f]
    samples = [s for s in samples if s.get("filter", "none") == leaf.filter]
    return sorted(samples, key=lambda s: s["doc_id"])


def gold_loglik(sample: dict) -> float | None:
    """The log-likelihood (nats, summed over the continuation's tokens) lm-eval recorded for the
    document's gold continuation; None for a sample without one (generation, several targets).

    A log-likelihood request's ``resps`` holds one ``[loglik, is_greedy]`` per continuation: one
    for ``loglikelihood`` tasks, one per choice for ``multiple_choice`` ones, whose ``target`` is
    the gold choice's index.
    """
    resps = sample.get("resps") or []
    try:
        values = [float(r[0][0]) for r in resps]
        gold = 0 if len(values) == 1 else int(sample["target"])
        return values[gold] if values and 0 <= gold < len(values) else None
    except (TypeError, ValueError, IndexError, KeyError):
        return None


def load_point(pdir: Path, specs: list[registry.TaskSpec],
               count_tokens: Callable[[str], int] | None = None
               ) -> tuple[dict, dict[str, np.ndarray]]:
    """One finished point: its record and, per task, the primary metric per document.

    A task's documents are its leaves' documents in order (a group's subtasks pooled). Its
    reported primary metric and stderr are lm-eval's for a single task (and its other metrics for
    the built-ins); for a group, the pooled mean and its standard error over documents. For
    generative tasks, ``generated_tokens``: the mean length of the raw generations (before
    filters), counted with ``count_tokens`` (the model's tokenizer). For log-likelihood tasks,
    ``loglik``: each document's gold log-likelihood (``gold_loglik``), in document order, which
    ``check.loglik_shift`` compares pairwise with a baseline's.
    """
    point = json.loads((pdir / "point.json").read_text())
    results_file = _one("lm_eval/*/results_*.json", pdir)
    lm_results = json.loads(results_file.read_text())["results"]
    point["tasks"], point["files"], correct = {}, {"results": str(results_file)}, {}
    for spec in specs:
        values, lengths, doc_ids, logliks = [], [], [], []
        for leaf in spec.leaves:
            samples_file = _samples_file(pdir, leaf.task)
            samples = read_samples(samples_file, leaf)
            values += [float(s[leaf.metric]) for s in samples]
            doc_ids += [s["doc_id"] for s in samples]
            logliks += [gold_loglik(s) for s in samples]
            if leaf.generative and count_tokens is not None:
                lengths += [count_tokens(s["resps"][0][0]) for s in samples]
            point["files"][f"samples_{leaf.task}"] = str(samples_file)
        leaf = spec.leaves[0]
        primary = leaf.metric
        if len(spec.leaves) == 1:
            row = lm_results[leaf.task]
            metrics = (convert.TASKS[spec.name].metrics if spec.name in convert.TASKS
                       else (primary,))
            record = {}
            for m in metrics:
                record[m] = row[f"{m},{leaf.filter}"]
                stderr = row[f"{m}_stderr,{leaf.filter}"]  # "N/A" for a single document
                record[f"{m}_stderr"] = stderr if isinstance(stderr, (int, float)) else None
        else:
            v = np.array(values)
            record = {primary: float(v.mean()),
                      f"{primary}_stderr": float(v.std(ddof=1) / np.sqrt(len(v)))}
        correct[spec.name] = np.array(values, float)
        point["tasks"][spec.name] = {**record, "primary": primary, "filter": leaf.filter,
                                     "n": len(values), "doc_ids": [doc_ids[0], doc_ids[-1]]}
        if lengths:
            point["tasks"][spec.name]["generated_tokens"] = float(np.mean(lengths))
        if logliks and None not in logliks:
            point["tasks"][spec.name]["loglik"] = logliks
    return point, correct


def task_specs(out: Path, tasks: list[str]) -> list[registry.TaskSpec]:
    """The sweep's resolved tasks (``tasks.json``; older folders: the built-ins by name)."""
    if (out / "tasks.json").exists():
        return [registry.TaskSpec.from_json(d)
                for d in json.loads((out / "tasks.json").read_text())]
    return [registry.builtin(t) for t in tasks]


def token_counter(model: str) -> Callable[[str], int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build(out: Path, n_boot: int = 2000) -> dict:
    """Assemble the sweep in ``out`` (all of its finished points) and write its outputs."""
    out = out.resolve()
    cfg = json.loads((out / "sweep.json").read_text())
    tasks = cfg["tasks"]
    specs = task_specs(out, tasks)
    count = (token_counter(cfg["model"]) if any(leaf.generative for s in specs for leaf in s.leaves)
             else None)
    points, correct = [], {t: [] for t in tasks}
    grid = ordered_grid(cfg["grid"], cfg.get("rule", "top-p"))
    for p in grid:
        if (point_dir(out, p) / "point.json").exists():
            point, docs = load_point(point_dir(out, p), specs, count)
            points.append(point)
            for t in tasks:
                correct[t].append(docs[t])
    if not points or points[0]["p"] != grid[0]:
        raise ValueError(f"{out}: the dense point ({point_name(grid[0])}) is missing")
    for t in tasks:  # paired: every point must have scored the same documents
        if len({len(c) for c in correct[t]}) != 1 or len(
                {tuple(pt["tasks"][t]["doc_ids"]) for pt in points}) != 1:
            raise NotComparable(f"{out}: points scored different {t} documents")
    correct = {t: np.stack(c) for t, c in correct.items()}  # [P, N]

    dense = points[0]
    for point in points:
        prim = {t: point["tasks"][t][point["tasks"][t]["primary"]] for t in tasks}
        norm = {t: float(stats.normalize(prim[t], dense["tasks"][t][dense["tasks"][t]["primary"]]))
                for t in tasks}
        point["average"] = float(np.mean(list(prim.values())))
        point["average_by_metric"] = {
            m: float(np.mean([point["tasks"][t][m] for t in tasks if m in point["tasks"][t]]))
            for m in ("acc", "acc_norm") if any(m in point["tasks"][t] for t in tasks)}
        point["normalized"] = norm
        point["normalized_average"] = float(np.mean(list(norm.values())))

    sparsity = np.array([pt["sparsity"]["overall"] for pt in points])
    crit = stats.paired_bootstrap(correct, sparsity, dense=0, n_boot=n_boot)
    for point, interval in zip(points, crit.pop("normalized_average_intervals")):
        point["normalized_average_interval"] = interval
    by_sparsity = {pt["sparsity"]["overall"]: pt["p"] for pt in points}
    for c in [crit["average"], *crit["tasks"].values()]:
        c["p"] = by_sparsity.get(c["sparsity"])

    # What the server ran (comparable.record_serving); None for folders from before it.
    serving = (json.loads((out / "serving.json").read_text())
               if (out / "serving.json").exists() else None)
    result = {**cfg, "serving": serving, "docs": {t: int(correct[t].shape[1]) for t in tasks},
              "points": points, "critical_sparsity": crit}
    if (out / "search.json").exists():
        result["search_trace"] = json.loads((out / "search.json").read_text())
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    files = {point_dir(Path(), pt["p"]).name: {k: str(Path(v).relative_to(out))
                                               for k, v in pt["files"].items()}
             for pt in points}
    (out / "critical_sparsity.json").write_text(json.dumps(
        {"model": cfg["model"], "target": cfg["target"], "tasks": tasks, "limit": cfg["limit"],
         "rule": cfg.get("rule", "top-p"), "q": cfg.get("q"), "serving": serving,
         "critical_sparsity": crit, "lm_eval_files": files}, indent=1) + "\n")
    plot(result, out / "curves.png")
    (out / "report.md").write_text(report(result))
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(result["points"], key=lambda pt: pt["sparsity"]["overall"])
    # Points of one p for every site make the curves; a per-site point is off that axis of p, so
    # it is a marker of its own (same colour per task), named with describe_p.
    line = [pt for pt in pts if not isinstance(pt["p"], dict)]
    sites = [pt for pt in pts if isinstance(pt["p"], dict)]
    x, xs = ([pt["sparsity"]["overall"] for pt in group] for group in (line, sites))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in result["tasks"]:
        (drawn,) = ax.plot(x, [pt["normalized"][t] for pt in line], marker=".", lw=1, alpha=0.7,
                           label=t)
        ax.plot(xs, [pt["normalized"][t] for pt in sites], "d", ms=4, alpha=0.7,
                color=drawn.get_color())
    ax.plot(x, [pt["normalized_average"] for pt in line], marker="o", lw=2.5, color="black",
            label="average")
    if sites:
        ax.plot(xs, [pt["normalized_average"] for pt in sites], "D", ms=7, color="black",
                label="average, per-site p")
    for pt in sites:
        ax.annotate(point_name(pt["p"]), (pt["sparsity"]["overall"], pt["normalized_average"]),
                    textcoords="offset points", xytext=(6, -10), fontsize=6)
    ax.axhline(stats.THRESHOLD, color="grey", ls="--", lw=1, label="99% of dense")
    crit = result["critical_sparsity"]["average"]
    if crit["sparsity"] is not None:
        ax.axvline(crit["sparsity"], color="tab:red", lw=1)
        ax.axvspan(*crit["interval"], color="tab:red", alpha=0.12,
                   label=f"critical sparsity, {crit['sparsity']:.3f} "
                         f"[{crit['interval'][0]:.3f}, {crit['interval'][1]:.3f}]")
    ax.set_xlabel(f"measured sparsity ({result['target']})")
    ax.set_ylabel("accuracy / dense accuracy")
    ax.set_title(f"{Path(result['model']).name}: {result['target']}, "
                 f"{min(result['docs'].values())}+ docs per task")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _served(result: dict) -> str:
    """report.md's line naming the rule and what the server ran (``serving``)."""
    rule = result.get("rule", "top-p") + (f" (q={result['q']:g})" if result.get("q") else "")
    s = result.get("serving") or {}
    ran = ", ".join(f"{label} {s[k]}" for k, label in (
        ("dtype", "dtype"), ("device", "device"), ("vllm", "vLLM"),
        ("vllm_sparsity", "vllm-sparsity")) if s.get(k) is not None)
    return f"Rule {rule}; served with {ran or 'settings not recorded'}."


def report(result: dict) -> str:
    tasks, crit = result["tasks"], result["critical_sparsity"]
    sites = [*sites_of(result["target"]), "overall"]

    def fmt(c):
        s = "fails at the first point" if c["sparsity"] is None else f"{c['sparsity']:.3f}"
        p = "none" if c["sparsity"] is None else point_name(c.get("p"))
        return (f"{s} (p={p}), {crit['level']:.0%} interval "
                f"[{c['interval'][0]:.3f}, {c['interval'][1]:.3f}]")

    lines = [
        f"# Critical sparsity: {Path(result['model']).name}, target `{result['target']}`", "",
        _served(result), "",
        "Tasks (scored by lm-eval `local-completions`): "
        + ", ".join(f"{t} ({result['docs'][t]} docs)" for t in tasks) + ".", "",
        f"**Critical sparsity (average):** {fmt(crit['average'])}; paired bootstrap over "
        f"documents, {crit['n_boot']} resamples, threshold {crit['threshold']:.0%} of dense. "
        + convert.suite_note(tasks), "",
        "| task | critical sparsity | interval |", "|---|---|---|",
        *(f"| {t} | {fmt(crit['tasks'][t]).split(' (')[0]} | "
          f"[{crit['tasks'][t]['interval'][0]:.3f}, {crit['tasks'][t]['interval'][1]:.3f}] |"
          for t in tasks), "",
        "Per point: measured sparsity (share of activations zeroed, per site), per-task primary "
        "metric ± lm-eval stderr, average, average normalized to dense with its paired "
        "bootstrap interval, wall time of the point. " + convert.suite_note(tasks), "",
        "| p | " + " | ".join(f"sparsity {s}" for s in sites) + " | " + " | ".join(tasks)
        + " | average | normalized | wall s |",
        "|---" * (len(sites) + len(tasks) + 4) + "|",
    ]
    for pt in result["points"]:
        cells = [f"{pt['sparsity'].get(s) or 0:.3f}" for s in sites]
        cells += [f"{pt['tasks'][t][pt['tasks'][t]['primary']]:.3f} ± "
                  + _number(pt['tasks'][t][pt['tasks'][t]['primary'] + '_stderr'])
                  + (f" ({pt['tasks'][t]['generated_tokens']:.0f} tok)"
                     if "generated_tokens" in pt["tasks"][t] else "") for t in tasks]
        lo, hi = pt["normalized_average_interval"]
        lines.append(f"| {point_name(pt['p'])} | " + " | ".join(cells)
                     + f" | {pt['average']:.3f} | {pt['normalized_average']:.3f} [{lo:.3f}, "
                     f"{hi:.3f}] | {pt['wall_s']:.0f} |")
    lines += ["", "Primary metric per task: " + ", ".join(
        f"{t} {result['points'][0]['tasks'][t]['primary']}" for t in tasks)
        + " (acc_norm: log-likelihood per character). Generative tasks: mean generated tokens "
        "per document in parentheses.", ""]
    if "search_trace" in result:  # ("search" is the sweep's setting)
        sr = result["search_trace"]
        width = sr["bracket"]["width"]
        lines += [f"**Search:** bisection over the grid, {sr['points']} points scored in this "
                  f"order: " + ", ".join(f"p={point_name(t['p'])} "
                                         f"{'pass' if t['passes'] else 'fail'}"
                                         + (" (within noise)" if t["within_noise"] else "")
                                         for t in sr["trace"])
                  + f"; stopped: {sr['stopped']} (sparsity bracket {sr['tol']}, budget "
                  f"{sr['max_points']}); "
                  f"critical p={point_name(sr['critical']['p'])}, bracket to p="
                  f"{'none' if sr['bracket']['fail_p'] is None else sr['bracket']['fail_p']}"
                  + ("" if width is None else f", width {width:.3f} of sparsity") + ".", ""]
    return "\n".join(lines)
