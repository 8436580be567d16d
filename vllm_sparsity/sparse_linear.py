"""The single seam where the top-p rule meets a linear layer.

``InputSparseLinearMethod`` replaces the ``quant_method`` of a gated MLP's ``gate_up_proj`` or
``down_proj`` (vLLM calls ``layer.quant_method.apply(layer, x, bias)`` from the layer's forward, see
``vllm/model_executor/layers/linear.py``). Its ``apply`` sparsifies x with the top-p rule, counts
what it zeroed, and runs the wrapped method's GEMM on the sparsified input. The layer's own forward
(bias, tensor-parallel all-reduce of ``down_proj``'s output) is untouched, so any model's MLP code
works unchanged. Kernels and metrics plug in here and nowhere else.

Tensor parallelism: ``down_proj`` sees only its rank's shard of K, so its method carries an
``all_reduce`` over the TP group and applies the global rule (the threshold of the whole rows, see
``rule.top_p_threshold``); ``gate_up_proj``'s input is replicated on every rank and needs none.

State lives in non-persistent buffers on the layer, so that vLLM's compiled graph (torch.compile,
CUDA graphs) reads them as inputs and never bakes them in:

- ``sparsity_p``: float64 [1], the process-wide p (one tensor shared by every layer; writing it
  in place changes p for the next step without recompiling);
- ``sparsity_counts``: int64 [2], running (zeroed, total) activation counts of this input, over
  the tokens of real requests (padding and dummy runs excluded); of this rank's shard of K when
  the input is split across TP ranks;
- ``sparsity_phase``: int64 [max tokens], the phase of each token of the step (``metrics.PREFILL``,
  ``DECODE``, ``PAD``), and ``sparsity_batch_phase`` int64 [1], the step's; written before each
  forward by ``RuntimeState.mark_phases`` (one pair shared by every layer);
- ``sparsity_stats`` (only with metrics on): int64 [3, ``metrics.WIDTH``], per phase the zeroed and
  total counts, the per-token sparsity histogram and the weight columns read / in all (see
  ``vllm_sparsity.metrics``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from vllm.model_executor.layers.linear import LinearMethodBase

from vllm_sparsity import metrics
from vllm_sparsity.rule import top_p_sparsify

# Phase buffer length when ``install`` is called outside ``replace_mlp`` (every token: prefill).
DEFAULT_MAX_TOKENS = 8192


class InputSparseLinearMethod(LinearMethodBase):
    """Top-p on the layer input x [..., K] (bf16/fp16/fp32), then ``inner.apply`` -> [..., N].

    Args:
        inner: the layer's original linear method (unquantized or quantized); it does the GEMM.
        site: ``"input"`` (on ``gate_up_proj``) or ``"intermediate"`` (on ``down_proj``).
        layer_index: index of the decoder layer, for stats and logs.
        backend: ``"torch"`` (the torch rule, then ``inner.apply``) or ``"triton"`` (the kernels of
            ``vllm_sparsity.kernels.backend``: K-major weight, input-sparse GEMV for decode batches,
            mask then dense GEMM above; every GEMM of the layer, so ``inner`` only creates weights).
        all_reduce: None when x holds whole rows; for x split over K across tensor-parallel ranks
            (``down_proj`` under TP), an in-place sum over those ranks
            (``_vllm_compat.tp_all_reduce``): every rank then keeps its shard of the whole rows'
            top-p set.
    """

    def __init__(self, inner: LinearMethodBase, site: str, layer_index: int,
                 backend: str = "torch",
                 all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        if backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
        self.inner = inner
        self.site = site
        self.layer_index = layer_index
        self.backend = backend
        self.all_reduce = all_reduce
        # Imported here, not in the traced forward, and only for this backend (it imports triton).
        self._kernels = importlib.import_module("vllm_sparsity.kernels.backend") \
            if backend == "triton" else None

    def create_weights(self, *args, **kwargs):  # weights exist before the swap; kept for the ABC
        return self.inner.create_weights(*args, **kwargs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.backend == "triton":
            # Instead of the inner step, not after it: the triton backend runs every GEMM of the
            # layer itself, and the inner step on CPU packs the weight for oneDNN and deletes
            # layer.weight (on CUDA it does nothing in vLLM 0.32).
            return self._kernels.prepare(layer)
        return self.inner.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.backend == "triton":
            y2, kept, columns_read = self._kernels.apply_counted(
                layer, x2, layer.sparsity_p, self.site, bias, self.all_reduce)
        else:
            y2, kept = top_p_sparsify(x2, layer.sparsity_p, self.all_reduce)
            columns_read = None  # the dense GEMM below reads every column
        _count(layer, kept, x2.shape[-1], columns_read)
        if self.backend == "triton":  # y2 is already the layer's output [M, N]
            return y2.view(*x.shape[:-1], y2.shape[-1])
        return self.inner.apply(layer, y2.view(x.shape), bias)


def _count(layer: torch.nn.Module, kept: torch.Tensor, dim: int,
           columns_read: torch.Tensor | None) -> None:
    """Add this call's counts into the layer's buffers.

    In place, with no host sync: readers copy the buffers out between steps. Built from tensors
    only (a symbolic numel() turned into a tensor breaks vLLM's one-shot graph capture); ``dim``
    (the layer's K) is a constant of the graph.

    Args:
        kept: int64 [M], inputs kept per token.
        dim: K, inputs per token.
        columns_read: int64 [1], weight columns the GEMM loaded; None: all ``dim`` of them.
    """
    phase = layer.sparsity_phase[: kept.shape[0]]
    zeroed = dim - kept
    real = phase != metrics.PAD
    layer.sparsity_counts.add_(torch.stack([torch.where(real, zeroed, 0).sum(),
                                            torch.where(real, dim, 0).sum()]))
    stats = getattr(layer, "sparsity_stats", None)  # read at trace time: metrics on or off
    if stats is None:
        return
    # Histogram bucket of each token's sparsity zeroed/K in ((i)/N, (i+1)/N]: ceil(zeroed*N/K) - 1
    # in integers (exact at the bucket edges), 0 for a token with nothing zeroed.
    bucket = ((zeroed * metrics.SPARSITY_BUCKETS + dim - 1) // dim - 1).clamp(min=0)
    row = phase * metrics.WIDTH  # the PAD row is kept on device and never published
    batch_row = layer.sparsity_batch_phase * metrics.WIDTH
    if columns_read is None:
        columns_read = kept.new_full((1,), dim)
    index = torch.cat([row + metrics.ZEROED, row + metrics.TOTAL, row + metrics.HIST + bucket,
                       batch_row + metrics.COLS_READ, batch_row + metrics.COLS_TOTAL])
    value = torch.cat([zeroed, torch.full_like(zeroed, dim), torch.ones_like(zeroed),
                       columns_read, torch.full_like(columns_read, dim)])
    stats.view(-1).index_add_(0, index, value)


def install(layer: torch.nn.Module, site: str, layer_index: int, p: torch.Tensor,
            backend: str = "torch", phase: torch.Tensor | None = None,
            batch_phase: torch.Tensor | None = None, stats: bool = False,
            all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
    """Swap ``layer.quant_method`` for an ``InputSparseLinearMethod`` and add its buffers.

    ``phase`` / ``batch_phase``: the shared phase buffers of ``RuntimeState`` (default: private
    ones marking every token prefill). ``stats``: add the ``sparsity_stats`` buffer (metrics on).
    ``all_reduce``: for an input split over K across TP ranks (see ``InputSparseLinearMethod``).
    """
    device = p.device
    layer.quant_method = InputSparseLinearMethod(layer.quant_method, site, layer_index, backend,
                                                 all_reduce)
    if phase is None:
        phase = torch.full((DEFAULT_MAX_TOKENS,), metrics.PREFILL, dtype=torch.int64, device=device)
    if batch_phase is None:
        batch_phase = torch.full((1,), metrics.PREFILL, dtype=torch.int64, device=device)
    layer.register_buffer("sparsity_p", p, persistent=False)
    layer.register_buffer(
        "sparsity_counts", torch.zeros(2, dtype=torch.int64, device=device), persistent=False
    )
    layer.register_buffer("sparsity_phase", phase, persistent=False)
    layer.register_buffer("sparsity_batch_phase", batch_phase, persistent=False)
    if stats:
        layer.register_buffer("sparsity_stats", torch.zeros(
            len(metrics.PHASES) + 1, metrics.WIDTH, dtype=torch.int64, device=device),
            persistent=False)
