"""The compute backends of the sparse seam, by name, and how ``auto`` picks one per layer.

A backend is a module with three functions (``sparse_linear.InputSparseLinearMethod`` calls them):

- ``unsupported_reason(layer) -> str | None``: why it cannot serve ``layer`` (None: it can);
  checkable before the weights are loaded;
- ``prepare(layer)``: once, after the weights are loaded (weight layout);
- ``apply_counted(layer, x2, p, bias, all_reduce) -> (y2, kept, columns_read)``: the layer's
  output [M, N] for input x2 [M, K] under the rule, inputs kept per row int64 [M], and weight
  columns loaded int64 [1] (None: all K, a dense GEMM). ``all_reduce``: None for whole rows, else
  the in-place sum over the TP ranks holding the other shards of K (the global rule).

Modules are imported on first use only (the triton backend imports triton).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> module implementing the interface above.
BACKENDS = {
    "triton": "vllm_sparsity.kernels.backend",
    "cpu": "vllm_sparsity.kernels.cpu_backend",
    "torch": "vllm_sparsity.torch_backend",
}


def _on_cuda(layer) -> bool:
    return layer.weight.device.type == "cuda"


def _on_cpu(layer) -> bool:
    return layer.weight.device.type == "cpu"


# ``auto``, in order of preference: (backend, whether auto tries it for this layer). The first tried
# backend that supports the layer serves it; a tried one that refuses it is logged with its reason.
# "torch" supports every layer and ends the list.
AUTO = (
    ("triton", _on_cuda),
    ("cpu", _on_cpu),  # x86-64 with AVX2/AVX-512 and a C++ compiler; else it says why
    ("torch", lambda layer: True),
)


def load(name: str) -> ModuleType:
    """The backend module named ``name`` (a key of ``BACKENDS``)."""
    return importlib.import_module(BACKENDS[name])


def choose(layer, requested: str) -> tuple[str, dict[str, str]]:
    """(backend for ``layer``, {preferred backend: why it refused the layer}).

    ``auto`` takes the first entry of ``AUTO`` that it tries and that supports the layer; the
    refusals of those tried before it are returned, for the start-up log. An explicit backend
    that cannot serve the layer stops start-up.

    Raises:
        ValueError: ``requested`` is a backend that cannot serve ``layer`` (the reason says why).
    """
    if requested != "auto":
        reason = load(requested).unsupported_reason(layer)
        if reason is not None:
            raise ValueError(f"--sparsity-backend {requested} cannot serve this model: {reason}")
        return requested, {}
    refused = {}
    for name, tried in AUTO:
        if tried(layer):
            reason = load(name).unsupported_reason(layer)
            if reason is None:
                return name, refused
            refused[name] = reason
    raise AssertionError("AUTO must end with a backend that serves every layer")
