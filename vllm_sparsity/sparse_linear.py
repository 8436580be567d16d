"""The single seam where the top-p rule meets a linear layer.

``InputSparseLinearMethod`` replaces the ``quant_method`` of a gated MLP's ``gate_up_proj`` or
``down_proj`` (vLLM calls ``layer.quant_method.apply(layer, x, bias)`` from the layer's forward, see
``vllm/model_executor/layers/linear.py``). Its ``apply`` sparsifies x with the top-p rule, counts
what it zeroed, and runs the wrapped method's GEMM on the sparsified input. The layer's own forward
(bias, tensor-parallel all-reduce of ``down_proj``'s output) is untouched, so any model's MLP code
works unchanged. Kernels and metrics plug in here and nowhere else.

State lives in non-persistent buffers on the layer, so that vLLM's compiled graph (torch.compile,
CUDA graphs) reads them as inputs and never bakes them in:

- ``sparsity_p``: float64 [1], the process-wide p (one tensor shared by every layer; writing it
  in place changes p for the next step without recompiling);
- ``sparsity_counts``: int64 [2], running (zeroed, total) activation counts of this input.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import LinearMethodBase

from vllm_sparsity.rule import top_p_sparsify


class InputSparseLinearMethod(LinearMethodBase):
    """Top-p on the layer input x [..., K] (bf16/fp16/fp32), then ``inner.apply`` -> [..., N].

    Args:
        inner: the layer's original linear method (unquantized or quantized); it does the GEMM.
        site: ``"input"`` (on ``gate_up_proj``) or ``"intermediate"`` (on ``down_proj``).
        layer_index: index of the decoder layer, for stats and logs.
    """

    def __init__(self, inner: LinearMethodBase, site: str, layer_index: int) -> None:
        self.inner = inner
        self.site = site
        self.layer_index = layer_index

    def create_weights(self, *args, **kwargs):  # weights exist before the swap; kept for the ABC
        return self.inner.create_weights(*args, **kwargs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        return self.inner.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y2, kept = top_p_sparsify(x2, layer.sparsity_p)
        # In-place on a buffer: no host sync; readers copy it out between steps. Built from tensors
        # only: a symbolic numel() turned into a tensor breaks vLLM's one-shot graph capture.
        dim = x2.shape[-1]
        total = torch.full_like(kept, dim)
        layer.sparsity_counts.add_(torch.stack([(total - kept).sum(), total.sum()]))
        return self.inner.apply(layer, y2.view(x.shape), bias)


def install(layer: torch.nn.Module, site: str, layer_index: int, p: torch.Tensor) -> None:
    """Swap ``layer.quant_method`` for an ``InputSparseLinearMethod`` and add its buffers."""
    layer.quant_method = InputSparseLinearMethod(layer.quant_method, site, layer_index)
    layer.register_buffer("sparsity_p", p, persistent=False)
    layer.register_buffer(
        "sparsity_counts", torch.zeros(2, dtype=torch.int64, device=p.device), persistent=False
    )
