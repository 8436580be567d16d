"""The activation counters: one device-side layout per sparse layer, one worker snapshot, one merge.

Both readers, the ``/v1/sparsity`` route (``control``) and ``/metrics`` (``metrics``), read the
same merged snapshot, so they count alike.

Layout: each sparse layer keeps ``sparsity_stats``, int64 [3, WIDTH] on its device. Row = the
token's phase (PREFILL, DECODE, PAD: padding and dummy runs, never published); columns ZEROED and
TOTAL (activations zeroed, and all: tokens x inputs), then with metrics on the per-token sparsity
histogram (HIST, SPARSITY_BUCKETS buckets) and, in the row of the batch's phase, the weight columns
the GEMM read (COLS_READ) and would read dense (COLS_TOTAL). Written inside the compiled graph
(``count``: one ``index_add_``, no host sync), copied out between steps (``snapshot``).

Phases (``token_phases``): a token is a decode token when its request's query length in the step
is 1; the batch's phase is ``decode`` when every token is.

Tensor parallelism (``merge``): TP ranks see the same tokens. A replicated input (gate_up_proj's)
counts the same on every rank, so TP rank 0 speaks for it; a split one (down_proj's under TP, a
shard of K per rank) has its activation and weight-column counts summed over the ranks, which is
exact, while its per-token histogram stays rank 0's shard. Pipeline stages hold different layers
and data-parallel replicas different tokens: their TP rank 0 counts are summed. The sum covers
every replica only when the reply holds every engine's workers: ``_vllm_compat.collective_rpc``
asks each engine (vLLM's own ``collective_rpc`` answers with engine 0's workers alone under data
parallelism).

Routed experts (``sparse_moe``): each expert site also keeps ``sparsity_expert_stats`` int64
[experts, 2] (zeroed, total over the real tokens); ``snapshot`` lists them under ``experts`` and
``merge`` sums them by the rank rules above (the intermediate site is split under TP). They are
analysis output (the route's ``experts``), never metric labels.

Agreement (``merge``): every worker should run the same p, target and backend; a failed or partial
``vllm_sparsity_set`` could leave them apart. The merged ``settings`` are the first worker's, and
``settings["disagreement"]`` lists the distinct settings with the workers holding each (empty when
all agree), so that neither reader hides a split.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

PHASES = ("prefill", "decode")
PREFILL, DECODE, PAD = 0, 1, 2  # ordered: token_phases takes the batch's phase as the minimum
# Per-token sparsity histogram: bucket i counts tokens with sparsity in (i/N, (i+1)/N] (0 in
# bucket 0), so the exposed upper bounds are 0.05, 0.10, ..., 1.0.
SPARSITY_BUCKETS = 20
# Columns of a layer's counter buffer int64 [3 phases, WIDTH]: activation counts and histogram per
# token phase; weight columns read / in all per batch phase.
ZEROED, TOTAL, HIST = 0, 1, 2
COLS_READ = HIST + SPARSITY_BUCKETS
COLS_TOTAL = COLS_READ + 1
WIDTH = COLS_TOTAL + 1


# ---------------------------------------------------------------- worker: inside the graph


def token_phases(query_start_loc: torch.Tensor, token_index: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase of each of the step's tokens, and of the batch, from the requests' boundaries.

    Capture-safe (a CUDA graph may record it): device ops on the given tensors only, no tensor
    built from Python data, no host sync, shapes fixed by the inputs' shapes. On replay the graph
    recomputes the phases from whatever vLLM wrote into its persistent buffer for that step.

    Args:
        query_start_loc: int32/int64 [R + 1], cumulative query lengths of the step's requests:
            vLLM's runner buffer, whose entries past the step's last request repeat its token
            count (``GPUModelRunner`` V1 and V2 both pad it so), so R may exceed the step's
            requests.
        token_index: [T] ``0, 1, ..., T - 1`` (a slice of a preallocated ``arange``), T the
            tokens in the forward, padding included.

    Returns:
        ``(phase, batch_phase)``: int64 [T], PREFILL, DECODE (the token's request has query
        length 1) or PAD (past the last request); int64 [1], PREFILL if any token is prefill,
        else DECODE if any is decode, else PAD.
    """
    qsl = query_start_loc
    ends = qsl[1:]
    r = token_requests(qsl, token_index)
    phase = ((ends - qsl[:-1])[r] == 1).to(torch.int64)  # DECODE (1) if query length 1, else 0
    phase.masked_fill_(token_index >= qsl[-1], PAD)
    # PREFILL < DECODE < PAD: the batch's phase is the least (PAD for an empty forward).
    batch = torch.cat([phase, phase.new_full((1,), PAD)]).min().view(1)
    return phase, batch


