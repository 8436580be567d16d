"""vLLM general plugin entry point (entry-point group ``vllm.general_plugins``, name ``sparsity``).

vLLM calls ``register()`` in every process it starts (API server, engine core, each worker), before
it builds its argument parser, and possibly more than once per process; it must be idempotent and
cheap. See ``vllm/plugins/__init__.py::load_general_plugins``.
"""

from __future__ import annotations

import logging

from vllm_sparsity import _vllm_compat

logger = logging.getLogger("vllm.vllm_sparsity")  # under vLLM's handler and format


def register() -> None:
    """Install the plugin's hooks into vLLM (idempotent)."""
    _vllm_compat.install()
