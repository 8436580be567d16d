"""Fused top-p threshold + input-sparse GEMV (``cpu_input_sparse_gemv``) against vLLM-CPU's dense
GEMV for the same layer, on the MLP shapes of Gemma 3 270M / 1B, Llama-3.2-1B, Llama-3.1-8B and
Gemma-3-27B.

The dense baseline is whatever vLLM 0.32 runs for that layer on this CPU: a layer goes through
``dispatch_cpu_unquantized_gemm`` (vllm/model_executor/layers/utils.py) and is timed through the
``layer.cpu_linear`` it sets (oneDNN ``onednn_mm`` with a prepacked weight where oneDNN supports
the dtype; its ``F.linear`` fallback otherwise, e.g. bf16 without AVX-512; sgl-kernel for weights
under 1 MiB on AMX CPUs). The column ``dense`` names it.

Inputs at sparsity s: rows of x are Gaussian times a per-channel scale shared by the rows
(log-normal, sigma 1: real activations have persistent heavy channels, so the rows' kept sets
overlap); one p per cell is found by bisection with the torch rule so that the mean kept share is
1 - s. The measured sparsity and the union of rows read (share of K) are printed.

Also timed: the same kernel at p = 1 (every nonzero kept, all of Wt read): ``vs_p1`` (sparse / p = 1,
ideally 1 - s: how the kernel's time follows the rows it reads) and ``p1_vs_dense`` (the kernel's
own dense speed against vLLM's).

Method: every configuration of a (shape, layer, M, threads) cell stays alive, and each round times
dense then each s once (each sample is a loop of calls lasting >= ~10 ms); the table gives the
median over rounds of sparse / dense time and the range of those per-round ratios; the CSV also has
``ratio_of_min``, the fastest sparse sample over the fastest dense one (the samples least disturbed
by other jobs on shared cores).

Usage: python kernels/bench/bench_cpu_sparse_gemv.py --out DIR [--quick] [--dtype bf16|fp32]
[--rounds N] [--batches M ...] [--threads T ...] [--clock wall|cpu] [--cache cold|warm]
[--no-prefill]
[--from-csv CSV]
Writes DIR/bench_cpu_sparse_gemv.csv, DIR/bench_cpu_sparse_gemv.png and DIR/bench_cpu_sparse_gemv.md
(the summary: one markdown table per thread count, the ratio at s = 0.3 / 0.5 / 0.7 for each M).
The full run (4 shapes, 2 layers, 4 batch sizes, 2 thread counts, then the prefill comparison)
takes about 10 minutes on a 2-core machine with the default rounds.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from vllm_sparsity.kernels import cpu_backend, crossover
from vllm_sparsity.rule import top_p_mask

# (model, hidden, intermediate): the MLP shapes of Gemma 3 270M, 1B and 27B and Llama-3.1-8B, and
# Llama-3.2-1B's (the random model
# of `vllm-sparsity random-model`, timed end to end by `vllm-sparsity bench`).
SHAPES = [("gemma3-270m", 640, 2048), ("gemma3-1b", 1152, 6912), ("llama3.2-1b", 2048, 8192),
          ("llama3.1-8b", 4096, 14336), ("gemma3-27b", 5376, 21504)]
SPARSITIES = (0.3, 0.5, 0.7)
BATCHES = (1, 2, 4, 8)
THREADS = (1, 2)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SAMPLE_S = 0.01  # each timing sample loops calls for at least this long
PREFILL_M = 128  # rows of the prefill comparison (rule and GEMM both scale with M)


def dense_layer(w: torch.Tensor) -> tuple[torch.nn.Module, str]:
    """A layer holding w [N, K] that went through vLLM-CPU's own weight step; its dense path."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    code = layer.cpu_linear.__code__
    names = set(code.co_names) | set(code.co_freevars)
    kind = ("onednn" if "onednn_mm" in names else "sgl" if "weight_packed_linear_cpu" in names
            else "F.linear")
    return layer, kind