def token_requests(query_start_loc: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """int64 [T]: the batch index of each token's request, in [0, R) (padding tokens past the last
    request get some index in range); arguments and capture safety as ``token_phases``."""
    ends = query_start_loc[1:]
    return torch.searchsorted(ends, token_index, right=True).clamp_(max=ends.numel() - 1)


def new_stats(device: torch.device) -> torch.Tensor:
    """A zeroed counter buffer int64 [3, WIDTH] (see module doc)."""
    return torch.zeros(len(PHASES) + 1, WIDTH, dtype=torch.int64, device=device)


def count(stats: torch.Tensor, phase: torch.Tensor, batch_phase: torch.Tensor,
          kept: torch.Tensor, dim: int, columns_read: torch.Tensor | None,
          detailed: bool) -> None:
    """Add one call's counts into ``stats`` in place, with no host sync.

    Built from tensors only (a symbolic numel() turned into a tensor breaks vLLM's one-shot graph
    capture); ``dim`` (the layer's K) and ``detailed`` are constants of the graph.

    Args:
        stats: the layer's int64 [3, WIDTH] buffer.
        phase: int64 [>= M], the phase of each token of the step; batch_phase int64 [1].
        kept: int64 [M], inputs kept per token.
        dim: K, inputs per token.
        columns_read: int64 [1], weight columns the GEMM loaded; None: all ``dim`` of them.
        detailed: also the histogram and weight columns (metrics on); else ZEROED and TOTAL only.
    """
    zeroed = dim - kept
    row = phase[: kept.shape[0]] * WIDTH  # the PAD row is kept on device and never published
    index = [row + ZEROED, row + TOTAL]
    value = [zeroed, torch.full_like(zeroed, dim)]
    if detailed:
        # Histogram bucket of each token's sparsity zeroed/K in (i/N, (i+1)/N]:
        # ceil(zeroed*N/K) - 1 in integers (exact at the bucket edges), 0 for nothing zeroed.
        bucket = ((zeroed * SPARSITY_BUCKETS + dim - 1) // dim - 1).clamp(min=0)
        batch_row = batch_phase * WIDTH
        if columns_read is None:
            columns_read = kept.new_full((1,), dim)
        index += [row + HIST + bucket, batch_row + COLS_READ, batch_row + COLS_TOTAL]
        value += [torch.ones_like(zeroed), columns_read, torch.full_like(columns_read, dim)]
    stats.view(-1).index_add_(0, torch.cat(index), torch.cat(value))


def new_p_stats(device: torch.device) -> torch.Tensor:
    """A zeroed per-request-p counter buffer int64 [``request_p.P_SLOTS`` + 1, 2]: activations
    zeroed (column ZEROED) and in all (TOTAL) per slot; the last row: tokens without a slot
    (no p, a p past the table) and padding, never published."""
    from vllm_sparsity.request_p import P_SLOTS

    return torch.zeros(P_SLOTS + 1, 2, dtype=torch.int64, device=device)


def count_by_p(p_stats: torch.Tensor, token_slot: torch.Tensor, kept: torch.Tensor,
               dim: int) -> None:
    """Add one call's activations zeroed and in all to the rows of the tokens' request-p slots, in
    place, no host sync (as ``count``).

    Args:
        p_stats: the layer's int64 [P_SLOTS + 1, 2] buffer (``new_p_stats``).
        token_slot: int64 [>= M], each token's slot (``state.RuntimeState.token_slot``).
        kept: int64 [M], inputs kept per token.
        dim: K, inputs per token.
    """
    zeroed = dim - kept
    row = token_slot[: kept.shape[0]] * 2
    p_stats.view(-1).index_add_(0, torch.cat([row + ZEROED, row + TOTAL]),
                                torch.cat([zeroed, torch.full_like(zeroed, dim)]))


def new_expert_stats(num_experts: int, device: torch.device) -> torch.Tensor:
    """A zeroed per-expert counter buffer int64 [num_experts, 2]: activations zeroed (column
    ZEROED) and in all (TOTAL) over the real tokens."""
    return torch.zeros(num_experts, 2, dtype=torch.int64, device=device)


def zeroed_total(stats: torch.Tensor) -> torch.Tensor:
    """int64 [2]: activations zeroed and in all over the real tokens (prefill + decode)."""
    return stats[:PAD, ZEROED:TOTAL + 1].sum(dim=0)


# ---------------------------------------------------------------- worker: snapshot


@dataclass(frozen=True)
class SiteInfo:
    """What a sparse site tells the snapshot (``sparse_site.attach`` sets it as ``sparsity_site``).

    Attributes:
        site: a key of ``sites.SITES``.
        layer_index: index of the decoder layer.
        split: the site's input is split over K across TP ranks (its counters are one shard's).
        column_bytes: bytes of one input feature's weights on this rank that the site's GEMM
            reads (0: none, or a weight that is not a plain 2-D tensor: nothing is skipped).
        experts: a routed experts' site, with ``sparsity_expert_stats``.
        crossover: the backend's crossover of the site's layer (``backends``' ``crossover``:
            ``{"m_max", "measured", "source"}``), None for a site without a sparse GEMM.
    """

    site: str
    layer_index: int
    split: bool
    column_bytes: Callable[[], int]
    experts: bool = False
    crossover: Callable[[], dict[str, Any] | None] = lambda: None


def snapshot(state, tp_rank: int, latency: dict | None) -> dict[str, Any]:
    """This worker's settings and counters as plain data for ``collective_rpc``: one stacked
    device-to-host copy.

    Args:
        state: the worker's ``state.RuntimeState``.
        tp_rank: tensor-parallel rank of this worker.
        latency: the MLP clock's snapshot (``clock.MlpClock.snapshot``), None when not timed.

    Returns:
        ``settings`` (``state.settings()``), ``p_by_site``, ``tp_rank``, ``latency``, ``sites``
        (rows ``[layer, site, name, bytes per weight column on this rank, split]``, split: the
        input is split over K across TP ranks), ``stats`` (the matching int64 [3, WIDTH]
        buffers as lists), ``crossover`` (per row of ``sites``, the site's crossover or None),
        ``experts`` (per routed-expert site ``[layer, site, name, split,
        zeroed per expert, total per expert]``) and ``unknown_phase_tokens`` (tokens counted as
        prefill because their phase could not be told, ``state.RuntimeState``).
    """
    layers = [layer for _, layer in state.layers]
    stats = torch.stack([layer.sparsity_stats for layer in layers]).tolist() if layers else []
    p_stats = torch.stack([layer.sparsity_p_stats for layer in layers]).tolist() if layers else []
    sites, experts, crossover = [], [], []
    for name, layer in state.layers:
        info: SiteInfo = layer.sparsity_site
        sites.append([info.layer_index, info.site, name, info.column_bytes(), info.split])
        crossover.append(info.crossover())
        if info.experts:
            zeroed, total = layer.sparsity_expert_stats.t().tolist()
            experts.append([info.layer_index, info.site, name, info.split, zeroed, total])
    return {"settings": state.settings(), "p_by_site": state.p_by_site(), "tp_rank": tp_rank,
            "sites": sites, "stats": stats, "latency": latency, "p_stats": p_stats,
            "p_slots": state.p_slots_by_key(), "request_p_applied": state.request_p_applied,
            "experts": experts, "crossover": crossover,
            "unknown_phase_tokens": int(state.unknown_phase_tokens.sum())}


# ---------------------------------------------------------------- API server: merge


AGREED = ("p", "target", "backend", "rule", "q")  # settings every worker must share


def disagreement(per_worker: list[dict | None]) -> list[dict[str, Any]]:
    """The distinct ``AGREED`` settings among the workers' snapshots, each with ``"workers"``: the
    positions in ``per_worker`` that hold it (engines in order, each engine's workers in rank
    order), largest group first; [] when every worker agrees (None snapshots are skipped)."""
    groups: dict[str, list[int]] = {}
    values: dict[str, dict] = {}
    for i, snap in enumerate(per_worker):
        if snap:
            agreed = {k: snap["settings"].get(k) for k in AGREED}
            key = json.dumps(agreed, sort_keys=True)  # p may be a dict {site: p}: not hashable
            values[key] = agreed
            groups.setdefault(key, []).append(i)
    if len(groups) < 2:
        return []
    return [{**values[key], "workers": workers}
            for key, workers in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))]


