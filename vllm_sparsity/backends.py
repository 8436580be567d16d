"""The compute backends of the sparse seam, by name, and how ``auto`` picks one per layer.

A backend is a module with five functions (``sparse_linear.InputSparseLinearMethod`` calls them):

- ``unsupported_reason(layer) -> str | None``: why it cannot serve ``layer`` (None: it can);
  checkable before the weights are loaded;
- ``prepare(layer)``: once, after the weights are loaded (weight layout);
- ``apply_counted(layer, x2, p, bias, all_reduce, mode) -> (y2, kept, columns_read)``: the
  layer's output [M, N] for input x2 [M, K] under the rule, inputs kept per row int64 [M], and
  weight columns loaded int64 [1] (None: all K, a dense GEMM). ``all_reduce``: None for whole
  rows, else the in-place sum over the TP ranks holding the other shards of K (the global rule).
  ``p``: float64 [M, 1], the p of each row (the step's per-token p), or [1] for every row.
  ``mode`` (``config.MODES``): ``"speed"`` skips the rule where the crossover sends M to the
  dense GEMM (kept = K per row, every column read);
- ``crossover_of(layer) -> dict | None``: after ``prepare``, ``{"m_max": rows of x up to which
  the sparse GEMM runs (0: never), "measured": bool, whether timed on this machine (now or from
  its cache), "source": how it was decided}``; None for a backend without a sparse GEMM (torch);
- ``column_bytes(layer) -> int``: bytes of one input feature's weights (one column of the [N, K]
  weight) on this rank that its GEMM reads, after ``prepare``; 0 when the weight is not a plain
  2-D tensor (nothing is then reported skipped).

Modules are imported on first use only (the triton backend imports triton).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vllm_sparsity import _vllm_compat

# name -> module implementing the interface above.
BACKENDS = {
    "triton": "vllm_sparsity.kernels.triton_backend",
    "cpu": "vllm_sparsity.kernels.cpu_backend",
    "torch": "vllm_sparsity.torch_backend",
}


def _device_type(layer) -> str:
    # Any parameter: a quantized layer may have no ``weight`` (AWQ's is ``qweight``).
    return next(layer.parameters()).device.type


def _on_cuda(layer) -> bool:
    return _device_type(layer) == "cuda"


def _on_cpu(layer) -> bool:
    return _device_type(layer) == "cpu"


# ``auto``, in order of preference: (backend, whether auto tries it for this layer). The first tried
# backend that supports the layer serves it; a tried one that refuses it is logged with its reason.
# "torch" supports every layer and ends the list.
AUTO = (
    ("triton", _on_cuda),
    ("cpu", _on_cpu),  # x86-64 with AVX2/AVX-512 and a C++ compiler; else it says why
    ("torch", lambda layer: True),
)


# Backends that run their own GEMM on the layer's plain [N, K] weight: a quantized linear method's
# weights (fp8, int8, packed int4 ...) are not that, and its GEMM would be bypassed. The torch
# backend runs the layer's own method, quantized or not, on the sparsified input.
OWN_GEMM = ("triton", "cpu")
# Backends whose kernels implement the top-p rule only (``rule.RULES`` has more): ``auto`` skips
# them for any other rule, and the config refuses them explicitly (``config.check_together``).
TOP_P_ONLY = ("triton", "cpu")


def load(name: str) -> ModuleType:
    """The backend module named ``name`` (a key of ``BACKENDS``)."""
    return importlib.import_module(BACKENDS[name])


def choose(layer, requested: str, rule: str = "top-p") -> tuple[str, dict[str, str]]:
    """(backend for ``layer``, {preferred backend: why it refused the layer}).

    ``auto`` takes the first entry of ``AUTO`` that it tries and that supports the layer; the
    refusals of those tried before it are returned, for the start-up log. For a ``rule`` other
    than top-p it tries no ``TOP_P_ONLY`` backend (the torch backend runs every rule). An
    explicit backend that cannot serve the layer stops start-up.

    Raises:
        ValueError: ``requested`` is a backend that cannot serve ``layer`` (the reason says why).
    """
    if requested != "auto":
        reason = (f"its kernels implement the top-p rule only, not {rule}"
                  if requested in TOP_P_ONLY and rule != "top-p"
                  else _unsupported_reason(requested, layer))
        if reason is not None:
            raise ValueError(f"--sparsity-backend {requested} cannot serve this model: {reason}")
        return requested, {}
    refused = {}
    for name, tried in AUTO:
        if tried(layer) and not (name in TOP_P_ONLY and rule != "top-p"):
            reason = _unsupported_reason(name, layer)
            if reason is None:
                return name, refused
            refused[name] = reason
    raise AssertionError("AUTO must end with a backend that serves every layer")


def _unsupported_reason(name: str, layer) -> str | None:
    """Why backend ``name`` cannot serve ``layer`` (its linear method not yet swapped), or None."""
    method = getattr(layer, "quant_method", None)
    if name in OWN_GEMM and not _vllm_compat.is_unquantized(method):
        return (f"quantized weights ({type(method).__name__}) are not supported by its kernels, "
                "which read a plain bf16/fp16/fp32 weight; the torch backend serves them")
    return load(name).unsupported_reason(layer)
