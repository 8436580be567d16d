"""Time interpreted ``input_sparse_linear`` calls (CPU, TRITON_INTERPRET) at the demo shapes.

Gemma-3-270M's MLP linears: ``gate_up_proj`` K = 640, N = 4096 and ``down_proj`` K = 2048, N = 640,
bf16, p = 0.9, for M = 1 (decode), 6 (a short prefill: sparse GEMV) and 32 (above ``M_MAX``: mask,
then the dense GEMM). Prints the best wall and CPU time of ``--reps`` calls of the threshold
kernel, the sparse GEMV and the whole op. ``--gpu-config`` launches with the GPU configuration
instead of the interpreter's (``sparse_gemv.INTERP_TILE``), to compare.

Run: ``python kernels/bench/profile_interpreter.py [--reps 3] [--gpu-config]`` (about a minute;
several with ``--gpu-config``). Timings vary a lot with other load on the machine.
"""

import argparse
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from vllm_sparsity.kernels import common, triton_backend  # noqa: E402
from vllm_sparsity.kernels import sparse_gemv as sg  # noqa: E402
from vllm_sparsity.kernels import top_p_threshold as tpt  # noqa: E402

SHAPES = (("gate_up", 640, 4096), ("down", 2048, 640))


def best_of(reps, fn):
    """(wall, cpu) seconds: the best of ``reps`` calls each."""
    wall = cpu = float("inf")
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu-config", action="store_true")
    args = ap.parse_args()
    common.GPU_CONFIG_UNDER_INTERPRETER = args.gpu_config
    p = torch.tensor([0.9], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    print(f"{'gpu' if args.gpu_config else 'interpreter'} launch configuration; "
          f"wall / cpu ms, best of {args.reps}")
    for name, k, n in SHAPES:
        wt = (torch.randn(k, n, generator=g) * k**-0.5).to(torch.bfloat16)
        for m in (1, 6, 32):
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            thr, _ = tpt.top_p_threshold(x, p)
            cols = [best_of(args.reps, lambda: tpt.top_p_threshold(x, p))]
            cols.append(best_of(args.reps, lambda: sg.sparse_gemv(x, thr, wt))
                        if m <= triton_backend.M_MAX else None)
            cols.append(best_of(args.reps, lambda: triton_backend.input_sparse_linear(
                x, p, wt, None, triton_backend.M_MAX)))
            text = ["-" if c is None else f"{c[0] * 1e3:6.0f} / {c[1] * 1e3:6.0f}" for c in cols]
            print(f"{name:8s} K={k:5d} N={n:5d} M={m:2d}  threshold {text[0]:>15s}  "
                  f"sparse_gemv {text[1]:>15s}  input_sparse_linear {text[2]:>15s}", flush=True)


if __name__ == "__main__":
    main()
