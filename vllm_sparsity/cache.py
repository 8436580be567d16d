"""The plugin's cache folder, shared by the runtime (the CPU kernels' build), the kernels' checks
and the offline tools (demo and random checkpoints, converted eval tasks)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the plugin's cache: ``$VLLM_SPARSITY_CACHE``, else ``$XDG_CACHE_HOME/vllm-sparsity``,
    else ``~/.cache/vllm-sparsity``."""
    if os.environ.get("VLLM_SPARSITY_CACHE"):
        return Path(os.environ["VLLM_SPARSITY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vllm-sparsity"
