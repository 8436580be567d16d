"""Profile one prefill-sized MLP forward on the CPU, plugin off or on, without an engine: where the
time goes, by op.

Builds a Llama-style MLP (gate_up_proj -> SiLU-and-mul -> down_proj) of a model's shape from
random weights: plugin off, each linear is vLLM 0.32's ``UnquantizedLinearMethod`` (its CPU dense
GEMM, oneDNN where it has the dtype); plugin on, the seam (``sparse_linear.install``, as
``replace_mlp`` installs it, cpu backend) on both linears, which runs the C++ rule then that same
dense GEMM above the crossover, and the site counters (``sparse_site.record``; with ``--metrics``
also the histogram and weight-column ones). Eager ops: in a served model torch.compile fuses the
counters into one Inductor kernel per site, so their time here is an upper bound.

Prints, per configuration and M, the median wall time of a forward over ``--rounds`` (configs in
alternating order), then a torch.profiler table of the plugin-on forward (self CPU time per op).

Usage: python kernels/bench/profile_prefill_mlp.py [--model llama3.2-1b] [--m 128 512] [--p 0.7]
[--threads 1] [--metrics] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_sparse_gemv import SHAPES, inputs  # noqa: E402


def linear(k: int, n: int, seed: int) -> torch.nn.Module:
    """A [N, K] bf16 linear layer with vLLM's unquantized method (weights not yet processed)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    layer = torch.nn.Module()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * k**-0.5
    layer.weight = torch.nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
    layer.quant_method = UnquantizedLinearMethod()
    return layer


def mlp(hidden: int, inter: int, p: float | None, metrics: bool, max_tokens: int):
    """forward(x [M, hidden]) -> [M, hidden] of a gated MLP; p None: plugin off."""
    gate_up, down = linear(hidden, 2 * inter, 0), linear(inter, hidden, 1)
    if p is None:
        for layer in (gate_up, down):
            layer.quant_method.process_weights_after_loading(layer)
    else:
        from vllm_sparsity import sparse_linear
        from vllm_sparsity.config import SparsityConfig
        from vllm_sparsity.state import RuntimeState

        state = RuntimeState(SparsityConfig(p=p, target="all_inputs", backend="cpu"),
                             torch.device("cpu"), max_tokens, metrics)
        for i, layer in enumerate((gate_up, down)):
            sparse_linear.install(layer, f"mlp.{i}", "input", 0, state, "cpu")
            layer.quant_method.process_weights_after_loading(layer)

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = gate_up.quant_method.apply(gate_up, x)
        h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        return down.quant_method.apply(down, h)

    return forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3.2-1b", choices=[s[0] for s in SHAPES])
    ap.add_argument("--m", type=int, nargs="*", default=[128, 512], help="token rows")
    ap.add_argument("--p", type=float, default=0.7, help="the plugin's p, in (0, 1]")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--metrics", action="store_true", help="detailed counters too")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, default=15, help="profiler ops printed")
    args = ap.parse_args()
    if not 0 < args.p <= 1:
        ap.error(f"--p must be in (0, 1], got {args.p}")
    if min(args.m, default=1) < 1 or args.threads < 1 or args.rounds < 1:
        ap.error("--m, --threads and --rounds must be >= 1")
    torch.set_num_threads(args.threads)
    _, hidden, inter = next(s for s in SHAPES if s[0] == args.model)
    fwd = {"off": mlp(hidden, inter, None, False, max(args.m)),
           "on": mlp(hidden, inter, args.p, args.metrics, max(args.m))}
    print(f"{args.model} MLP (hidden {hidden}, intermediate {inter}), bf16, {args.threads} "
          f"thread(s), p = {args.p}, metrics {'on' if args.metrics else 'off'}; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    for m in args.m:
        x = inputs(m, hidden, torch.bfloat16, 0)
        times = {key: [] for key in fwd}
        for f in fwd.values():
            f(x)
        for _ in range(args.rounds):
            for key, f in fwd.items():
                t0 = time.perf_counter()
                f(x)
                times[key].append(time.perf_counter() - t0)
        ratios = [a / b for a, b in zip(times["on"], times["off"])]
        print(f"M {m}: off {statistics.median(times['off']) * 1e3:.2f} ms, on "
              f"{statistics.median(times['on']) * 1e3:.2f} ms, on / off "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})", flush=True)
        for key in ("off", "on"):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fwd[key](x)
            events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in events) / 3e3
            print(f"  plugin {key}, profiled self CPU per forward {total:.2f} ms:")
            for e in events[:args.rows]:
                print(f"    {e.key[:58]:58} {e.self_cpu_time_total / 3e3:8.3f} ms "
                      f"{e.count / 3:5.1f} calls")


if __name__ == "__main__":
    main()
