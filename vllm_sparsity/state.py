"""The plugin's state in one worker process: the config, the installed sites, their p tensors, the
step's phase buffers and the list of sparse layers."""

from __future__ import annotations

import torch

from vllm_sparsity import sites as site_table
from vllm_sparsity.clock import CLOCK
from vllm_sparsity.config import SparsityConfig
from vllm_sparsity.counters import PREFILL, token_phases


class RuntimeState:
    """Attached to the model by ``replace.replace_mlp``; read by ``control`` and ``counters``.

    Each site (``input``, ``intermediate``) of the target given at start-up has one float64 [1]
    tensor ``p[site]`` shared by all its layers. A site outside the current target holds p = 1,
    which keeps every nonzero entry, so the target can change at runtime among the sites installed
    at start-up without retracing a graph.

    ``phase`` (int64 [max_num_tokens]) and ``batch_phase`` (int64 [1]) hold the phase of each token
    of the current step and of the step (``counters.PREFILL``, ``DECODE``, ``PAD``; every token is
    prefill until ``mark_phases`` runs); every sparse layer reads them. ``metrics``: the layers also
    keep the histogram and weight-column counters; ``clock``: MLP forwards are timed (CPU only).
    ``layers``: ``(name, layer)`` of every linear layer that applies the rule, in model order.
    """

    def __init__(self, config: SparsityConfig, device: torch.device, max_num_tokens: int,
                 metrics_on: bool = False) -> None:
        self.config = config
        self.started_target = config.target
        # Shape [1], not 0-dim: a 0-dim float tensor in the graph makes torch.compile specialise
        # it as a Python scalar, which vLLM's one-shot graph capture cannot restart from.
        self.p = {s: torch.ones(1, dtype=torch.float64, device=device) for s in config.sites}
        self.backend = config.backend  # resolved per layer by replace_mlp ("torch", "triton")
        self.phase = torch.full((max_num_tokens,), PREFILL, dtype=torch.int64, device=device)
        self.batch_phase = torch.full((1,), PREFILL, dtype=torch.int64, device=device)
        self.metrics = metrics_on
        self.clock = metrics_on and torch.device(device).type == "cpu"
        self.layers: list[tuple[str, torch.nn.Module]] = []  # filled by sparse_linear.install
        self.set(p=config.p, target=config.target)

    def mark_phases(self, num_tokens: int, query_start_loc: torch.Tensor | None) -> None:
        """Before a forward of ``num_tokens`` tokens: write each token's phase and the step's into
        the shared buffers (device ops, no host sync; see ``counters.token_phases``)."""
        phase, batch = token_phases(query_start_loc, num_tokens, self.phase.device)
        self.phase[:num_tokens].copy_(phase)
        self.batch_phase.copy_(batch)
        if self.clock:  # CPU tensors: reading one is no device sync
            CLOCK.phase = int(batch)

    def p_by_site(self) -> dict[str, float]:
        """p of each installed site as ``set`` wrote it (1 for a site outside the target)."""
        return {site: self.config.p_of(site) for site in self.p}

    @property
    def targets(self) -> list[str]:
        """Targets reachable at runtime: those whose sites are all installed."""
        return [t for t, need in site_table.TARGETS.items() if set(need) <= set(self.p)]

    def set(self, p: float | None = None, target: str | None = None) -> None:
        """Change p and/or target in place (validated values; see ``control``)."""
        if target is not None and target not in self.targets:
            raise ValueError(f"target {target!r} is not installed; available: {self.targets}")
        self.config = SparsityConfig(p=self.config.p if p is None else p,
                                     target=target or self.config.target,
                                     backend=self.config.backend)
        for site, value in self.p_by_site().items():
            self.p[site].fill_(value)

    def settings(self) -> dict:
        """The settings as the ``/v1/sparsity`` route answers them."""
        return {**self.config.to_dict(), "resolved_backend": self.backend,
                "targets": self.targets, "started_target": self.started_target}


def runtime_state(model: torch.nn.Module) -> RuntimeState | None:
    """The ``RuntimeState`` that ``replace_mlp`` attached to ``model``, or None."""
    return getattr(model, "_vllm_sparsity", None)