def merge(per_worker: list[dict | None]) -> dict[str, Any] | None:
    """One view of all workers' snapshots (see the module doc for the rank rules): the first's
    ``settings`` (plus ``"disagreement"``, see ``disagreement``) and ``p_by_site``, ``sites``
    {(layer, site): {"name", "split", "rows": per phase [WIDTH], "skipped_bytes": per phase,
    "crossover": the first worker's (TP ranks agree on it, see ``kernels/cpu_backend.py``)}},
    ``latency`` (summed over TP rank 0 workers, or None), ``unknown_phase_tokens`` (summed over TP
    rank 0 workers: every rank sees the same tokens) and ``workers`` (snapshots merged). Bytes
    skipped are summed over every rank (each skips its own shard of the weight). None when no
    worker runs the rule."""
    snaps = [s for s in per_worker if s]
    if not snaps:
        return None
    merged = {"settings": {**snaps[0]["settings"], "disagreement": disagreement(per_worker)},
              "p_by_site": snaps[0]["p_by_site"], "workers": len(snaps)}
    sites: dict[tuple[int, str], dict] = {}
    latency = None
    merged["unknown_phase_tokens"] = sum(s.get("unknown_phase_tokens", 0) for s in snaps
                                         if s["tp_rank"] == 0)
    for snap in snaps:
        lead = snap["tp_rank"] == 0
        crossovers = snap.get("crossover") or [None] * len(snap["sites"])
        for (layer, site, name, per_column, split), rows, crossover in zip(
                snap["sites"], snap["stats"], crossovers):
            entry = sites.setdefault((layer, site), {
                "name": name, "split": bool(split), "rows": [[0] * WIDTH for _ in PHASES],
                "skipped_bytes": [0] * len(PHASES), "crossover": crossover})
            for phase in (PREFILL, DECODE):
                if lead:
                    entry["rows"][phase] = [a + b for a, b in
                                            zip(entry["rows"][phase], rows[phase])]
                elif split:  # another shard of the same tokens' inputs
                    for col in (ZEROED, TOTAL, COLS_READ, COLS_TOTAL):
                        entry["rows"][phase][col] += rows[phase][col]
                entry["skipped_bytes"][phase] += \
                    (rows[phase][COLS_TOTAL] - rows[phase][COLS_READ]) * per_column
        if lead and snap["latency"] is not None:
            if latency is None:
                latency = {"counts": [[0] * len(c) for c in snap["latency"]["counts"]],
                           "sums": [0.0] * len(snap["latency"]["sums"])}
            for phase in (PREFILL, DECODE):
                latency["counts"][phase] = [a + b for a, b in zip(
                    latency["counts"][phase], snap["latency"]["counts"][phase])]
                latency["sums"][phase] += snap["latency"]["sums"][phase]
    merged["sites"] = {key: sites[key] for key in sorted(sites)}
    merged["experts"] = _merge_experts(snaps)
    merged["latency"] = latency
    merged["request_p"] = merge_by_p(snaps)
    return merged


