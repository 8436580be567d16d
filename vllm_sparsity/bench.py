"""End-to-end throughput of the plugin in vLLM: prefill and decode tokens/s against the plugin off.

``vllm-sparsity bench`` starts every configuration as its own offline ``vllm.LLM`` (prefix caching
off) in a subprocess, one after another, and keeps them all alive. It then measures in rounds,
one configuration at a time and never two at once, in an order that alternates from round to
round, and prints the median of each configuration and the median of the per-round ratios to the
first configuration, with their range. Why paired rounds: on this kind of (virtual) machine the
speed of the whole machine drifts by 10-20% over minutes, far more than the effects measured;
configurations run minutes apart would compare the drift. A benchmark, not a test.

- prefill: one prompt of ``--prefill-tokens`` token ids, ``max_tokens=1``.
- decode: a short prompt generating ``--decode-tokens`` tokens (EOS ignored); decode time is that
  run's time minus the same prompt's ``max_tokens=1`` time.

``vllm-sparsity bench --metrics-overhead --p 0.9`` instead compares p = 0.9 with the metrics
counters off and on (``additional_config["sparsity_metrics"]``; offline, so without the API
server's periodic poll).

``vllm-sparsity bench --sparsity-of URL`` instead measures, on a running server started with
``VLLM_PLUGINS=sparsity`` and ``--sparsity-target all_inputs``, the mean per-layer sparsity of each
target over a fixed prompt set at each p (``eval/sparsity_table.py``, through ``/v1/sparsity``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _serve_measurements(args: argparse.Namespace) -> None:
    """Child process: start one configuration, then answer ``prefill`` / ``decode`` lines on stdin
    with ``RESULT {"tok_s": ...}`` lines on stdout."""
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
    print("READY " + json.dumps({"startup_s": startup_s}), flush=True)
    for line in sys.stdin:
        if line.strip() == "prefill":
            tok_s = args.prefill_tokens / timed(long_prompt, 1)
        else:
            tok_s = args.decode_tokens / (timed(short_prompt, args.decode_tokens + 1)
                                          - timed(short_prompt, 1))
        print("RESULT " + json.dumps({"tok_s": tok_s}), flush=True)


class _Child:
    """One configuration's subprocess (see ``_serve_measurements``)."""

    def __init__(self, args: argparse.Namespace, p: float | None, metrics_on: bool) -> None:
        cmd = [sys.executable, "-m", "vllm_sparsity.bench", "--_child", "--model", args.model,
               "--target", args.target, "--prefill-tokens", str(args.prefill_tokens),
               "--decode-tokens", str(args.decode_tokens), "--_child-metrics", str(int(metrics_on))]
        if p is not None:
            cmd += ["--_child-p", str(p)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SPARSITY_")}
        # vLLM's CPU backend otherwise reserves 92% of RAM, and several configurations are alive.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"  # stdout carries the READY/RESULT lines
        self.log = tempfile.TemporaryFile(mode="w+")  # vLLM's log, shown if the child fails
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        self.startup_s = self._read("READY ")["startup_s"]

    def _read(self, prefix: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix):])
        self.log.seek(0)
        sys.stderr.write(self.log.read()[-4000:])
        raise SystemExit(f"bench: a configuration's process exited ({self.proc.wait()})")

    def measure(self, kind: str) -> float:
        self.proc.stdin.write(kind + "\n")
        self.proc.stdin.flush()
        return self._read("RESULT ")["tok_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-sparsity bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path (default: the demo model)")
    parser.add_argument("--p", type=float, nargs="*", default=[0.9, 1.0],
                        help="p values to compare with the plugin off (default: 0.9 1.0)")
    parser.add_argument("--target", default="all_inputs")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10,
                        help="measurement rounds; each measures every configuration once")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--sparsity-of", metavar="URL",
                        help="measure per-target sparsity on this running server instead")
    parser.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"))
    parser.add_argument("--metrics-overhead", action="store_true",
                        help="instead: the first --p with the metrics counters off (the baseline) and on")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_child-p", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_child-metrics", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model is None:
        from vllm_sparsity.demo_model import demo_model_path

        args.model = str(demo_model_path())
    if args.sparsity_of:
        from vllm_sparsity.eval.sparsity_table import print_table, sparsity_table

        ps = args.p if args.p != [0.9, 1.0] else [0.5, 0.7, 0.9, 0.95]
        print_table(sparsity_table(args.sparsity_of, ps, args.api_key), ps)
        return 0
    if args._child:
        args.p, args.metrics = args._child_p, bool(args._child_metrics)
        _serve_measurements(args)
        return 0

    # (label, p, metrics counters on); the first is the baseline of the ratios.
    configs = [("off", None, True)] + [(f"p={p:g}", p, True) for p in args.p]
    if args.metrics_overhead:
        configs = [("metrics off", args.p[0], False), ("metrics on", args.p[0], True)]
    children = {}
    try:
        for label, p, metrics_on in configs:  # one at a time: start-up compiles on every core
            children[label] = _Child(args, p, metrics_on)
            print(f"{label:>11}: start-up {children[label].startup_s:6.1f} s", flush=True)
        runs = {label: {"prefill": [], "decode": []} for label in children}
        for i in range(args.rounds):
            order = list(children) if i % 2 == 0 else list(children)[::-1]
            for kind in ("prefill", "decode"):
                for label in order:
                    runs[label][kind].append(children[label].measure(kind))
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(
                f"{label} {runs[label]['prefill'][-1]:.1f}/{runs[label]['decode'][-1]:.2f}"
                for label in children) + " tok/s (prefill/decode)", flush=True)
    finally:
        for child in children.values():
            child.close()
    base = configs[0][0]
    results = {}
    for label, r in runs.items():
        results[label] = {"startup_s": children[label].startup_s}
        for kind in ("prefill", "decode"):
            ratios = [a / b for a, b in zip(r[kind], runs[base][kind])]
            results[label][f"{kind}_tok_s"] = statistics.median(r[kind])
            results[label][f"{kind}_ratio"] = statistics.median(ratios)
            results[label][f"{kind}_ratio_range"] = [min(ratios), max(ratios)]
        print(f"{label:>11}: prefill {results[label]['prefill_tok_s']:7.1f} tok/s, decode "
              f"{results[label]['decode_tok_s']:6.2f} tok/s (medians of {args.rounds} rounds)")
    for label, r in results.items():
        if label != base:
            print(f"{label:>11} / {base}: prefill x{r['prefill_ratio']:.3f} "
                  f"[{r['prefill_ratio_range'][0]:.3f}, {r['prefill_ratio_range'][1]:.3f}], "
                  f"decode x{r['decode_ratio']:.3f} "
                  f"[{r['decode_ratio_range'][0]:.3f}, {r['decode_ratio_range'][1]:.3f}] "
                  f"(median and range of the per-round ratios)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
