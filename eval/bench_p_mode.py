"""Wall time of the same sweep with per-request p against the global-p route, side by side.

  python -m vllm_sparsity.eval.bench_p_mode --model M [--url URL --api-key K] [--tasks piqa,arc_easy]
      [--limit 20] [--p-grid 1.0,0.9,0.7] [--target all_inputs] [--rounds 2] --out DIR

One server (started here, or ``--url``); each round runs the whole sweep once per mode into a fresh
folder, the modes alternating which goes first, and prints each round's wall times and their ratio
(global / request), then checks that both modes gave every point the same per-task accuracy.
Results: ``DIR/bench.json``. Timings depend on the machine: they go into READMEs, not code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vllm_sparsity.eval.grid import SweepConfig
from vllm_sparsity.eval.server import serve_flags, served
from vllm_sparsity.eval.sweep import sweep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_sparsity.eval.bench_p_mode",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--url")
    ap.add_argument("--api-key")
    ap.add_argument("--tasks", default="piqa,arc_easy")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--p-grid", default="1.0,0.9,0.7")
    ap.add_argument("--target", default="all_inputs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    grid = sorted({float(p) for p in args.p_grid.split(",")} | {1.0}, reverse=True)
    cfg = SweepConfig(args.model, args.tasks.split(","), grid, args.target, args.limit)
    args.out.mkdir(parents=True, exist_ok=True)
    rounds = []
    with served(args.model, args.out / "server.log", args.url, args.api_key,
                serve_flags(args.target)) as server:
        for r in range(args.rounds):
            order = ("global", "request") if r % 2 == 0 else ("request", "global")
            row = {}
            for mode in order:
                t0 = time.monotonic()
                result = sweep(cfg, args.out / f"round{r}-{mode}", server.url, server.api_key,
                               mode=mode)
                row[mode] = {"wall_s": time.monotonic() - t0,
                             "acc": {pt["p"]: {t: pt["tasks"][t][pt["tasks"][t]["primary"]]
                                               for t in cfg.tasks} for pt in result["points"]},
                             "sparsity": {pt["p"]: pt["sparsity"]["overall"]
                                          for pt in result["points"]}}
            row["ratio_global_over_request"] = row["global"]["wall_s"] / row["request"]["wall_s"]
            row["same_accuracy"] = row["global"]["acc"] == row["request"]["acc"]
            print(f"round {r} ({order[0]} first): global {row['global']['wall_s']:.0f} s, "
                  f"request {row['request']['wall_s']:.0f} s, global/request "
                  f"{row['ratio_global_over_request']:.2f}x, same accuracy per point: "
                  f"{row['same_accuracy']}", flush=True)
            rounds.append(row)
    ratios = [row["ratio_global_over_request"] for row in rounds]
    print(f"global/request wall time over {len(ratios)} rounds: "
          f"{min(ratios):.2f}x .. {max(ratios):.2f}x")
    (args.out / "bench.json").write_text(json.dumps(
        {"tasks": cfg.tasks, "limit": cfg.limit, "grid": grid, "target": cfg.target,
         "rounds": rounds}, indent=1, default=str) + "\n")
    return 0 if all(row["same_accuracy"] for row in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
