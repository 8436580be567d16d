"""End-to-end throughput of the plugin in vLLM: prefill and decode tokens/s against the plugin off.

``vllm-sparsity bench`` measures each configuration in a fresh subprocess (offline ``vllm.LLM``,
prefix caching off), one after another so that they never share the CPU, and prints every number
and the ratios from that one run. A benchmark, not a test: numbers depend on the machine.

- prefill: one prompt of ``--prefill-tokens`` token ids, ``max_tokens=1``; median of ``--repeats``.
- decode: a short prompt generating ``--decode-tokens`` tokens (EOS ignored); decode time is that
  run's time minus the same prompt's ``max_tokens=1`` time; median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _measure(args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = dict(model=args.model, max_model_len=args.prefill_tokens + 64, dtype="bfloat16",
                  enable_prefix_caching=False, seed=0)
    if args.p is not None:
        kwargs["additional_config"] = {"sparsity": {"p": args.p, "target": args.target}}
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - t0
    # A fixed, model-independent prompt: token ids cycling through an ordinary range.
    long_prompt = {"prompt_token_ids": [2] + [1000 + i % 5000 for i in range(args.prefill_tokens - 1)]}
    short_prompt = {"prompt_token_ids": [2, 818, 5279, 529, 7001, 563]}

    def timed(prompt, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - start

    timed(long_prompt, 1), timed(short_prompt, 8)  # warm-up
    prefill = statistics.median(timed(long_prompt, 1) for _ in range(args.repeats))
    decode = statistics.median(
        timed(short_prompt, args.decode_tokens + 1) - timed(short_prompt, 1)
        for _ in range(args.repeats))
    return {"startup_s": startup_s, "prefill_tok_s": args.prefill_tokens / prefill,
            "decode_tok_s": args.decode_tokens / decode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-sparsity bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path (default: the demo model)")
    parser.add_argument("--p", type=float, nargs="*", default=[0.9, 1.0],
                        help="p values to compare with the plugin off (default: 0.9 1.0)")
    parser.add_argument("--target", default="all_inputs")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_child-p", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model is None:
        from vllm_sparsity.demo_model import demo_model_path

        args.model = str(demo_model_path())
    if args._child:
        args.p = args._child_p
        print("RESULT " + json.dumps(_measure(args)), flush=True)
        return 0

    results = {}
    for p in [None, *args.p]:
        label = "off" if p is None else f"p={p:g}"
        cmd = [sys.executable, "-m", "vllm_sparsity.bench", "--_child", "--model", args.model,
               "--target", args.target, "--prefill-tokens", str(args.prefill_tokens),
               "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats)]
        if p is not None:
            cmd += ["--_child-p", str(p)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SPARSITY_")}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"bench: configuration {label} failed (exit {out.returncode})")
        results[label] = json.loads(lines[-1][len("RESULT "):])
        r = results[label]
        print(f"{label:>8}: start-up {r['startup_s']:6.1f} s, prefill {r['prefill_tok_s']:7.1f} "
              f"tok/s, decode {r['decode_tok_s']:6.2f} tok/s", flush=True)
    off = results["off"]
    for label, r in results.items():
        if label != "off":
            print(f"{label:>8} / off: prefill x{r['prefill_tok_s'] / off['prefill_tok_s']:.3f}, "
                  f"decode x{r['decode_tok_s'] / off['decode_tok_s']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
