"""The analysis sites ``gate`` and ``up`` (``sites.ANALYSIS_SITES``): the rule inside a gated MLP's
act-and-mul, on act(gate_proj x) and/or on up_proj x (paper Sec. 2.2).

vLLM's act-and-mul (``SiluAndMul``, ``GeluAndMul``, ...) maps h = [gate, up] [..., 2d] to
act(gate) * up [..., d] in one op. ``SparseActAndMul`` replaces the MLP's ``act_fn`` and keeps that
op for the product, so the output at p = 1 (the rule keeps every nonzero) is the op's, bit for bit:

- ``up``: the rule zeroes entries of up before the op: act(gate) * rule(up);
- ``gate``: the op runs once more on [gate, 1] to give act(gate) exactly as the op computes it,
  the rule's mask on that, and the product is zeroed where act(gate) is not kept.

These sites change the product fed to ``down_proj`` and skip no weight read: they run the torch
rule (``rule.sparsify``; any rule of ``rule.RULES``) whatever the backend of the linear sites, and
their weight-column counters say that every column was read. Under tensor parallelism h holds this
rank's shard of d; the rule then takes ``all_reduce`` (the whole rows', as for ``intermediate``).

Counters and p live on one small module per site (``sparse_site.Site``), with the buffers
``sparse_linear.install`` gives a linear layer: the ``counters`` module reads both alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_sparsity import rule, sparse_site
from vllm_sparsity.sites import ANALYSIS_SITES


class SparseActAndMul(torch.nn.Module):
    """act-and-mul [..., 2d] -> [..., d] with the rule at the sites ``gate`` and/or ``up``.

    Args:
        inner: the MLP's act-and-mul module (it computes every product).
        sites: the analysis sites to install, a non-empty subset of ``("gate", "up")``.
        layer_index: index of the decoder layer, for counters.
        state: the worker's ``state.RuntimeState`` (p tensors, phase buffers, rule, metrics).
        all_reduce: None for whole rows; the in-place sum over TP ranks when d is sharded.

    Raises:
        ValueError: ``sites`` is empty or names a site that is not an analysis site.
    """

    def __init__(self, inner: torch.nn.Module, sites: tuple[str, ...], layer_index: int, state,
                 all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        super().__init__()
        if not sites or not set(sites) <= set(ANALYSIS_SITES):
            raise ValueError(f"sites must be a non-empty subset of {ANALYSIS_SITES}, got {sites}")
        self.inner = inner
        self.threshold = state.threshold
        self.detailed_counts = state.metrics
        self.sites = torch.nn.ModuleDict(
            {site: sparse_site.Site(site, layer_index, state, all_reduce) for site in sites})

    def _mask(self, site: sparse_site.Site, x2: torch.Tensor) -> torch.Tensor:
        """The rule's mask [M, K] on x2 [M, K] at ``site``, counted there."""
        # One p per token row, as the linear sites (its request's own, else the site's).
        mask = rule.kept_mask(x2, sparse_site.step_p(site, x2.shape[0]), self.threshold,
                              site.all_reduce)
        sparse_site.record(site, mask.sum(dim=-1), x2.shape[-1], None, self.detailed_counts)
        if site.observer is not None:
            site.observer(x2, mask)
        return mask

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h2 = h.reshape(-1, h.shape[-1])
        d = h2.shape[-1] // 2
        gate, up = h2[:, :d], h2[:, d:]
        if "up" in self.sites:
            up = torch.where(self._mask(self.sites["up"], up), up, 0)
            h2 = torch.cat([gate, up], dim=-1)
        y = self.inner(h2)
        if "gate" in self.sites:
            # act(gate) as the op computes it: the product with up = 1 is exact.
            act = self.inner(torch.cat([gate, torch.ones_like(gate)], dim=-1))
            y = torch.where(self._mask(self.sites["gate"], act), y, 0)
        return y.view(*h.shape[:-1], d)


def install(mlp: torch.nn.Module, name: str, sites: tuple[str, ...], layer_index: int, state,
            all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
    """Replace ``mlp.act_fn`` by a ``SparseActAndMul`` at ``sites`` and append each site's
    ``(qualified name, sparse_site.Site)`` to ``state.layers`` (what the counters read)."""
    mlp.act_fn = SparseActAndMul(mlp.act_fn, sites, layer_index, state, all_reduce)
    for site, module in mlp.act_fn.sites.items():
        state.layers.append((f"{name}.act_fn.{site}", module))