def merge_by_p(snaps: list[dict]) -> dict[str, Any]:
    """The route's ``request_p``: ``applied`` (every worker applies a request's p), ``slots`` and
    ``counters`` {p key (``request_p.counter_key``): {site: {"zeroed", "total"}}} summed over the
    layers of each site, with ``merge``'s rank rules (TP rank 0, plus the other ranks' shards of a
    split input). Workers may give one p different slots: they are matched by p."""
    from vllm_sparsity.request_p import FIELD, P_SLOTS

    by_p: dict[str, dict[str, dict[str, int]]] = {}
    for snap in snaps:
        lead = snap["tp_rank"] == 0
        for key, slot in snap.get("p_slots", {}).items():
            sites = by_p.setdefault(key, {})
            for (_, site, _, _, split), rows in zip(snap["sites"], snap.get("p_stats", [])):
                if lead or split:
                    entry = sites.setdefault(site, {"zeroed": 0, "total": 0})
                    entry["zeroed"] += rows[slot][ZEROED]
                    entry["total"] += rows[slot][TOTAL]
    return {"field": FIELD, "slots": P_SLOTS,
            "applied": all(s.get("request_p_applied", False) for s in snaps), "counters": by_p}


def _merge_experts(snaps: list[dict]) -> dict[tuple[int, str], dict]:
    """{(layer, site): {"name", "split", "zeroed": [E], "total": [E]}} over the workers' routed
    experts: TP rank 0 speaks for a replicated input, a split one is summed over the ranks,
    replicas are summed (as ``merge`` does for the sites)."""
    experts: dict[tuple[int, str], dict] = {}
    for snap in snaps:
        for layer, site, name, split, zeroed, total in snap.get("experts", []):
            if snap["tp_rank"] != 0 and not split:
                continue
            entry = experts.setdefault((layer, site), {
                "name": name, "split": bool(split), "zeroed": [0] * len(zeroed),
                "total": [0] * len(total)})
            entry["zeroed"] = [a + b for a, b in zip(entry["zeroed"], zeroed)]
            entry["total"] = [a + b for a, b in zip(entry["total"], total)]
    return {key: experts[key] for key in sorted(experts)}


def route_experts(merged: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``/v1/sparsity`` ``experts`` rows of a merged snapshot: per fused-MoE layer and site,
    in order, the monotonic per-expert counters ``zeroed`` and ``total`` (lists indexed by
    expert id) over the real tokens."""
    return [{"layer": layer, "site": site, "name": entry["name"], "zeroed": entry["zeroed"],
             "total": entry["total"], "split": entry["split"]}
            for (layer, site), entry in merged.get("experts", {}).items()]


def route_layers(merged: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``/v1/sparsity`` rows of a merged snapshot: per (layer, site), in order, the monotonic
    counters ``zeroed`` and ``total`` over the real tokens (prefill + decode), and the layer's
    ``crossover`` (``{"m_max", "measured", "source"}``; None: no sparse GEMM at that site)."""
    return [{"layer": layer, "site": site, "name": entry["name"],
             "zeroed": sum(entry["rows"][ph][ZEROED] for ph in (PREFILL, DECODE)),
             "total": sum(entry["rows"][ph][TOTAL] for ph in (PREFILL, DECODE)),
             "split": entry["split"], "crossover": entry.get("crossover")}
            for (layer, site), entry in merged["sites"].items()]
