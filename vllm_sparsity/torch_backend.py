"""The torch backend of the sparse seam (see ``backends``): the exact torch rule on the input (any
rule of ``rule.RULES``: the method's ``threshold``), then the layer's own linear method (vLLM's
dense GEMM, quantized or not) on the sparsified input.

Serves every layer on every device. It gives the paper's semantics, not speed: the dense GEMM
still reads every weight column.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_sparsity.rule import sparsify


def unsupported_reason(layer: torch.nn.Module) -> None:
    """None: any layer (the GEMM is the layer's own method's)."""
    return None


def prepare(layer: torch.nn.Module) -> None:
    """The wrapped method's own step after loading (on CPU vLLM packs the weight for oneDNN)."""
    layer.quant_method.inner.process_weights_after_loading(layer)


def column_bytes(layer: torch.nn.Module) -> int:
    """Bytes of one column of the layer's plain [N, K] weight; 0 for any other weight (quantized,
    or deleted by vLLM's CPU packing): this backend skips no column either way."""
    w = getattr(layer, "weight", None)
    return w.shape[0] * w.element_size() if isinstance(w, torch.Tensor) and w.dim() == 2 else 0


def crossover_of(layer: torch.nn.Module) -> None:
    """None: no sparse GEMM, so no crossover (the rule runs at every batch size, in both modes)."""
    return None


def apply_counted(layer: torch.nn.Module, x2: torch.Tensor, p: torch.Tensor,
                  bias: torch.Tensor | None = None,
                  all_reduce: Callable[[torch.Tensor], None] | None = None,
                  mode: str = "exact") -> tuple[torch.Tensor, torch.Tensor, None]:
    """``(inner.apply(rule(x2)), kept [M], None)``: x2 [M, K]; p float64 [1] or [M, 1] (one per
    row); the rule is the method's ``threshold`` (``rule.threshold_of``); the GEMM reads every
    column (None). ``all_reduce`` as ``rule.top_p_threshold``. ``mode`` changes nothing here: with
    no crossover, no step is sent to a dense path past it."""
    method = layer.quant_method
    xs, kept = sparsify(x2, p, method.threshold, all_reduce)
    return method.inner.apply(layer, xs, bias), kept, None
