"""End-to-end throughput of the plugin in vLLM: prefill and decode tokens/s against the plugin off.

``vllm-sparsity bench`` measures each configuration in a fresh subprocess (offline ``vllm.LLM``,
prefix caching off), one after another so that they never share the CPU, and prints every number
and the ratios from that one run. A benchmark, not a test: numbers depend on the machine.

- prefill: one prompt of ``--prefill-tokens`` token ids, ``max_tokens=1``; median of ``--repeats``.
- decode: a short prompt generating ``--decode-tokens`` tokens (EOS ignored); decode time is that
  run's time minus the same prompt's ``max_tokens=1`` time; median of ``--repeats``.

``vllm-sparsity bench --metrics-overhead --p 0.9`` instead compares p = 0.9 with the metrics
counters off and on (``additional_config["sparsity_metrics"]``; offline, so without the API
server's periodic poll).

``vllm-sparsity bench --sparsity-of URL`` instead measures, on a running server started with
``VLLM_PLUGINS=sparsity`` and ``--sparsity-target all_inputs``, the mean per-layer sparsity of each
target over a fixed prompt set at each p (through ``/v1/sparsity``: the served path itself).
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
        kwargs["additional_config"] = {"sparsity": {"p": args.p, "target": args.target},
                                       "sparsity_metrics": args.metrics}
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


SPARSITY_PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which plants",
    "def quicksort(items):\n    ",
    "In 1905, Albert Einstein published four papers that",
    "The recipe calls for two cups of flour, one egg and",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
    "The stock market fell sharply on Monday after",
]


def sparsity_table(url: str, ps: list[float], api_key: str | None = None,
                   max_tokens: int = 32) -> dict:
    """Mean per-layer sparsity {target: {p: value}} of the fixed prompts on a running server."""
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = requests.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]

    def counters():
        layers = requests.get(f"{url}/v1/sparsity", headers=headers).json()["layers"]
        return {(r["layer"], r["site"]): (r["zeroed"], r["total"]) for r in layers}

    table: dict = {}
    for target in ("input", "intermediate"):
        for p in ps:
            r = requests.post(f"{url}/v1/sparsity", json={"p": p, "target": target},
                              headers=headers)
            r.raise_for_status()
            before = counters()
            for prompt in SPARSITY_PROMPTS:
                requests.post(f"{url}/v1/completions", headers=headers, json={
                    "model": model, "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0.0, "ignore_eos": True}).raise_for_status()
            after = counters()
            per_layer = [(after[k][0] - before[k][0]) / (after[k][1] - before[k][1])
                         for k in after if k[1] == target]
            table.setdefault(target, {})[p] = sum(per_layer) / len(per_layer)
    return table


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
    parser.add_argument("--sparsity-of", metavar="URL",
                        help="measure per-target sparsity on this running server instead")
    parser.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"))
    parser.add_argument("--metrics-overhead", action="store_true",
                        help="instead: the first --p with the metrics counters on, then off")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_child-p", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_child-metrics", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model is None:
        from vllm_sparsity.demo_model import demo_model_path

        args.model = str(demo_model_path())
    if args.sparsity_of:
        ps = args.p if args.p != [0.9, 1.0] else [0.5, 0.7, 0.9, 0.95]
        table = sparsity_table(args.sparsity_of.rstrip("/"), ps, args.api_key)
        print("mean per-layer sparsity, each target applied alone:")
        print(f"{'p':>6} " + " ".join(f"{t:>13}" for t in table))
        for p in ps:
            print(f"{p:>6} " + " ".join(f"{table[t][p]:13.3f}" for t in table))
        return 0
    if args._child:
        args.p, args.metrics = args._child_p, bool(args._child_metrics)
        print("RESULT " + json.dumps(_measure(args)), flush=True)
        return 0

    results = {}
    # (label, p, metrics counters on); the first is the baseline of the ratios.
    configs = [("off", None, True)] + [(f"p={p:g}", p, True) for p in args.p]
    if args.metrics_overhead:
        configs = [("metrics off", args.p[0], False), ("metrics on", args.p[0], True)]
    for label, p, metrics_on in configs:
        cmd = [sys.executable, "-m", "vllm_sparsity.bench", "--_child", "--model", args.model,
               "--target", args.target, "--prefill-tokens", str(args.prefill_tokens),
               "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats),
               "--_child-metrics", str(int(metrics_on))]
        if p is not None:
            cmd += ["--_child-p", str(p)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SPARSITY_")}
        # vLLM's CPU backend otherwise reserves 92% of RAM and refuses to start when less is free.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"bench: configuration {label} failed (exit {out.returncode})")
        results[label] = json.loads(lines[-1][len("RESULT "):])
        r = results[label]
        print(f"{label:>8}: start-up {r['startup_s']:6.1f} s, prefill {r['prefill_tok_s']:7.1f} "
              f"tok/s, decode {r['decode_tok_s']:6.2f} tok/s", flush=True)
    base_label = configs[0][0]
    base = results[base_label]
    for label, r in results.items():
        if label != base_label:
            print(f"{label:>8} / {base_label}: prefill x"
                  f"{r['prefill_tok_s'] / base['prefill_tok_s']:.3f}, "
                  f"decode x{r['decode_tok_s'] / base['decode_tok_s']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
