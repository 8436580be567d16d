"""``vllm-sparsity eval``: critical-sparsity sweeps and the regression check.

  vllm-sparsity eval sweep --model M [--url URL --api-key K] [--tasks arc_easy,piqa,gsm8k,mmlu,...]
                           [--include-path DIR] [--p-grid 1.0,0.99,... [input=0.95,...] ...]
                           [--target all_inputs] [--rule top-p|top-k|max-p|lq [--q Q]]
                           [--dense-url URL]
                           [--limit N] [--search [--sparsity-bracket 0.02] [--max-points N]]
                           [--p-mode auto|request|global] [--dtype auto|float32|...] --out DIR
  vllm-sparsity eval check --results DIR/results.json --baseline FILE [--deployed-p P] [--strict]
                           [--loglik-tol NATS]
  vllm-sparsity eval baseline --results DIR/results.json --deployed-p P --out FILE
  vllm-sparsity eval tasks [--tasks ...]      build the lm-eval tasks, print their folder

Exit status: 0 ok, 1 regressed (check only), 2 usage or bad input, 3 not comparable, 4 server or
scoring failed, 5 unexpected error; each command's --help lists its own (eval/errors.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_sparsity.config import (RULES, SparsityConfigError, check_together, describe_p,
                                  parse_p_sites, parse_target)
from vllm_sparsity.eval import convert
from vllm_sparsity.eval.errors import ExitCode, NotComparable, UsageError, epilog, run
from vllm_sparsity.eval.server import DTYPES

PROG = "vllm-sparsity eval"


def parse_grid(values: list[str], name: str = "--p-grid") -> list[float | dict[str, float]]:
    """The points of ``--p-grid``'s arguments: each a comma list of numbers (``1.0,0.9``) or one
    per-site point (``input=0.95,intermediate=0.85``), in ``--sparsity-p``'s syntax
    (``config.parse_p_sites``). Raises SparsityConfigError naming ``name``."""
    points = []
    for value in values:
        if "=" in value:
            points.append(parse_p_sites(value, name))
        else:
            points += [parse_p_sites(x.strip(), name) for x in value.split(",") if x.strip()]
    if not points:
        raise SparsityConfigError(f"{name} must give at least one p, got {values}")
    return points


def deployed_p(value: str) -> float | dict[str, float]:
    """``--deployed-p``: a number or a per-site p, as ``--p-grid`` takes them (argparse type)."""
    try:
        return parse_p_sites(value, "--deployed-p")
    except SparsityConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _names(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _tasks(text: str) -> list[str]:
    tasks = _names(text)
    unknown = [t for t in tasks if t not in convert.TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown)}; known: "
                                         f"{', '.join(convert.TASKS)}")
    return tasks


def target_arg(value: str) -> str:
    try:
        return parse_target(value, "--target")
    except SparsityConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class Renamed(argparse.Action):
    """A flag that was renamed: using it is a usage error (exit 2) naming the new flag and why."""

    def __init__(self, option_strings, dest, new: str, why: str, **kw):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", help=argparse.SUPPRESS)
        self.new, self.why = new, why

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed {self.new}: {self.why}")


def parser() -> argparse.ArgumentParser:
    from vllm_sparsity.eval.grid import P_MODES

    raw = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=raw)
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, epilog=epilog(name),
                              formatter_class=raw)

    s = command("sweep", "accuracy and measured sparsity over a grid of p")
    s.add_argument("--model", required=True,
                   help="model path; with --url, the path of its tokenizer")
    s.add_argument("--url", help="attach to this server (started with VLLM_PLUGINS=sparsity and "
                   "--sparsity-p) instead of starting one")
    s.add_argument("--api-key", help="the attached server's --api-key")
    s.add_argument("--dense-url", help="--rule max-p with --url: a server of the same model "
                   "without sparsity (no --sparsity-p), which scores the dense reference (max-p "
                   "keeps everything only at p = 0, outside the plugin's range); same --api-key")
    s.add_argument("--tasks", type=_names, default=list(convert.DEFAULT_TASKS),
                   help="comma-separated: built-in offline tasks (" + ", ".join(convert.TASKS)
                   + "), any lm-eval task or group, or tasks of --include-path (default: the "
                   "offline log-likelihood suite: %(default)s)")
    s.add_argument("--include-path", type=Path,
                   help="a folder of your own lm-eval task YAMLs (lm-eval's --include_path)")
    s.add_argument("--p-grid", nargs="+", metavar="P",
                   help="the points: comma lists of p (one p for every site of --target) and/or "
                   "per-site points, one per argument, written as --sparsity-p takes them "
                   "(input=0.95,intermediate=0.85; exactly the sites of --target; run through "
                   "POST /v1/sparsity, so not with --p-mode request or --search); the rule's "
                   "dense point is always added: p = 1.0 for top-p, top-k and lq; for max-p, "
                   "where p = 1.0 is the sparsest point, a run without the plugin (default: the "
                   "paper's grid of the rule: see eval/README.md)")
    s.add_argument("--target", default="all_inputs", type=target_arg,
                   help="input, intermediate, all_inputs (default) or a comma list of the sites "
                   "input, gate, up, intermediate")
    s.add_argument("--rule", default="top-p", choices=list(RULES),
                   help="the rule the server runs (default: %(default)s); p is its parameter")
    s.add_argument("--q", type=float, help="the exponent of the lq rule (lq only)")
    s.add_argument("--limit", type=int, help="documents per task (the first N; all if unset)")
    s.add_argument("--out", type=Path, required=True, help="sweep folder (resumable)")
    s.add_argument("--p-mode", choices=list(P_MODES), default="auto",
                   help="request: every request carries its point's p (vllm_xargs.sparsity_p), "
                   "all points score at once and the server's own p and target stay as they are "
                   "(its target must be --target); global: one point at a time, the server's p "
                   "set through POST /v1/sparsity (nothing else may use the server meanwhile); "
                   "auto (default): request where the server applies a request's p "
                   "(GET /v1/sparsity says so), else global")
    s.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype of the server the "
                   "sweep starts (not with --url); auto (default): float32 on an x86 CPU without "
                   "AVX-512-BF16 or AMX (2x faster there, twice the weights' memory), else the "
                   "checkpoint's")
    s.add_argument("--search", action="store_true", help="bisect over --p-grid for the critical "
                   "point instead of scoring every p (see eval/search.py)")
    s.add_argument("--sparsity-bracket", type=float, default=0.02, metavar="WIDTH",
                   help="--search: stop when the last passing and the first failing point lie "
                   "less than WIDTH apart in measured sparsity (absolute share of activations "
                   "zeroed, in (0, 1)); the critical sparsity is then known to within WIDTH. Not "
                   "an accuracy tolerance: the accuracy criterion is always >= 99%% of dense "
                   "(default: %(default)s)")
    s.add_argument("--tol", action=Renamed, new="--sparsity-bracket", why="the search's stopping "
                   "width in measured sparsity, not an accuracy tolerance")
    s.add_argument("--max-points", type=int, help="--search: at most this many points scored, "
                   "the dense one included (default: no limit)")

    c = command("check", "judge a sweep's results against a baseline: exit 1 when they regress, "
                "3 when the two are not comparable")
    c.add_argument("--results", type=Path, required=True, help="the results.json of the sweep "
                   "to judge (`eval sweep --out DIR` writes DIR/results.json)")
    c.add_argument("--baseline", type=Path, required=True, help="baseline JSON to judge against "
                   "(as `eval baseline --out` wrote it)")
    c.add_argument("--deployed-p", type=deployed_p, help="the p (a number, or per site as in "
                   "--p-grid) whose point is judged (default: the baseline's deployed_p)")
    c.add_argument("--strict", action="store_true", help="judge point estimates, not paired "
                   "intervals (for large samples)")
    c.add_argument("--loglik-tol", type=float, default=0.0, metavar="NATS",
                   help="fail when the paired 99%% interval of the gold log-likelihood's change "
                   "at the deployed p (results minus baseline, mean over documents) lies below "
                   "-NATS per document (default: %(default)s: any loss the interval resolves). "
                   "Choose it from the numbers an ok check prints: keep 0 unless reruns of "
                   "unchanged code on your runners give intervals wholly below 0 (a systematic "
                   "shift between runners), then just above the largest magnitude of their upper "
                   "ends; and well below what the deployed p costs against dense (a tenth of it "
                   "accepts losses under 10%% of the sparsity's own cost); see eval/README.md")

    b = command("baseline", "write a baseline file from a sweep's results")
    b.add_argument("--results", type=Path, required=True, help="the results.json of the sweep "
                   "the baseline is taken from (`eval sweep --out DIR` writes DIR/results.json)")
    b.add_argument("--deployed-p", type=deployed_p, required=True,
                   help="the p deployed (a number, or per site as in --p-grid): a point of the "
                   "results")
    b.add_argument("--out", type=Path, required=True, help="baseline JSON file to write")
    b.add_argument("--source", default="", help="how the results were produced (recorded)")

    t = command("tasks", "build the lm-eval tasks and print their --include_path")
    t.add_argument("--tasks", type=_tasks, default=list(convert.TASKS), help="built-in tasks")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (``errors.ExitCode``: errors print one sentence on
    stderr). argparse's usage errors and --help exit through SystemExit (2, 0)."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run(lambda: _run(args), PROG)


def _run(args: argparse.Namespace) -> int:
    if args.command == "sweep":
        from vllm_sparsity.eval.grid import PAPER_GRIDS, SweepConfig, ordered_grid, point_name
        from vllm_sparsity.eval.sweep import sweep

        try:
            grid = ordered_grid(parse_grid(args.p_grid) if args.p_grid
                                else list(PAPER_GRIDS[args.rule]), args.rule)
        except SparsityConfigError as e:
            raise UsageError(str(e)) from None
        if not 0 < args.sparsity_bracket < 1:
            raise UsageError(f"--sparsity-bracket: a width of measured sparsity in (0, 1), got "
                             f"{args.sparsity_bracket}")
        if args.max_points is not None and args.max_points < 2:
            raise UsageError(f"--max-points: at least 2 (the dense and one sparse point), got "
                             f"{args.max_points}")
        include = str(args.include_path.resolve()) if args.include_path else None
        try:
            check_together(1.0, args.target, "auto", args.rule, args.q,
                           lambda field: f"--{field}")
        except SparsityConfigError as e:
            raise UsageError(str(e)) from None
        cfg = SweepConfig(str(args.model), args.tasks, grid, args.target, args.limit, include,
                          args.search, args.sparsity_bracket, args.max_points, args.rule, args.q,
                          args.dtype)
        result = sweep(cfg, args.out, args.url, args.api_key, mode=args.p_mode,
                       dense_url=args.dense_url)
        crit = result["critical_sparsity"]["average"]
        p = "none" if crit["sparsity"] is None else point_name(crit["p"])
        print(f"critical sparsity {crit['sparsity']} (p={p}), interval {crit['interval']}"
              f"; {args.out / 'results.json'}")
        if "search_trace" in result:
            sr = result["search_trace"]
            print(f"search: {sr['points']} points, stopped: {sr['stopped']}, bracket p "
                  f"{point_name(sr['bracket']['pass_p'])} (pass) .. {sr['bracket']['fail_p']} "
                  "(fail)")
        return 0
    if args.command == "check":
        from vllm_sparsity.eval import comparable
        from vllm_sparsity.eval.check import check, read_baseline, read_results, summary

        if args.loglik_tol < 0:
            raise UsageError(f"--loglik-tol: nats per document, >= 0, got {args.loglik_tol}")
        results, baseline = read_results(args.results), read_baseline(args.baseline)
        unrecorded = comparable.refuse(results, baseline, f"--results {args.results} and "
                                       f"--baseline {args.baseline}")
        try:
            failures, warnings = check(results, baseline, args.deployed_p, args.strict,
                                       loglik_tol=args.loglik_tol)
        except NotComparable as e:
            raise NotComparable(f"--results {args.results} and --baseline {args.baseline} are "
                                f"not comparable: {e}") from None
        for line in failures:
            print(f"FAIL: {line}")
        for line in warnings:
            print(f"WARN (within sampling noise): {line}")
        for line in unrecorded:
            print(f"WARN: {line}")
        if not failures:
            print(summary(results, baseline, args.deployed_p))
        return ExitCode.REGRESSED if failures else ExitCode.OK
    if args.command == "baseline":
        from vllm_sparsity.eval.check import make_baseline, read_results

        results = read_results(args.results)
        try:
            base = make_baseline(results, args.deployed_p, args.source)
        except ValueError as e:
            swept = ", ".join(describe_p(pt["p"]) for pt in results["points"])
            raise UsageError(f"--deployed-p {describe_p(args.deployed_p)}: {e} ({args.results} "
                             f"has p = {swept})") from None
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(base, indent=1) + "\n")
        return 0
    print(convert.build_tasks(args.tasks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
