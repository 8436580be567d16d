"""``vllm-sparsity eval``: critical-sparsity sweeps and the regression check.

  vllm-sparsity eval sweep --model M [--url URL --api-key K] [--tasks arc_easy,piqa,...]
                           [--p-grid 1.0,0.99,...] [--target all_inputs] [--limit N] --out DIR
  vllm-sparsity eval check --results DIR/results.json --baseline FILE [--deployed-p P] [--strict]
  vllm-sparsity eval baseline --results DIR/results.json --deployed-p P --out FILE
  vllm-sparsity eval tasks [--tasks ...]      build the lm-eval tasks, print their folder
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_sparsity.eval import convert


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _tasks(text: str) -> list[str]:
    tasks = [t for t in text.split(",") if t]
    unknown = [t for t in tasks if t not in convert.TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown)}; known: "
                                         f"{', '.join(convert.TASKS)}")
    return tasks


def parser() -> argparse.ArgumentParser:
    from vllm_sparsity.eval.sweep import PAPER_GRID

    ap = argparse.ArgumentParser(prog="vllm-sparsity eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sweep", help="accuracy and measured sparsity over a grid of p")
    s.add_argument("--model", required=True,
                   help="model path; with --url, the path of its tokenizer")
    s.add_argument("--url", help="attach to this server (started with VLLM_PLUGINS=sparsity and "
                   "--sparsity-p) instead of starting one")
    s.add_argument("--api-key", help="the attached server's --api-key")
    s.add_argument("--tasks", type=_tasks, default=list(convert.TASKS),
                   help="comma-separated (default: all: %(default)s)")
    s.add_argument("--p-grid", type=_floats, default=list(PAPER_GRID),
                   help="comma-separated p values (default: the paper's grid without 0)")
    s.add_argument("--target", default="all_inputs",
                   choices=["input", "intermediate", "all_inputs"])
    s.add_argument("--limit", type=int, help="documents per task (the first N; all if unset)")
    s.add_argument("--out", type=Path, required=True, help="sweep folder (resumable)")

    c = sub.add_parser("check", help="exit 1 when results regress against a baseline")
    c.add_argument("--results", type=Path, required=True)
    c.add_argument("--baseline", type=Path, required=True)
    c.add_argument("--deployed-p", type=float, help="default: the baseline's deployed_p")
    c.add_argument("--strict", action="store_true", help="judge point estimates, not paired "
                   "intervals (for large samples)")

    b = sub.add_parser("baseline", help="write a baseline file from a sweep's results")
    b.add_argument("--results", type=Path, required=True)
    b.add_argument("--deployed-p", type=float, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--source", default="", help="how the results were produced (recorded)")

    t = sub.add_parser("tasks", help="build the lm-eval tasks and print their --include_path")
    t.add_argument("--tasks", type=_tasks, default=list(convert.TASKS))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "sweep":
        from vllm_sparsity.eval.sweep import SweepConfig, sweep

        grid = sorted(set(args.p_grid) | {1.0}, reverse=True)  # the dense point comes first
        if not all(0 < p <= 1 for p in grid):
            raise SystemExit(f"--p-grid: every p must be in (0, 1], got {args.p_grid}")
        cfg = SweepConfig(str(args.model), args.tasks, grid, args.target, args.limit)
        result = sweep(cfg, args.out, args.url, args.api_key)
        crit = result["critical_sparsity"]["average"]
        print(f"critical sparsity {crit['sparsity']} (p={crit['p']}), interval {crit['interval']}"
              f"; {args.out / 'results.json'}")
        return 0
    if args.command == "check":
        from vllm_sparsity.eval.check import check, summary

        results = json.loads(args.results.read_text())
        baseline = json.loads(args.baseline.read_text())
        failures, warnings = check(results, baseline, args.deployed_p, args.strict)
        for line in failures:
            print(f"FAIL: {line}")
        for line in warnings:
            print(f"WARN (within sampling noise): {line}")
        if not failures:
            print(summary(results, baseline, args.deployed_p))
        return 1 if failures else 0
    if args.command == "baseline":
        from vllm_sparsity.eval.check import make_baseline

        base = make_baseline(json.loads(args.results.read_text()), args.deployed_p, args.source)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(base, indent=1) + "\n")
        return 0
    print(convert.build_tasks(args.tasks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
