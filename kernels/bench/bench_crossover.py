"""The crossover ``kernels/crossover.py`` chooses on this CPU for the MLP shapes of
``bench_cpu_sparse_gemv.py``, against vLLM-CPU's dense GEMM for each layer, measured afresh (no
cache) ``--repeats`` times per thread count to show how stable the decision is under load.

Usage: python kernels/bench/bench_crossover.py --out DIR [--models ...] [--repeats N]
[--sparsity S]. Prints one line per decision (M chosen, then the median sparse / dense ratio at each
M timed) and writes DIR/bench_crossover.csv and DIR/bench_crossover.md (the M chosen per repeat).
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch
from bench_cpu_sparse_gemv import SHAPES, THREADS, dense_layer

from vllm_sparsity.kernels import cpu_backend, crossover


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the CSV and the table")
    ap.add_argument("--models", nargs="*", default=["llama3.2-1b", "llama3.1-8b"],
                    help=f"subset of {[s[0] for s in SHAPES]}")
    ap.add_argument("--repeats", type=int, default=3, help="decisions per shape and thread count")
    ap.add_argument("--sparsity", type=float, default=crossover.EXPECTED_SPARSITY,
                    help="share of zeros per row of the timed inputs")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    isa = cpu_backend.load_ops()
    max_rows = int(torch.ops.vllm_sparsity.cpu_input_sparse_gemv_max_rows())
    model_name, flags = crossover.cpu_identity()
    load = os.getloadavg()
    print(f"cpu {model_name!r}; kernel build {isa}; torch {torch.__version__}; s {args.sparsity}; "
          f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    rows = []
    for seed, (model, hidden, inter) in enumerate(s for s in SHAPES if s[0] in args.models):
        for layer_name, k, n in (("gate_up_proj", hidden, 2 * inter),
                                 ("down_proj", inter, hidden)):
            w = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * k**-0.5
                 ).to(torch.bfloat16)
            wt = w.t().contiguous()
            layer, kind = dense_layer(w)
            del w
            dense = lambda x, bias: layer.cpu_linear(x, layer.weight, bias)  # noqa: E731
            for threads in THREADS:
                torch.set_num_threads(threads)
                for rep in range(args.repeats):
                    t0 = time.perf_counter()
                    m_max, ratios = crossover.decide(
                        crossover.LayerTimer(wt, dense, args.sparsity), max_rows)
                    seconds = time.perf_counter() - t0
                    shown = " ".join(f"{m}:{r:.2f}" for m, r in ratios.items())
                    print(f"{model:12} {layer_name:12} K {k:6} N {n:6} threads {threads} "
                          f"repeat {rep}: M <= {m_max} sparse ({seconds:.1f} s; {shown}) "
                          f"dense {kind}", flush=True)
                    rows.append({"model": model, "layer": layer_name, "K": k, "N": n,
                                 "threads": threads, "repeat": rep, "m_max": m_max,
                                 "ratios": shown, "seconds": round(seconds, 2), "dense": kind,
                                 "isa": isa, "sparsity": args.sparsity})
            del layer, wt
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "bench_crossover.csv").open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    lines = [f"Crossover chosen (largest M sent to the sparse GEMV, per repeat) at s = "
             f"{args.sparsity}, bf16, {isa} build, dense path as named\n",
             "| model | layer | K x N | dense | " + " | ".join(
                 f"{t} thread{'s' if t > 1 else ''}" for t in THREADS) + " |",
             "|---|---|---|---|" + "---|" * len(THREADS)]
    for key in dict.fromkeys((r["model"], r["layer"]) for r in rows):
        sel = [r for r in rows if (r["model"], r["layer"]) == key]
        cols = [", ".join(str(r["m_max"]) for r in sel if r["threads"] == t) for t in THREADS]
        lines.append(f"| {key[0]} | {key[1]} | {sel[0]['K']} x {sel[0]['N']} | "
                     f"{sel[0]['dense']} | " + " | ".join(cols) + " |")
    (args.out / "bench_crossover.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
