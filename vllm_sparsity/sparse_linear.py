"""The single seam where the rule meets a linear layer.

``InputSparseLinearMethod`` replaces the ``quant_method`` of a gated MLP's ``gate_up_proj`` or
``down_proj`` (vLLM calls ``layer.quant_method.apply(layer, x, bias)`` from the layer's forward, see
``vllm/model_executor/layers/linear.py``). Its ``apply`` runs the layer's backend (``backends``:
the rule on x, then the GEMM on the sparsified input) and counts what the rule zeroed
(``counters.count``). The layer's own forward (bias, tensor-parallel all-reduce of ``down_proj``'s
output) is untouched, so any model's MLP code works unchanged.

Tensor parallelism: ``down_proj`` sees only its rank's shard of K, so its method carries an
``all_reduce`` over the TP group and applies the global rule (the threshold of the whole rows, see
``rule.top_p_threshold``); ``gate_up_proj``'s input is replicated on every rank and needs none.

State lives in the site buffers of ``sparse_site`` on the layer (p, the step's per-token p, phases
and request-p slots, this layer's counters over this rank's shard of K when the input is split
across TP ranks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm.model_executor.layers.linear import LinearMethodBase

from vllm_sparsity import _vllm_compat, backends, rule, sparse_site


class InputSparseLinearMethod(LinearMethodBase):
    """The rule on the layer input x [..., K] (bf16/fp16/fp32), then the GEMM -> [..., N].

    Args:
        inner: the layer's original linear method (unquantized or quantized); it creates the
            weights, and the torch backend runs its GEMM.
        site: a key of ``sites.SITES`` (``"input"`` on ``gate_up_proj``, ``"intermediate"`` on
            ``down_proj``).
        layer_index: index of the decoder layer, for counters and logs.
        backend: a key of ``backends.BACKENDS``.
        all_reduce: None when x holds whole rows; for x split over K across tensor-parallel ranks
            (``down_proj`` under TP), an in-place sum over those ranks
            (``_vllm_compat.tp_all_reduce``): every rank then keeps its shard of the whole rows'
            top-p set.
        detailed_counts: also keep the histogram and weight-column counters (metrics on).
        threshold: the rule's threshold function (``rule.threshold_of``; default top-p). The
            torch backend applies it; the kernel backends implement top-p only.
        mode: ``config.MODES``: ``"speed"`` lets a kernel backend skip the rule on the steps its
            crossover sends to the dense GEMM (``config.SparsityConfig.mode``).

    Raises:
        ValueError: unknown backend, or a kernel backend with a rule other than top-p.
    """

    def __init__(self, inner: LinearMethodBase, site: str, layer_index: int,
                 backend: str = "torch",
                 all_reduce: Callable[[torch.Tensor], None] | None = None,
                 detailed_counts: bool = False,
                 threshold: Callable[..., torch.Tensor] = rule.top_p_threshold,
                 mode: str = "exact") -> None:
        if backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(backends.BACKENDS)}, "
                             f"got {backend!r}")
        if backend in backends.TOP_P_ONLY and threshold is not rule.top_p_threshold:
            raise ValueError(f"the {backend} backend implements the top-p rule only")
        self.threshold = threshold
        self.mode = mode
        self.inner = inner
        self.site = site
        self.layer_index = layer_index
        self.backend = backend
        self.all_reduce = all_reduce
        self.detailed_counts = detailed_counts
        # Set while an analysis collects (``analysis.arm``, eager servers only): called with the
        # input and the rule's mask. None in a compiled graph, which then holds no trace of it.
        self.observer: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        # Imported here, not in the traced forward (the triton backend imports triton).
        self._backend = backends.load(backend)

    def create_weights(self, *args, **kwargs):  # weights exist before the swap; kept for the ABC
        return self.inner.create_weights(*args, **kwargs)

    # How vLLM's loaders treat the layer's weights: as the wrapped method says (it created them
    # and, on the torch backend, processes them). ``supports_pre_processed_weights``: whether
    # ``process_weights_after_loading`` may run on weights already processed elsewhere (the
    # weight-cache IPC loader): a kernel backend re-lays the weight out, so only the torch backend
    # can pass the wrapped method's answer on.
    @property
    def supports_pre_processed_weights(self) -> bool:
        return self.backend == "torch" and self.inner.supports_pre_processed_weights

    @property
    def uses_meta_device(self) -> bool:
        return self.inner.uses_meta_device

    @property
    def requires_device_loading(self) -> bool:
        return self.inner.requires_device_loading

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # The backend's step instead of the inner one: a kernel backend runs every GEMM of the
        # layer itself, and the inner step on CPU packs the weight for oneDNN and deletes
        # layer.weight (the torch backend runs the inner step).
        self._backend.prepare(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        # One p per token row: its request's own, else the site's (see state.RuntimeState).
        p = sparse_site.step_p(layer, x2.shape[0])
        if self.observer is not None:  # the rule's mask again: the backends do not return it
            self.observer(x2, rule.kept_mask(x2, p, self.threshold, self.all_reduce))
        y2, kept, columns_read = self._backend.apply_counted(layer, x2, p, bias, self.all_reduce,
                                                             self.mode)
        sparse_site.record(layer, kept, x2.shape[-1], columns_read, self.detailed_counts)
        return y2.view(*x.shape[:-1], y2.shape[-1])


def install(layer: torch.nn.Module, name: str, site: str, layer_index: int, state,
            backend: str = "torch",
            all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
    """Swap ``layer.quant_method`` for an ``InputSparseLinearMethod``, mark the layer as needing
    an unquantized input, attach its site buffers (``sparse_site.attach``: p of ``site`` and the
    step buffers of ``state``, a ``state.RuntimeState``; fresh counters; weight-column bytes and
    crossover from the backend) and append ``(name, layer)`` to ``state.layers``. The rule and
    mode are the state's (``RuntimeState.threshold``, ``config.mode``).
    ``all_reduce``: for an input split over K across TP ranks (see ``InputSparseLinearMethod``).
    """
    layer.quant_method = InputSparseLinearMethod(layer.quant_method, site, layer_index, backend,
                                                 all_reduce, state.metrics, state.threshold,
                                                 state.config.mode)
    # The rule reads the input's values: producers must not hand this layer a pre-quantized
    # activation (fp8/nvfp4 methods advertise one, and Llama-style MLPs then fuse act-and-mul with
    # the quantization; vLLM's ``fusion.quant_activation.get_input_quant_key``).
    _vllm_compat.require_unquantized_input(layer)
    backend_module = layer.quant_method._backend
    sparse_site.attach(layer, site, layer_index, state, all_reduce,
                       lambda: backend_module.column_bytes(layer),
                       crossover=lambda: backend_module.crossover_of(layer))
    state.layers.append((name, layer))
