"""The contract every sparse site keeps: a linear layer's (``sparse_linear``), an act-and-mul's
(``sparse_act``) and a routed experts' (``sparse_moe``).

A site is a module that holds, as non-persistent buffers (so that vLLM's compiled graph reads them
as inputs and never bakes them in), and as one ``counters.SiteInfo`` in ``sparsity_site``:

- ``sparsity_p``: float64 [1], the site's p, shared by every layer of the site (``state.
  RuntimeState.p``: writing it in place changes p for the next step without recompiling);
- ``sparsity_token_p``: float64 [max tokens], the p of each token of the step at the site (its
  request's own p, else ``sparsity_p``; shared by the site's layers), given to the rule as [M, 1];
- ``sparsity_phase``: int64 [max tokens], each token's phase, and ``sparsity_batch_phase`` int64
  [1], the step's (one pair shared by every site);
- ``sparsity_token_slot``: int64 [max tokens], each token's request-p slot (shared);
- ``sparsity_stats``: int64 [3, ``counters.WIDTH``], this site's counters, and
  ``sparsity_p_stats`` int64 [``request_p.P_SLOTS`` + 1, 2], its counters per request p;
- routed experts only: ``sparsity_expert_stats`` int64 [experts, 2], zeroed and in all per expert.

``attach`` gives a module all of these, ``step_p`` reads the rows' p, ``record`` counts one call;
``counters.snapshot`` reads a site through ``sparsity_site`` and these buffers alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_sparsity import counters


def attach(module: torch.nn.Module, site: str, layer_index: int, state,
           all_reduce: Callable[[torch.Tensor], None] | None = None,
           column_bytes: Callable[[], int] | None = None, num_experts: int = 0,
           crossover: Callable[[], dict | None] | None = None) -> None:
    """Register the site buffers of the module doc on ``module`` (p of ``site`` and the step
    buffers of ``state``, a ``state.RuntimeState``; fresh counters) and its ``sparsity_site``.

    Args:
        site: a key of ``sites.SITES``.
        layer_index: index of the decoder layer.
        all_reduce: None when the site's input holds whole rows; the in-place sum over the TP
            ranks holding the other shards of K otherwise (its counters are then one shard's).
        column_bytes: bytes of one input feature's weights on this rank that the site's GEMM
            reads (``backends``' ``column_bytes``); None: the site reads no weight (0).
        num_experts: routed experts of the site (0: not an experts' site).
        crossover: the backend's crossover of the site's layer (``backends``' ``crossover``);
            None: the site has no sparse GEMM.
    """
    device = state.phase.device
    module.register_buffer("sparsity_p", state.p[site], persistent=False)
    module.register_buffer("sparsity_token_p", state.token_p[site], persistent=False)
    module.register_buffer("sparsity_phase", state.phase, persistent=False)
    module.register_buffer("sparsity_batch_phase", state.batch_phase, persistent=False)
    module.register_buffer("sparsity_token_slot", state.token_slot, persistent=False)
    module.register_buffer("sparsity_stats", counters.new_stats(device), persistent=False)
    module.register_buffer("sparsity_p_stats", counters.new_p_stats(device), persistent=False)
    if num_experts:
        module.register_buffer("sparsity_expert_stats", counters.new_expert_stats(
            num_experts, device), persistent=False)
    module.sparsity_site = counters.SiteInfo(site, layer_index, all_reduce is not None,
                                             column_bytes or (lambda: 0), num_experts > 0,
                                             crossover or (lambda: None))


def step_p(module: torch.nn.Module, rows: int, token: torch.Tensor | None = None
           ) -> torch.Tensor:
    """float64 [rows, 1]: the p of each row, its token's (``token`` int64 [rows]: the token of
    each row; None when row i is token i)."""
    p = module.sparsity_token_p[:rows] if token is None else module.sparsity_token_p[token]
    return p.unsqueeze(1)


def record(module: torch.nn.Module, kept: torch.Tensor, dim: int,
           columns_read: torch.Tensor | None, detailed: bool,
           token: torch.Tensor | None = None) -> None:
    """Count one call of the site in its buffers, in place, no host sync (``counters.count`` and
    ``counters.count_by_p``).

    Args:
        kept: int64 [M], inputs kept per row.
        dim: K, inputs per row.
        columns_read: int64 [1], weight columns the GEMM loaded; None: all ``dim``.
        detailed: also the histogram and weight-column counters (metrics on).
        token: int64 [M], the token of each row; None when row i is token i.
    """
    phase = module.sparsity_phase if token is None else module.sparsity_phase[token]
    slot = module.sparsity_token_slot if token is None else module.sparsity_token_slot[token]
    counters.count(module.sparsity_stats, phase, module.sparsity_batch_phase, kept, dim,
                   columns_read, detailed)
    counters.count_by_p(module.sparsity_p_stats, slot, kept, dim)


class Site(torch.nn.Module):
    """A site that is not a linear layer (an act-and-mul's, a routed experts'): the buffers of
    ``attach`` and, as ``sparse_linear.InputSparseLinearMethod`` carries them, ``site``,
    ``layer_index``, ``all_reduce`` and ``observer`` (set while an analysis collects)."""

    def __init__(self, site: str, layer_index: int, state,
                 all_reduce: Callable[[torch.Tensor], None] | None, num_experts: int = 0) -> None:
        super().__init__()
        self.site, self.layer_index, self.all_reduce = site, layer_index, all_reduce
        self.observer: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        attach(self, site, layer_index, state, all_reduce, num_experts=num_experts)
