"""Routed experts (vLLM's fused-MoE layers: Qwen3-MoE, OLMoE, Mixtral, Gemma 4's MoE blocks):
the rule at the ``input`` and ``intermediate`` sites of every expert (paper Sec. 4.5, App. F).

A fused-MoE layer (``FusedMoEFactory``) is a ``MoERunner`` that routes each token to its top-k
experts on the dense hidden state, then calls its ``RoutedExperts``' ``quant_method.apply(layer, x,
topk_weights, topk_ids, ...)`` (``vllm/model_executor/layers/fused_moe/routed_experts.py``). The
seam is that method: ``SparseFusedMoEMethod`` replaces an unquantized one
(``UnquantizedFusedMoEMethod``) and keeps the routing, the shared experts and the runner's
reductions as vLLM runs them.

- ``input``: the rule on x [M, H], one mask per token, before any expert sees it (the router saw
  the dense x). With ``input`` alone, vLLM's own fused kernel then runs the experts on the
  sparsified x.
- ``intermediate``: per (token, expert) pair, the rule on act-and-mul(w13 x) [I], the input of
  that expert's down projection (w2). vLLM's fused kernels do not expose it, so with this site
  installed the experts run in torch (``experts_forward``: the pairs sorted by expert, two grouped
  GEMMs, ``torch.nn.functional.grouped_mm``) on the checkpoint's plain weights, at any p: the
  paper's semantics and no speed-up (no sparse kernel for experts; slower than vLLM's kernel).

Counters: each site keeps the site buffers of ``sparse_site`` (rows per phase, one row per token
for ``input`` and per pair for ``intermediate``) and ``sparsity_expert_stats`` int64 [E, 2]:
per expert, activations zeroed and in all over the real tokens (each token counted at every expert
it is routed to). Per-expert numbers are for analysis (``GET /v1/sparsity``'s ``experts``), never
metric labels.

Not served (the layer stays dense, with a warning): quantized experts (the torch path needs plain
weights), expert parallelism, data/sequence/context parallel MoE (the tokens the experts see are
not the step's, which the phase buffers describe).
"""

# No `from __future__ import annotations`: torch.library reads ``grouped_linear``'s annotations.
from collections.abc import Callable

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

from vllm_sparsity import _vllm_compat, _vllm_moe, rule, sparse_site
from vllm_sparsity.counters import PAD
from vllm_sparsity.kernels._registry import custom_op

# The sites routed experts take (``sites.SITES``); ``gate`` and ``up`` are not installed on them.
EXPERT_SITES = ("input", "intermediate")
# Columns of ``sparsity_expert_stats`` (``counters.new_expert_stats``).
ZEROED, TOTAL = 0, 1


class ExpertSite(sparse_site.Site):
    """One site of one fused-MoE layer: the buffers of ``sparse_site.attach``, per-expert counters
    ``sparsity_expert_stats`` (int64 [num_experts, 2]: zeroed, total) included."""

    def __init__(self, site: str, layer_index: int, num_experts: int, state,
                 all_reduce: Callable[[torch.Tensor], None] | None) -> None:
        super().__init__(site, layer_index, state, all_reduce, num_experts)

    def sparsify(self, x2: torch.Tensor, threshold, token: torch.Tensor | None,
                 experts: torch.Tensor, rows_per_expert: int, detailed: bool) -> torch.Tensor:
        """The rule on x2 [R, K] (bf16/fp16/fp32), each row at its token's p (its request's own,
        else the site's: ``request_p``), counted here; returns x2 with the dropped entries zeroed.

        Args:
            x2: the site's rows: tokens (``input``) or (token, expert) pairs (``intermediate``).
            threshold: the rule (``rule.threshold_of``).
            token: int64 [R], the token of each row; None when row i is token i.
            experts: int64 [R * rows_per_expert], the expert of each (row, slot) in row-major
                order: a token row feeds its top-k experts (``rows_per_expert`` = k), a pair row
                one (1).
            rows_per_expert: slots per row (see ``experts``).
            detailed: also the histogram counters (metrics on).
        """
        rows, dim = x2.shape
        mask = rule.kept_mask(x2, sparse_site.step_p(self, rows, token), threshold,
                              self.all_reduce)
        kept = mask.sum(dim=-1)
        sparse_site.record(self, kept, dim, None, detailed, token)
        phase = self.sparsity_phase[:rows] if token is None else self.sparsity_phase[token]
        real = (phase != PAD).to(torch.int64)
        zeroed = ((dim - kept) * real).repeat_interleave(rows_per_expert)
        total = (real * dim).repeat_interleave(rows_per_expert)
        self.sparsity_expert_stats.view(-1).index_add_(
            0, torch.cat([experts * 2 + ZEROED, experts * 2 + TOTAL]), torch.cat([zeroed, total]))
        return torch.where(mask, x2, torch.zeros((), dtype=x2.dtype, device=x2.device))


