"""The plugin's state in one worker process: the config, the installed sites, their p tensors, the
step's phase buffers and the list of sparse layers."""

from __future__ import annotations

import logging

import torch

from vllm_sparsity import rule
from vllm_sparsity import sites as site_table
from vllm_sparsity._vllm_compat import MICRO_BATCH, NO_REQUESTS
from vllm_sparsity.clock import CLOCK
from vllm_sparsity.config import SparsityConfig
from vllm_sparsity.counters import PAD, PREFILL, token_phases

logger = logging.getLogger("vllm.vllm_sparsity")  # under vLLM's handler and format


class RuntimeState:
    """Attached to the model by ``replace.replace_mlp``; read by ``control`` and ``counters``.

    Each site (``sites.SITES``) of the target given at start-up has one float64 [1] tensor
    ``p[site]`` shared by all its layers. A site outside the current target holds the rule's p
    that keeps every nonzero entry (``rule.KEEP_ALL_P``), so the target can change at runtime
    among the sites installed at start-up without retracing a graph. The rule itself
    (``threshold``) is fixed at start-up: it is part of the compiled graph.

    ``phase`` (int64 [max_num_tokens]) and ``batch_phase`` (int64 [1]) hold the phase of each token
    of the current step and of the step (``counters.PREFILL``, ``DECODE``, ``PAD``; every token is
    prefill until ``mark_phases`` runs); every sparse layer reads them. ``metrics``: the layers also
    keep the histogram and weight-column counters; ``clock``: MLP forwards are timed (CPU only).
    ``layers``: ``(name, layer)`` of every linear layer that applies the rule, in model order.

    Token phases come from the model runner's persistent ``query_start_loc`` buffer, bound once
    before vLLM's warm-up (``bind_query_start_loc``); ``unknown_phase_tokens`` (int64 [1]) counts
    the tokens whose phase could not be told (no such buffer, or micro-batched steps): they are
    counted as prefill.
    """

    def __init__(self, config: SparsityConfig, device: torch.device, max_num_tokens: int,
                 metrics_on: bool = False) -> None:
        self.config = config
        self.started_target = config.target
        self.threshold = rule.threshold_of(config.rule, config.q)
        # Shape [1], not 0-dim: a 0-dim float tensor in the graph makes torch.compile specialise
        # it as a Python scalar, which vLLM's one-shot graph capture cannot restart from.
        self.p = {s: torch.ones(1, dtype=torch.float64, device=device) for s in config.sites}
        self.backend = config.backend  # resolved per layer by replace_mlp ("torch", "triton")
        self.phase = torch.full((max_num_tokens,), PREFILL, dtype=torch.int64, device=device)
        self.batch_phase = torch.full((1,), PREFILL, dtype=torch.int64, device=device)
        self.unknown_phase_tokens = torch.zeros(1, dtype=torch.int64, device=device)
        # Set by bind_query_start_loc: vLLM's buffer [max_num_reqs + 1] and an arange over the
        # token axis in its dtype, both persistent, so a captured CUDA graph reads them on replay.
        self.query_start_loc: torch.Tensor | None = None
        self.token_index: torch.Tensor | None = None
        self.bound = False
        self._warned_micro_batch = False
        self.metrics = metrics_on
        self.clock = metrics_on and torch.device(device).type == "cpu"
        if self.clock:  # the clock's op reads the step's phase itself (CPU tensor, no sync)
            CLOCK.batch_phase = self.batch_phase
        self.layers: list[tuple[str, torch.nn.Module]] = []  # filled by sparse_linear.install
        self.set(p=config.p, target=config.target)

    def bind_query_start_loc(self, query_start_loc: torch.Tensor | None, source: str) -> None:
        """Take token phases from ``query_start_loc`` from now on (None: none was found; every
        token then counts as prefill and in ``unknown_phase_tokens``, with one warning).

        Args:
            query_start_loc: int32/int64 [max_num_reqs + 1] on the model's device, the runner's
                persistent buffer (see ``counters.token_phases``), or None.
            source: what was searched (the runner's class), for the warning.
        """
        self.bound = True
        if query_start_loc is None:
            logger.warning(
                "vllm-sparsity: %s has no query_start_loc buffer that the plugin knows: token "
                "phases are unknown, every token is counted as prefill (padding included) and in "
                "unknown_phase_tokens", source)
            return
        self.query_start_loc = query_start_loc
        self.token_index = torch.arange(self.phase.numel(), dtype=query_start_loc.dtype,
                                        device=query_start_loc.device)

    def mark_phases(self, num_tokens: int, step: str) -> None:
        """Before a forward of ``num_tokens`` tokens: write each token's phase and the step's into
        the shared buffers. Capture-safe: in-place device ops on persistent tensors, no tensor
        built from Python data, no host sync (a full CUDA graph records this and replays it).

        Args:
            num_tokens: tokens in the forward, padding included (<= the buffers' length).
            step: what the forward is (``_vllm_compat.step_kind``).
        """
        if step == NO_REQUESTS or not self.bound:  # dummy runs, and everything before warm-up
            self.phase.fill_(PAD)
            self.batch_phase.fill_(PAD)
        elif step == MICRO_BATCH or self.query_start_loc is None:
            if step == MICRO_BATCH and not self._warned_micro_batch:
                self._warned_micro_batch = True
                logger.warning("vllm-sparsity: micro-batched steps (dual-batch overlap) share one "
                               "phase buffer: their tokens are counted as prefill (padding "
                               "included) and in unknown_phase_tokens")
            self.phase.fill_(PREFILL)
            self.batch_phase.fill_(PREFILL)
            self.unknown_phase_tokens.add_(num_tokens)
        else:
            phase, batch = token_phases(self.query_start_loc, self.token_index[:num_tokens])
            self.phase[:num_tokens].copy_(phase)
            self.batch_phase.copy_(batch)

    def reset_counters(self) -> None:
        """Zero every layer's counters, ``unknown_phase_tokens`` and the MLP clock, in place (the
        tensors stay the ones a captured CUDA graph writes)."""
        for _, layer in self.layers:
            layer.sparsity_stats.zero_()
            if hasattr(layer, "sparsity_expert_stats"):  # routed experts (sparse_moe)
                layer.sparsity_expert_stats.zero_()
        self.unknown_phase_tokens.zero_()
        if self.clock:
            CLOCK.reset()

    def p_by_site(self) -> dict[str, float]:
        """p of each installed site as ``set`` wrote it (``SparsityConfig.p_of``: the rule's
        keep-every-nonzero p for a site outside the target)."""
        return {site: self.config.p_of(site) for site in self.p}

    @property
    def targets(self) -> list[str]:
        """Named targets reachable at runtime: those whose sites are all installed (any comma
        list of installed sites is reachable too)."""
        return [t for t, need in site_table.TARGETS.items() if set(need) <= set(self.p)]

    def reachable(self, target: str) -> bool:
        """Whether ``target`` (a valid target) names installed sites only."""
        return set(site_table.sites_of(target)) <= set(self.p)

    def set(self, p: float | dict[str, float] | None = None, target: str | None = None) -> None:
        """Change p and/or target in place (validated values; see ``control``). Raises
        ValueError (``config.SparsityConfigError``) for a target with sites not installed, or a
        per-site p that does not name the target's sites."""
        config = self.config.with_changes(p=p, target=target)
        if not self.reachable(config.target):
            raise ValueError(f"target {config.target!r} is not installed; installed sites: "
                             f"{', '.join(self.p)}")
        self.config = config
        for site, value in self.p_by_site().items():
            self.p[site].fill_(value)

    def settings(self) -> dict:
        """The settings as the ``/v1/sparsity`` route answers them."""
        return {**self.config.to_dict(), "resolved_backend": self.backend,
                "targets": self.targets, "sites": list(self.p),
                "started_target": self.started_target}


def runtime_state(model: torch.nn.Module) -> RuntimeState | None:
    """The ``RuntimeState`` that ``replace_mlp`` attached to ``model``, or None."""
    return getattr(model, "_vllm_sparsity", None)