def inputs(m: int, k: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.randn(k, generator=g).exp()  # per-channel, shared by the rows
    return (torch.randn(m, k, generator=g) * scale).to(dtype)


def p_for_sparsity(x: torch.Tensor, s: float) -> float:
    """p whose torch-rule mask keeps a mean share 1 - s of x's entries (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        kept = top_p_mask(x, mid).double().mean().item()
        lo, hi = (mid, hi) if kept < 1 - s else (lo, mid)
    return hi


# Clock of every sample: wall time, or CPU time (--clock cpu: the calling thread's with 1 thread,
# where the kernel and oneDNN both run on it; the process's, all threads summed, with more), which
# leaves out the time other jobs held the cores.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = CLOCKS["wall"]


# --cache cold (the default): every timed call starts after an untimed read of twice the
# last-level cache (crossover.CacheEvictor), as in serving, where the other layers' weights evict a
# layer's before its next call; --cache warm: calls back to back on one weight (a kept share that
# fits in L3 is then read from it, which flatters the sparse kernel).
evictor: crossover.CacheEvictor | None = None
COLD_CALLS = 16  # at most this many calls per cold sample (each pays an eviction)


def timed(fn, iters: int) -> float:
    now = clock if clock is not time.thread_time or torch.get_num_threads() == 1 else \
        time.process_time
    if evictor is not None:
        return crossover.timed_cold(fn, evictor, math.inf, min(iters, COLD_CALLS), now)
    t0 = now()
    for _ in range(iters):
        fn()
    return (now() - t0) / iters


def bench_cell(layer, kind, wt, m, k, threads, rounds, dtype, seed):
    torch.set_num_threads(threads)
    x = inputs(m, k, dtype, seed)
    ps = {s: torch.tensor([p_for_sparsity(x, s)], dtype=torch.float64) for s in SPARSITIES}
    dense = lambda: layer.cpu_linear(x, layer.weight, None)  # noqa: E731
    sparse = {s: (lambda p=p: torch.ops.vllm_sparsity.cpu_input_sparse_gemv(x, p, wt, None))
              for s, p in ps.items()}
    one = torch.ones(1, dtype=torch.float64)
    full = lambda: torch.ops.vllm_sparsity.cpu_input_sparse_gemv(x, one, wt, None)  # noqa: E731
    dense()
    iters = max(1, round(SAMPLE_S / timed(dense, 1)))
    times = {"dense": [], "p1": [], **{s: [] for s in SPARSITIES}}
    for _ in range(rounds):
        times["dense"].append(timed(dense, iters))
        times["p1"].append(timed(full, iters))
        for s, fn in sparse.items():
            times[s].append(timed(fn, iters))
    rows = []
    for s in SPARSITIES:
        _, kept, rows_read = sparse[s]()
        ratios = [a / b for a, b in zip(times[s], times["dense"])]
        vs_p1 = [a / b for a, b in zip(times[s], times["p1"])]
        rows.append({
            "M": m, "threads": threads, "s": s, "p": round(float(ps[s]), 5),
            "s_measured": round(1 - kept.sum().item() / (m * k), 3),
            "rows_read": round(rows_read.item() / k, 3),
            "dense_ms": round(statistics.median(times["dense"]) * 1e3, 4),
            "sparse_ms": round(statistics.median(times[s]) * 1e3, 4),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_lo": round(min(ratios), 3), "ratio_hi": round(max(ratios), 3),
            "ratio_of_min": round(min(times[s]) / min(times["dense"]), 3), "dense": kind,
            "vs_p1": round(statistics.median(vs_p1), 3),
            "p1_vs_dense": round(statistics.median(
                [a / b for a, b in zip(times["p1"], times["dense"])]), 3),
        })
    return rows


def bench_prefill(shapes, dtype, m: int = PREFILL_M, rounds: int = 3) -> None:
    """Prefill (M > M_MAX): the rule in C++ (``cpu_top_p_sparsify``) and in torch
    (``rule.top_p_sparsify``), each as a share of vLLM's dense GEMM on the same [m, K] block."""
    from vllm_sparsity.rule import top_p_sparsify

    print(f"\nprefill, M = {m}, {torch.get_num_threads()} thread(s): rule time / vLLM dense GEMM "
          "time (median over rounds, range)")
    p = torch.tensor([0.5], dtype=torch.float64)
    for seed, (model, hidden, inter) in enumerate(shapes):
        for layer_name, k, n in (("gate_up_proj", hidden, 2 * inter),
                                 ("down_proj", inter, hidden)):
            w = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * k**-0.5)
            layer, kind = dense_layer(w.to(dtype))
            x = inputs(m, k, dtype, seed)
            fns = {"dense": lambda: layer.cpu_linear(x, layer.weight, None),
                   "cpp": lambda: torch.ops.vllm_sparsity.cpu_top_p_sparsify(x, p),
                   "torch": lambda: top_p_sparsify(x, p)}
            times = {key: [] for key in fns}
            for fn in fns.values():
                fn()
            for _ in range(rounds):
                for key, fn in fns.items():
                    times[key].append(timed(fn, 1))
            out = []
            for key in ("cpp", "torch"):
                r = [a / b for a, b in zip(times[key], times["dense"])]
                out.append(f"{key} {statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})")
            print(f"{model:12} {layer_name:12} K {k:6} N {n:6} dense {kind} "
                  f"{statistics.median(times['dense']) * 1e3:8.2f} ms: " + ", ".join(out),
                  flush=True)