def _grouped_linear_fake(a, w, offs):
    return a.new_empty(a.shape[0], w.shape[1])


# A custom op, opaque to torch.compile: torch's fake (meta) grouped_mm accepts bf16 only, while
# its CPU kernel takes every float dtype (fp32 models included).
@custom_op("grouped_linear", _grouped_linear_fake)
def grouped_linear(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out[r] = w[g] @ a[r] for the rows r of group g (``torch.ops.vllm_sparsity.grouped_linear``).

    Args:
        a: [P, K] rows sorted by group; w: [G, N, K] (a's dtype); offs: int32 [G], the end of
            each group's rows (cumulative counts, ``offs[-1] == P``).

    Returns:
        [P, N] in a's dtype (``torch.nn.functional.grouped_mm``).
    """
    return F.grouped_mm(a, w.transpose(1, 2), offs=offs)


def experts_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    act_and_mul: Callable[[torch.Tensor], torch.Tensor],
                    w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
                    weight_on_input: bool = False,
                    intermediate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                           torch.Tensor] | None = None) -> torch.Tensor:
    """The routed experts in torch: y[t] = sum_j w[t, j] * W2[e] f(W13[e] x[t]), e = ids[t, j].

    Static shapes, no host sync (traceable by torch.compile): the M * k (token, expert) pairs
    are sorted by expert and run through two grouped GEMMs (``grouped_linear``, one group per
    expert); the weighted outputs are summed per token in float32.

    Args:
        x: [M, H] bf16/fp16/fp32, the experts' input.
        w13: [E, N1, H], each expert's gate and up projections stacked (vLLM's ``w13_weight``,
            N1 = 2I for a gated activation, I otherwise).
        w2: [E, H, I], each expert's down projection (``w2_weight``).
        topk_weights: [M, k] float, the router's weights; topk_ids: [M, k] int, its experts.
        act_and_mul: [P, N1] -> [P, I], the experts' activation (vLLM's ``apply_moe_activation``).
        w13_bias, w2_bias: [E, N1] and [E, H], or None.
        weight_on_input: scale each pair's input by its weight instead of its output (vLLM's
            ``apply_router_weight_on_input``, Llama 4).
        intermediate: None, or (a [P, I], token [P], expert [P]) -> a' [P, I] applied to the
            activations of the pairs before w2 (the ``intermediate`` site); pairs are in
            expert order, ``token``/``expert`` int64 name each.

    Returns:
        y [M, H], x's dtype.
    """
    m, k = topk_ids.shape
    ids = topk_ids.reshape(-1).to(torch.int64)
    order = ids.argsort(stable=True)  # pairs grouped by expert
    expert = ids[order]
    token = order // k
    # offs[e]: end of expert e's group among the sorted pairs (cumulative counts).
    offs = torch.searchsorted(expert, torch.arange(w13.shape[0], device=x.device),
                              right=True).to(torch.int32)
    xs = x[token]
    weight = topk_weights.reshape(-1)[order].unsqueeze(1)
    if weight_on_input:
        xs = (xs * weight).to(x.dtype)
    h = grouped_linear(xs, w13, offs)
    if w13_bias is not None:
        h = h + w13_bias[expert]
    a = act_and_mul(h)
    if intermediate is not None:
        a = intermediate(a, token, expert)
    o = grouped_linear(a, w2, offs)
    if w2_bias is not None:
        o = o + w2_bias[expert]
    o = o.float() if weight_on_input else o.float() * weight.float()
    y = torch.zeros(m, x.shape[1], dtype=torch.float32, device=x.device)
    return y.index_add_(0, token, o).to(x.dtype)


class SparseFusedMoEMethod(FusedMoEMethodBase, torch.nn.Module):
    """The fused-MoE method of a ``RoutedExperts`` with the rule at ``sites``.

    An ``nn.Module`` as vLLM's own method is (a ``CustomOp``): it replaces it as the layer's
    ``quant_method`` child, and its ``sites`` (``ExpertSite``) hold the buffers.

    Args:
        inner: the layer's ``UnquantizedFusedMoEMethod`` (it created the weights; with ``input``
            alone its kernel runs the experts).
        sites: a non-empty subset of ``EXPERT_SITES``.
        layer_index: decoder layer index, for counters.
        num_experts: experts on this rank (``num_local_experts``; no expert parallelism).
        state: the worker's ``state.RuntimeState``.
        all_reduce: None, or the in-place sum over TP ranks when the intermediate dimension is
            split over them (the ``intermediate`` site then applies the whole pairs' rule).

    Raises:
        ValueError: ``sites`` is empty or names a site routed experts do not take.
    """

    def __init__(self, inner: FusedMoEMethodBase, sites: tuple[str, ...], layer_index: int,
                 num_experts: int, state,
                 all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        if not sites or not set(sites) <= set(EXPERT_SITES):
            raise ValueError(f"sites must be a non-empty subset of {EXPERT_SITES}, got {sites}")
        torch.nn.Module.__init__(self)  # not FusedMoEMethodBase's: its state is inner's
        self.inner = inner
        self.moe = inner.moe
        self.threshold = state.threshold
        self.detailed_counts = state.metrics
        # vLLM's kernel cannot expose the intermediate site (nor take routing from outside when
        # it is monolithic): the torch experts then run every step.
        self.torch_experts = "intermediate" in sites or inner.is_monolithic
        self.act_and_mul = None  # the experts' activation, set after loading (torch experts)
        self.sites = torch.nn.ModuleDict({
            site: ExpertSite(site, layer_index, num_experts, state,
                             all_reduce if site == "intermediate" else None)
            for site in sites})

    # vLLM reads these from the method (runner, loader): inner's, except that the torch experts
    # have no vLLM kernel (the runner then reduces the output over TP ranks itself).
    @property
    def moe_kernel(self):
        return None if self.torch_experts else self.inner.moe_kernel

    @property
    def moe_quant_config(self):
        return self.inner.moe_quant_config

    @moe_quant_config.setter
    def moe_quant_config(self, value):
        self.inner.moe_quant_config = value

    @property
    def is_monolithic(self) -> bool:
        return False

    @property
    def supports_pre_processed_weights(self) -> bool:
        return not self.torch_experts and self.inner.supports_pre_processed_weights

    @property
    def skip_forward_padding(self) -> bool:
        return self.inner.skip_forward_padding

    @property
    def has_unpadded_output(self) -> bool:
        return False if self.torch_experts else self.inner.has_unpadded_output

    def create_weights(self, *args, **kwargs):  # weights exist before the swap; for the ABC
        return self.inner.create_weights(*args, **kwargs)

    def get_fused_moe_quant_config(self, layer):
        return self.inner.get_fused_moe_quant_config(layer)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # The torch experts read the checkpoint's [E, N1, H] / [E, H, I] weights: vLLM's step would
        # repack them for its kernel (CPU: its grouped-GEMM layout).
        if not self.torch_experts:
            self.inner.process_weights_after_loading(layer)
        else:  # built once, outside the traced forward
            self.act_and_mul = _vllm_moe.moe_act_and_mul(layer, self.inner)

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None):
        k = topk_ids.shape[1]
        if "input" in self.sites:
            x = self.sites["input"].sparsify(x, self.threshold, None,
                                             topk_ids.reshape(-1).to(torch.int64), k,
                                             self.detailed_counts)
        if not self.torch_experts:
            return self.inner.apply(layer, x, topk_weights, topk_ids, shared_experts,
                                    shared_experts_input)
        intermediate = None
        if "intermediate" in self.sites:
            site = self.sites["intermediate"]

            def intermediate(a, token, expert):
                return site.sparsify(a, self.threshold, token, expert, 1, self.detailed_counts)

        return experts_forward(
            x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
            self.act_and_mul,
            getattr(layer, "w13_bias", None), getattr(layer, "w2_bias", None),
            layer.apply_router_weight_on_input, intermediate)


def install(experts: torch.nn.Module, name: str, sites: tuple[str, ...], layer_index: int,
            state) -> None:
    """Replace ``experts.quant_method`` (a ``RoutedExperts``' unquantized method, see
    ``_vllm_moe.moe_refusal``) by a ``SparseFusedMoEMethod`` at ``sites`` and append each
    site's ``(name.site, ExpertSite)`` to ``state.layers`` (what the counters read)."""
    k_shards = _vllm_moe.moe_k_shards(experts)
    method = SparseFusedMoEMethod(experts.quant_method, sites, layer_index,
                                  _vllm_moe.moe_num_experts(experts), state,
                                  _vllm_compat.tp_all_reduce if k_shards > 1 else None)
    experts.quant_method = method
    for site, module in method.sites.items():
        state.layers.append((f"{name}.{site}", module))
