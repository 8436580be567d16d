"""Prefill cost of the top-p rule on the CPU: ``cpu_top_p_sparsify`` (the rule in C++, x with
dropped entries zeroed) against vLLM-CPU's own dense GEMM for the same layer and rows, which the
backend runs right after it above the crossover.

The dense baseline is the ``layer.cpu_linear`` that vLLM 0.32's ``dispatch_cpu_unquantized_gemm``
sets (``bench_cpu_sparse_gemv.dense_layer``: oneDNN, sgl-kernel or ``F.linear``; the ``dense``
column names it). Inputs as ``bench_cpu_sparse_gemv.inputs`` (Gaussian rows times a log-normal
per-channel scale), p = 0.5 of each row's mass.

Method: per (shape, layer, M, threads) cell, each round times the dense GEMM then the rule (each
sample a loop of calls lasting >= ~20 ms), so that a load change on shared cores hits both; the
table gives the median over rounds of rule / dense time and the range of those per-round ratios,
and the ratio of the fastest single calls (the speed of calls no other job interrupted).
``--clock wall`` times wall-clock seconds (what a request waits); ``--clock cpu`` the process's CPU
seconds, which leave out the time other jobs hold a shared core: with one thread, the work itself
(with more, it also counts the threads' spinning, so the script refuses it).

Usage: python kernels/bench/bench_cpu_prefill.py --out DIR [--models ...] [--m 64 128 512]
[--threads 1 2] [--rounds N] [--clock wall|cpu]. Writes DIR/bench_cpu_prefill-CLOCK.csv and prints
one line per cell.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_sparse_gemv import SHAPES, dense_layer, inputs  # noqa: E402

from vllm_sparsity.kernels import cpu_backend  # noqa: E402

SAMPLE_S = 0.02  # each timing sample loops calls for at least this long


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(fn, iters: int) -> tuple[float, float]:
    """(mean, fastest) seconds per call over ``iters`` calls."""
    times = []
    for _ in range(iters):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return sum(times) / iters, min(times)


def bench_cell(layer, x: torch.Tensor, p: torch.Tensor, rounds: int) -> dict:
    fns = {"dense": lambda: layer.cpu_linear(x, layer.weight, None),
           "rule": lambda: torch.ops.vllm_sparsity.cpu_top_p_sparsify(x, p)}
    iters = {}
    for key, fn in fns.items():
        fn()
        iters[key] = max(1, round(SAMPLE_S / timed(fn, 1)[0]))
    times = {key: [] for key in fns}
    best = {key: float("inf") for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            mean, fastest = timed(fn, iters[key])
            times[key].append(mean)
            best[key] = min(best[key], fastest)
    ratios = [r / d for r, d in zip(times["rule"], times["dense"])]
    return {"dense_ms": statistics.median(times["dense"]) * 1e3,
            "rule_ms": statistics.median(times["rule"]) * 1e3,
            "ratio": statistics.median(ratios), "ratio_lo": min(ratios), "ratio_hi": max(ratios),
            "best_ratio": best["rule"] / best["dense"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the CSV")
    ap.add_argument("--models", nargs="*", default=["llama3.2-1b", "llama3.1-8b"],
                    help=f"subset of {[s[0] for s in SHAPES]}")
    ap.add_argument("--m", type=int, nargs="*", default=[64, 128, 512], help="rows per cell")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7, help="rounds per cell, >= 1")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = ap.parse_args()
    if args.rounds < 1 or min(args.m, default=1) < 1 or min(args.threads, default=1) < 1:
        ap.error("--rounds, --m and --threads must be >= 1")
    if args.clock == "cpu" and max(args.threads) > 1:
        ap.error("--clock cpu needs --threads 1 (CPU seconds of several threads sum their spins)")
    global clock
    clock = CLOCKS[args.clock]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    isa = cpu_backend.load_ops()
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"kernel build {isa}; torch {torch.__version__}; {args.dtype}; {args.clock} clock; "
          f"load average before: "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    p = torch.tensor([0.5], dtype=torch.float64)
    rows = []
    for seed, (model, hidden, inter) in enumerate(SHAPES):
        if model not in args.models:
            continue
        for layer_name, k, n in (("gate_up_proj", hidden, 2 * inter),
                                 ("down_proj", inter, hidden)):
            w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * k**-0.5
            layer, kind = dense_layer(w.to(dtype))
            del w
            for threads in args.threads:
                torch.set_num_threads(threads)
                for m in args.m:
                    r = {"model": model, "layer": layer_name, "K": k, "N": n, "M": m,
                         "threads": threads, "clock": args.clock, "dense": kind, "isa": isa, "dtype": args.dtype,
                         **bench_cell(layer, inputs(m, k, dtype, seed), p, args.rounds)}
                    rows.append(r)
                    print(f"{model:12} {layer_name:12} K {k:5} N {n:5} M {m:3} threads {threads}"
                          f" dense {kind} {r['dense_ms']:8.3f} ms, rule {r['rule_ms']:7.3f} ms: "
                          f"{r['ratio']:.3f} ({r['ratio_lo']:.3f}-{r['ratio_hi']:.3f}); "
                          f"fastest calls {r['best_ratio']:.3f}",
                          flush=True)
            del layer
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with (args.out / f"bench_cpu_prefill-{args.clock}.csv").open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows({key: round(v, 4) if isinstance(v, float) else v for key, v in r.items()}
                     for r in rows)


if __name__ == "__main__":
    main()
