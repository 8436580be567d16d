"""The plugin's state in one worker process: the config, the installed sites, their p tensors, the
step's phase buffers and the list of sparse layers."""

from __future__ import annotations

import logging
import math

import torch

from vllm_sparsity import rule
from vllm_sparsity import sites as site_table
from vllm_sparsity._vllm_compat import MICRO_BATCH, NO_REQUESTS
from vllm_sparsity.clock import CLOCK
from vllm_sparsity.config import SparsityConfig
from vllm_sparsity.counters import PAD, PREFILL, token_phases, token_requests
from vllm_sparsity.request_p import P_SLOTS, counter_key, request_slots, token_p

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

    p per request (``request_p`` module): ``token_p[site]`` (float64 [max_num_tokens]) holds the p
    of each token of the step at that site, which the layers pass to the rule as [M, 1]: its
    request's own p, else ``p[site]``. ``request_p`` (float64 [max_num_reqs], NaN: none given)
    holds each request's p in batch order, copied from a host buffer before each forward
    (``set_request_p``, eager, outside any CUDA graph); ``mark_phases`` expands it over the tokens
    with ``query_start_loc`` (capture-safe). ``site_on[site]`` (bool [1]): the site is in the
    current target (a request's p never turns on a site outside it). ``token_slot`` (int64
    [max_num_tokens]): each token's row in the layers' per-p counters (``request_p.P_SLOTS`` for
    none), from ``slot_p`` (float64 [P_SLOTS], the p of each row, NaN: free), which
    ``set_request_p`` fills with each new p it sees (``p_slots``: p -> row).
    ``request_p_applied``: the plugin found the runner's per-step hook (set at bind time).
    """

    def __init__(self, config: SparsityConfig, device: torch.device, max_num_tokens: int,
                 metrics_on: bool = False) -> None:
        self.config = config
        self.started_target = config.target
        self.threshold = rule.threshold_of(config.rule, config.q)
        # Shape [1], not 0-dim: a 0-dim float tensor in the graph makes torch.compile specialise
        # it as a Python scalar, which vLLM's one-shot graph capture cannot restart from.
        self.p = {s: torch.ones(1, dtype=torch.float64, device=device) for s in config.sites}
        self.token_p = {s: torch.ones(max_num_tokens, dtype=torch.float64, device=device)
                        for s in config.sites}
        self.site_on = {s: torch.ones(1, dtype=torch.bool, device=device) for s in config.sites}
        # Set by bind_query_start_loc (sized by the runner's request capacity), with the host
        # buffer it is copied from; _request_p_given: whether the last copy held any p.
        self.request_p: torch.Tensor | None = None
        self._request_p_host: torch.Tensor | None = None
        self._request_p_copied = None  # CUDA event of the last copy (the host buffer is reused)
        self._request_p_given = False
        self.request_p_applied = False
        self.token_slot = torch.full((max_num_tokens,), P_SLOTS, dtype=torch.int64, device=device)
        self.slot_p = torch.full((P_SLOTS,), math.nan, dtype=torch.float64, device=device)
        self.p_slots: dict[float, int] = {}
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
        self.analysis: tuple[int, int] | None = None  # (tokens, rank_batch) while armed (analysis)
        self.analysis_job = None  # a Future of fetched results being computed (analysis.fetch)
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
        device = query_start_loc.device
        num_reqs = query_start_loc.numel() - 1
        self.request_p = torch.full((num_reqs,), math.nan, dtype=torch.float64, device=device)
        self._request_p_host = torch.full((num_reqs,), math.nan, dtype=torch.float64,
                                          pin_memory=device.type == "cuda")

    def set_request_p(self, ps: list[float]) -> None:
        """Before a forward, outside any captured graph: the p of each of the step's requests in
        batch order (NaN: none given; ``request_p.request_ps``). One host-to-device copy of
        [max_num_reqs] float64 when some request of this step or the last carries a p; nothing
        otherwise (the buffer already holds NaN). No-op before ``bind_query_start_loc``.

        Raises:
            ValueError: more requests than the runner's ``query_start_loc`` holds.
        """
        if self.request_p is None:
            return
        given = any(not math.isnan(p) for p in ps)
        if not given and not self._request_p_given:
            return
        for p in ps:  # a new p takes the next free counter row, while there is one
            if not math.isnan(p) and p not in self.p_slots and len(self.p_slots) < P_SLOTS:
                slot = self.p_slots[p] = len(self.p_slots)
                self.slot_p[slot:slot + 1].fill_(p)
        if len(ps) > self.request_p.numel():
            raise ValueError(f"{len(ps)} requests in a step; the buffers hold "
                             f"{self.request_p.numel()}")
        if self._request_p_copied is not None:
            self._request_p_copied.synchronize()  # the last copy has read the host buffer
        host = self._request_p_host.numpy()
        host[:] = math.nan
        host[:len(ps)] = ps
        self.request_p.copy_(self._request_p_host, non_blocking=True)
        if self.request_p.device.type == "cuda":
            self._request_p_copied = torch.cuda.Event()
            self._request_p_copied.record()
        self._request_p_given = given

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
            self._server_p_for_every_token()
            self.token_slot.fill_(P_SLOTS)
        elif step == MICRO_BATCH or self.query_start_loc is None:
            if step == MICRO_BATCH and not self._warned_micro_batch:
                self._warned_micro_batch = True
                logger.warning("vllm-sparsity: micro-batched steps (dual-batch overlap) share one "
                               "phase buffer: their tokens are counted as prefill (padding "
                               "included) and in unknown_phase_tokens, and run at the server's "
                               "p (a request's own sparsity_p is not applied)")
            self.phase.fill_(PREFILL)
            self.batch_phase.fill_(PREFILL)
            self.unknown_phase_tokens.add_(num_tokens)
            self._server_p_for_every_token()  # which token is whose is unknown here
            self.token_slot.fill_(P_SLOTS)
        else:
            token_index = self.token_index[:num_tokens]
            phase, batch = token_phases(self.query_start_loc, token_index)
            self.phase[:num_tokens].copy_(phase)
            self.batch_phase.copy_(batch)
            request = token_requests(self.query_start_loc, token_index)
            for site, buffer in self.token_p.items():
                buffer[:num_tokens].copy_(
                    token_p(self.request_p, self.p[site], self.site_on[site], request))
            slot = request_slots(self.request_p, self.slot_p)[request]
            self.token_slot[:num_tokens].copy_(
                torch.where(token_index < self.query_start_loc[-1], slot, P_SLOTS))

    def _server_p_for_every_token(self) -> None:
        for site, buffer in self.token_p.items():
            buffer.copy_(self.p[site].expand_as(buffer))

    def reset_counters(self) -> None:
        """Zero every layer's counters, ``unknown_phase_tokens`` and the MLP clock, in place (the
        tensors stay the ones a captured CUDA graph writes)."""
        for _, layer in self.layers:
            layer.sparsity_stats.zero_()
            layer.sparsity_p_stats.zero_()
            if hasattr(layer, "sparsity_expert_stats"):  # routed experts (sparse_moe)
                layer.sparsity_expert_stats.zero_()
        self.unknown_phase_tokens.zero_()
        if self.clock:
            CLOCK.reset()

    def p_slots_by_key(self) -> dict[str, int]:
        """The counter row of each request p seen, keyed by ``request_p.counter_key``."""
        return {counter_key(p): slot for p, slot in self.p_slots.items()}

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
            self.token_p[site].fill_(value)  # until the next step's mark_phases
            self.site_on[site].fill_(site in self.config.sites)

    def settings(self) -> dict:
        """The settings as the ``/v1/sparsity`` route answers them."""
        return {**self.config.to_dict(), "resolved_backend": self.backend,
                "targets": self.targets, "sites": list(self.p),
                "started_target": self.started_target}


def runtime_state(model: torch.nn.Module) -> RuntimeState | None:
    """The ``RuntimeState`` that ``replace_mlp`` attached to ``model``, or None."""
    return getattr(model, "_vllm_sparsity", None)
