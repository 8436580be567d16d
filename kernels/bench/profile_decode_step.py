"""Profile vLLM decode steps with the plugin off or on: where a decode step's CPU time goes, by op.

Runs one configuration per process (run it once per configuration, one after another): an offline
``vllm.LLM`` with the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that
``torch.profiler`` sees the model's ops. It profiles ``generate`` of a short prompt with
``max_tokens = 1`` and with ``1 + --steps``, and prints, per op, the self CPU time of the second
minus the first, divided by ``--steps``: the ms one decode step spends in each op. Also the wall
time per decode step of ``--timed`` unprofiled runs, and the dense GEMMs' share.

Threads: ``--threads`` (default 1) through ``OMP_NUM_THREADS``. In-process, vLLM binds no threads;
served (multiprocess executor), vLLM-CPU reserves one core per worker for the engine core and gives
the worker the rest, which is one thread on a 2-core machine. With more threads than free cores,
every parallel region waits for a descheduled thread, and small kernels look expensive.
Inductor's C++ kernels appear by name (``TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1``, set here;
``VLLM_DISABLE_COMPILE_CACHE=1`` too, so that the graph is compiled with it).

Usage: python kernels/bench/profile_decode_step.py --model PATH [--p 0.7 --backend torch]
[--target all_inputs] [--eager] [--steps 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--p", type=float, default=None, help="plugin p (default: plugin off)")
    ap.add_argument("--backend", default="torch", choices=("torch", "cpu", "auto"))
    ap.add_argument("--target", default="all_inputs")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps profiled")
    ap.add_argument("--timed", type=int, default=5, help="unprofiled timing runs")
    ap.add_argument("--rows", type=int, default=25, help="ops printed")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the model")
    args = ap.parse_args()
    for flag in ("steps", "timed", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE"] = "1"
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from vllm import LLM, SamplingParams

    kwargs = dict(model=args.model, max_model_len=256, max_num_batched_tokens=256, max_num_seqs=4,
                  dtype="bfloat16", enable_prefix_caching=False, seed=0,
                  enforce_eager=args.eager)
    if args.p is not None:
        kwargs["additional_config"] = {"sparsity": {"p": args.p, "target": args.target,
                                                    "backend": args.backend}}
    llm = LLM(**kwargs)
    prompt = {"prompt_token_ids": [2, 818, 5279, 529, 7001, 563]}

    def run(max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - t0

    run(1), run(1 + args.steps)  # warm-up
    per_step = [(run(1 + args.steps) - run(1)) / args.steps for _ in range(args.timed)]

    def profile(max_tokens: int) -> dict[str, tuple[float, int]]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(max_tokens)
        return {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}

    one, many = profile(1), profile(1 + args.steps)
    diff = defaultdict(float)
    calls = defaultdict(float)
    for key, (us, n) in many.items():
        diff[key] = (us - one.get(key, (0.0, 0))[0]) / args.steps / 1e3
        calls[key] = (n - one.get(key, (0.0, 0))[1]) / args.steps
    total = sum(diff.values())
    config = "plugin off" if args.p is None else f"p = {args.p}, {args.backend} backend"
    print(f"\n{config}{', eager' if args.eager else ''}: decode step wall "
          f"{statistics.median(per_step) * 1e3:.2f} ms (median of {args.timed}, range "
          f"{min(per_step) * 1e3:.2f}-{max(per_step) * 1e3:.2f}); profiled self CPU per step "
          f"{total:.2f} ms; {torch.get_num_threads()} thread(s); load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'op':60} {'ms/step':>8} {'calls/step':>10}")
    for key, ms in sorted(diff.items(), key=lambda kv: -kv[1])[:args.rows]:
        print(f"{key[:60]:60} {ms:8.3f} {calls[key]:10.1f}")
    gemm = sum(ms for key, ms in diff.items() if key in ("aten::mm", "aten::addmm",
                                                          "_C::onednn_mm"))
    print(f"dense GEMMs (aten::mm + aten::addmm + onednn_mm): {gemm:.2f} ms/step")


if __name__ == "__main__":
    main()