def summary(rows) -> str:
    """Markdown tables of the median ratios (sparse / vLLM dense time): per thread count, a row per
    (model, layer), a column per M holding the ratios at each s."""
    fmt = lambda v: f"{float(v):.2f}"  # noqa: E731
    cell = {(r["model"], r["layer"], int(r["threads"]), int(r["M"]), float(r["s"])): r
            for r in rows}
    keys = list(dict.fromkeys((r["model"], r["layer"]) for r in rows))
    ms = sorted({int(r["M"]) for r in rows})
    s_text = " / ".join(str(s) for s in SPARSITIES)
    out = []
    for t in sorted({int(r["threads"]) for r in rows}):
        out.append(f"\n{t} thread{'s' if t > 1 else ''}: time / vLLM dense time at s = {s_text}"
                   " (median over rounds)\n")
        out.append("| model | layer | K x N | dense | " + " | ".join(f"M = {m}" for m in ms)
                   + " |")
        out.append("|---|---|---|---|" + "---|" * len(ms))
        for model, layer in keys:
            any_r = next(r for r in rows if (r["model"], r["layer"]) == (model, layer))
            cols = []
            for m in ms:
                got = [cell.get((model, layer, t, m, s)) for s in SPARSITIES]
                cols.append(" / ".join(fmt(r["ratio"]) if r else "-" for r in got))
            out.append(f"| {model} | {layer} | {any_r['K']} x {any_r['N']} | {any_r['dense']} | "
                       + " | ".join(cols) + " |")
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(len(threads), len(SPARSITIES), figsize=(4.2 * len(SPARSITIES),
                             3.4 * len(threads)), squeeze=False, sharey=True)
    for i, t in enumerate(threads):
        for j, s in enumerate(SPARSITIES):
            ax = axes[i][j]
            for key in sorted({(r["model"], r["layer"]) for r in rows}):
                pts = sorted((r["M"], r["ratio"]) for r in rows if (r["model"], r["layer"]) == key
                             and r["threads"] == t and r["s"] == s)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{key[0]} {key[1]}")
            ax.axhline(1 - s, ls="--", c="k", lw=0.8)
            ax.axhline(1.0, ls=":", c="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"s = {s}, {t} thread{'s' if t > 1 else ''}")
            ax.set_xlabel("M (rows)")
            if j == 0:
                ax.set_ylabel("time / vLLM dense")
    axes[0][0].legend(fontsize=6)
    fig.suptitle("fused top-p + input-sparse GEMV vs vLLM-CPU dense (dashed: 1 - s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_summary(rows, out: Path) -> None:
    """Print the summary tables; write them (.md) and the PNG into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    text = summary(rows)
    print(text)
    (out / "bench_cpu_sparse_gemv.md").write_text(text.lstrip() + "\n")
    plot(rows, out / "bench_cpu_sparse_gemv.png")
    print(f"wrote {out / 'bench_cpu_sparse_gemv.md'} and {out / 'bench_cpu_sparse_gemv.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the CSV and the PNG")
    ap.add_argument("--quick", action="store_true", help="Llama-3.1-8B and Gemma 3 270M, M in "
                    "{1, 8}, 1 thread")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--models", nargs="*", help=f"subset of {[s[0] for s in SHAPES]}")
    ap.add_argument("--batches", type=int, nargs="*", help=f"rows M (default {list(BATCHES)})")
    ap.add_argument("--threads", type=int, nargs="*",
                    help=f"thread counts (default {list(THREADS)})")
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold",
                    help="cold: every timed call after a read of twice the last-level cache, as "
                         "in serving (default); warm: calls back to back on one weight")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or CPU "
                    "time (the calling thread's at 1 thread, the process's above): on cores "
                    "shared with other jobs")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill comparison")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per cell (default: 5 for "
                    "weights over 50M entries, 9 below)")
    ap.add_argument("--from-csv", type=Path, help="only rewrite the summary and the PNG of a CSV "
                    "this script wrote")
    args = ap.parse_args()
    if args.rounds is not None and args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.from_csv is not None:
        with args.from_csv.open() as f:
            rows = [{**r, "ratio": float(r["ratio"]), "M": int(r["M"]),
                     "threads": int(r["threads"]), "s": float(r["s"])} for r in csv.DictReader(f)]
        write_summary(rows, args.out)
        return
    global clock, evictor
    clock = CLOCKS[args.clock]
    evictor = crossover.CacheEvictor() if args.cache == "cold" else None
    dtype = DTYPES[args.dtype]
    isa = cpu_backend.load_ops()
    shapes = [s for s in SHAPES if not args.models or s[0] in args.models]
    batches, threads = BATCHES, THREADS
    if args.quick:
        shapes = [s for s in shapes if s[0] in ("gemma3-270m", "llama3.1-8b")]
        batches, threads = (1, 8), (1,)
    batches, threads = args.batches or batches, args.threads or threads
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"kernel build: {isa}; torch {torch.__version__}; dtype {args.dtype}; clock {args.clock}"
          f"; caches {args.cache}; load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    rows = []
    header = (f"{'model':12} {'layer':12} {'K':>6} {'N':>6} {'M':>2} {'thr':>3} {'s':>4} "
              f"{'s_meas':>6} {'read':>5} {'dense ms':>9} {'ratio':>6} {'range':>13} {'vs_p1':>6} "
              f"{'p1/dense':>8} {'min/min':>7} dense")
    print(header)
    for seed, (model, hidden, inter) in enumerate(shapes):
        for layer_name, k, n in (("gate_up_proj", hidden, 2 * inter),
                                 ("down_proj", inter, hidden)):
            g = torch.Generator().manual_seed(seed)
            w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
            wt = torch.ops.vllm_sparsity.cpu_kmajor_weight(w)  # as cpu_backend.prepare keeps it
            layer, kind = dense_layer(w)
            del w
            rounds = args.rounds or (5 if n * k > 50e6 else 9)
            for t in threads:
                for m in batches:
                    for r in bench_cell(layer, kind, wt, m, k, t, rounds, dtype, seed):
                        r = {"model": model, "layer": layer_name, "K": k, "N": n, **r,
                             "isa": isa, "dtype": args.dtype}
                        rows.append(r)
                        print(f"{model:12} {layer_name:12} {k:6} {n:6} {r['M']:2} {t:3} "
                              f"{r['s']:4} {r['s_measured']:6} {r['rows_read']:5} "
                              f"{r['dense_ms']:9.3f} {r['ratio']:6.3f} "
                              f"{r['ratio_lo']:6.3f}-{r['ratio_hi']:<6.3f} {r['vs_p1']:6.3f} "
                              f"{r['p1_vs_dense']:8.3f} {r['ratio_of_min']:7.3f} {kind}",
                              flush=True)
            del layer, wt
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    csv_path = args.out / "bench_cpu_sparse_gemv.csv"
    with csv_path.open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    write_summary(rows, args.out)
    if args.no_prefill:
        return
    torch.set_num_threads(1)
    bench_prefill([s for s in shapes if s[0] != "gemma3-27b"] if not args.quick else shapes[:1],
                  dtype)


if __name__ == "__main__":
    main()
