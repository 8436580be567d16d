"""Prometheus metrics of vllm-sparsity, served on vLLM's own ``/metrics``.

Series (every one labelled ``model_name``, vLLM's served model name; no request ids, no text):

- ``vllm_sparsity_p_ratio`` gauge {site}: share of each token's L1 mass kept (1 = site off);
- ``vllm_sparsity_config_info`` info {target, backend, resolved_backend};
- ``vllm_sparsity_activations_zeroed_total``, ``vllm_sparsity_activations_total`` counters
  {layer, site, phase}: activations zeroed, and all activations (tokens x inputs);
- ``vllm_sparsity_token_sparsity_ratio`` histogram {layer, site, phase}: per token, the share of
  the site's inputs zeroed;
- ``vllm_sparsity_weight_columns_read_total``, ``vllm_sparsity_weight_columns_total`` counters
  {layer, site, phase}: weight columns the GEMM loaded, and all it would load dense;
- ``vllm_sparsity_weight_skipped_bytes_total`` counter {layer, site, phase}: bytes not loaded;
- ``vllm_sparsity_mlp_latency_seconds`` histogram {phase}: one MLP forward (CPU only; the first
  decoder layer's MLP, once per step).

``layer`` is the decoder layer index, ``site`` is ``input`` (gate_up_proj's input) or
``intermediate`` (down_proj's input), ``phase`` is ``prefill`` or ``decode``: a token is a decode
token when its request's query length in the step is 1. For the weight-column counters and the MLP
latency, ``phase`` is the step's: ``decode`` when every token of the batch is a decode token. A
weight column is one input feature of the linear layer (a row of the K-major weight); the columns
read are what the GEMM really loaded: all of them on the torch backend (a dense GEMM: nothing is
skipped, reported as such), the union of the rows' kept inputs on the triton backend's sparse path.

Data flow, with no host synchronisation on the forward path:

1. Worker, eagerly before each forward (``RuntimeState.mark_phases``): the per-token phase (0
   prefill, 1 decode, 2 padding or dummy run, never published) goes into a persistent device
   buffer, from the attention metadata's ``query_start_loc``.
2. Worker, inside the compiled graph (``sparse_linear``): each sparsified linear layer adds its
   counts into its own int64 [3, WIDTH] device buffer with one ``index_add_``. On CPU, opaque
   ``mlp_clock`` ops around each MLP feed a host-side histogram (``CLOCK``).
3. API server: ``start_publisher`` (started when vLLM builds its ``AsyncLLM``) asks every worker
   for a snapshot every ``VLLM_SPARSITY_METRICS_INTERVAL_S`` seconds through ``collective_rpc``
   (one stacked device-to-host copy per worker), merges tensor/pipeline-parallel ranks, and a
   custom collector in prometheus-client's default registry serves the latest snapshot. It lives
   in the API server's memory: a restart starts from nothing, and no series outlives the server.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from vllm_sparsity.config import SparsityConfig, SparsityConfigError
from vllm_sparsity.kernels._registry import NAMESPACE

logger = logging.getLogger("vllm.vllm_sparsity")  # under vLLM's handler and format

INTERVAL_ENV = "VLLM_SPARSITY_METRICS_INTERVAL_S"
DEFAULT_INTERVAL_S = 5.0
# additional_config key holding whether the workers instrument the graph (process 0 writes it from
# the environment; it is part of vLLM's compile-cache hash, as the graph differs).
ADDITIONAL_CONFIG_KEY = "sparsity_metrics"

PHASES = ("prefill", "decode")
PREFILL, DECODE, PAD = 0, 1, 2  # ordered: token_phases takes the batch's phase as the minimum
# Per-token sparsity histogram: bucket i counts tokens with sparsity in (i/N, (i+1)/N] (0 in
# bucket 0), so the exposed upper bounds are 0.05, 0.10, ..., 1.0.
SPARSITY_BUCKETS = 20
# Columns of a site's counter buffer int64 [3 phases, WIDTH]: activation counts and histogram per
# token phase; weight columns read / in all per batch phase.
ZEROED, TOTAL, HIST = 0, 1, 2
COLS_READ = HIST + SPARSITY_BUCKETS
COLS_TOTAL = COLS_READ + 1
WIDTH = COLS_TOTAL + 1
# MLP forward latency buckets (s): a decode MLP of a small model on CPU takes ~0.1 ms, a long
# prefill of a large one seconds.
LATENCY_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                     0.1, 0.25, 0.5, 1.0, 2.5)

METRIC_NAMES = (
    "vllm_sparsity_p_ratio",
    "vllm_sparsity_config_info",
    "vllm_sparsity_activations_zeroed_total",
    "vllm_sparsity_activations_total",
    "vllm_sparsity_token_sparsity_ratio",
    "vllm_sparsity_weight_columns_read_total",
    "vllm_sparsity_weight_columns_total",
    "vllm_sparsity_weight_skipped_bytes_total",
    "vllm_sparsity_mlp_latency_seconds",
)

CUDA_NOTE = ("vllm_sparsity_mlp_latency_seconds is not published on CUDA: kernels run "
             "asynchronously and CUDA graphs replay no host code, so host clocks around the MLP "
             "would time kernel launches, not the MLP; use vllm:inter_token_latency_seconds")


# ---------------------------------------------------------------- configuration


def interval_s(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between two polls of the workers, from ``VLLM_SPARSITY_METRICS_INTERVAL_S``
    (default 5; 0 turns the metrics off). Raises SparsityConfigError naming the variable."""
    raw = (os.environ if environ is None else environ).get(INTERVAL_ENV, "")
    if raw == "":
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise SparsityConfigError(f"{INTERVAL_ENV} must be a number of seconds >= 0 (0 turns the "
                                  f"metrics off), got {raw!r}")
    return value


def enabled(additional_config: Any) -> bool:
    """Whether the workers instrument the graph (``additional_config["sparsity_metrics"]``, which
    process 0 sets from ``VLLM_SPARSITY_METRICS_INTERVAL_S`` unless given)."""
    if not isinstance(additional_config, Mapping):
        return False
    return bool(additional_config.get(ADDITIONAL_CONFIG_KEY, False))


# ---------------------------------------------------------------- worker: token phases


def token_phases(query_start_loc: torch.Tensor | None, num_tokens: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Phase of each of the step's ``num_tokens`` tokens, and of the batch, on the device.

    Args:
        query_start_loc: int32/int64 [R + 1], cumulative query lengths of the step's requests
            (vLLM's attention metadata; padded entries repeat the last value); None for a dummy
            run (no requests).
        num_tokens: tokens in the forward, padding included.
        device: where to build the result when there is no ``query_start_loc`` (else on its
            device).

    Returns:
        ``(phase, batch_phase)``: int64 [num_tokens], PREFILL, DECODE (the token's request has
        query length 1) or PAD (past the last request); int64 [] PREFILL if any token is prefill,
        else DECODE if any is decode, else PAD. Device ops only (no host sync), so that a CUDA
        graph that records them recomputes them from vLLM's persistent buffer on replay.
    """
    if query_start_loc is None or query_start_loc.numel() < 2 or num_tokens == 0:
        return (torch.full((num_tokens,), PAD, dtype=torch.int64, device=device),
                torch.tensor(PAD, device=device))
    qsl = query_start_loc
    t = torch.arange(num_tokens, dtype=qsl.dtype, device=qsl.device)
    ends = qsl[1:]
    r = torch.searchsorted(ends, t, right=True).clamp_(max=ends.numel() - 1)  # token's request
    phase = ((ends - qsl[:-1])[r] == 1).to(torch.int64)  # DECODE (1) if query length 1, else 0
    phase.masked_fill_(t >= qsl[-1], PAD)
    return phase, phase.min()  # PREFILL < DECODE < PAD: the batch's phase is the least


# ---------------------------------------------------------------- worker: MLP clock (CPU only)


class MlpClock:
    """Host-time histogram of MLP forwards per batch phase, fed by the ``mlp_clock`` op. Valid on
    CPU only, where the compiled graph runs its kernels synchronously on the calling thread."""

    def __init__(self) -> None:
        self.phase = PAD  # the current step's batch phase, set by RuntimeState.mark_phases
        self.start = 0.0
        self.counts = [[0] * (len(LATENCY_BUCKETS_S) + 1) for _ in PHASES]  # last: +Inf
        self.sums = [0.0 for _ in PHASES]

    def tick(self, start: bool) -> None:
        now = time.perf_counter()
        if start:
            self.start = now
        elif self.phase != PAD:
            dt = now - self.start
            self.counts[self.phase][bisect.bisect_left(LATENCY_BUCKETS_S, dt)] += 1  # dt <= le
            self.sums[self.phase] += dt

    def snapshot(self) -> dict:
        return {"counts": [list(c) for c in self.counts], "sums": list(self.sums)}


CLOCK = MlpClock()  # one model per worker process


def _mlp_clock(x: torch.Tensor, start: bool) -> torch.Tensor:
    CLOCK.tick(start)
    return x.clone()


# Registered through torch.library.Library, not torch.library.custom_op (kernels/_registry.py):
# a decode step calls it twice per MLP, and the custom_op wrapper costs about 25 us a call on this
# CPU against 8 us for a plain dispatcher kernel.
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # kept alive: it owns the registration
if getattr(getattr(torch.ops, NAMESPACE), "mlp_clock", None) is None:  # not on re-import
    _LIB.define("mlp_clock(Tensor x, bool start) -> Tensor")
    _LIB.impl("mlp_clock", _mlp_clock, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::mlp_clock", lambda x, start: torch.empty_like(x))


def mlp_clock(x: torch.Tensor, start: bool) -> torch.Tensor:
    """Record the host time into ``CLOCK`` and return a copy of x
    (``torch.ops.vllm_sparsity.mlp_clock``). Opaque to torch.compile; the copy is the data
    dependency that keeps the MLP's first kernels after the start mark and its consumers after
    the end mark."""
    return torch.ops.vllm_sparsity.mlp_clock(x, start)


def time_mlp(mlp: torch.nn.Module) -> None:
    """Put ``mlp_clock`` marks around ``mlp``'s forward (an instance attribute: the class and the
    model code stay untouched; torch.compile traces through it)."""
    forward = mlp.forward

    @functools.wraps(forward)
    def timed_forward(x, *args, **kwargs):
        y = forward(mlp_clock(x, True), *args, **kwargs)
        return mlp_clock(y, False) if isinstance(y, torch.Tensor) else y

    mlp.forward = timed_forward


# ---------------------------------------------------------------- worker: snapshot


def snapshot(state, tp_rank: int) -> dict:
    """This worker's counters as plain data for ``collective_rpc``: one device-to-host copy.

    ``sites`` rows are ``[layer, site, bytes per weight column on this rank, split]`` (split: 1
    when the site's input is split over K across TP ranks, ``down_proj`` under TP); ``stats`` the
    matching int64 [3, WIDTH] buffers."""
    layers = [layer for _, layer in state.layers if hasattr(layer, "sparsity_stats")]
    stats = torch.stack([layer.sparsity_stats for layer in layers]).tolist() if layers else []
    sites = []
    for layer in layers:
        method, w = layer.quant_method, getattr(layer, "weight", None)
        # Bytes of one input feature's weights: N elements of this rank's shard (0 when the
        # weight is not a plain 2-D tensor, e.g. quantized: the torch backend skips nothing).
        per_column = w.shape[0] * w.element_size() if isinstance(w, torch.Tensor) and w.dim() == 2 \
            else 0
        sites.append([method.layer_index, method.site, per_column,
                      int(method.all_reduce is not None)])
    return {**state.describe(), "p_by_site": state.p_by_site(), "tp_rank": tp_rank,
            "sites": sites, "stats": stats,
            "latency": CLOCK.snapshot() if state.clock else None}


# ---------------------------------------------------------------- API server: merge


def merge(per_worker: list[dict | None]) -> dict | None:
    """One view of all workers. Tensor-parallel ranks see the same tokens, so counts and latencies
    come from TP rank 0 of each pipeline stage and data-parallel replica (summed: stages hold
    different layers, replicas different tokens). A replicated input (gate_up_proj's) is the same
    on every TP rank; a split one (down_proj's under TP: each rank holds a shard of K) has its
    activation and weight-column counters summed over the ranks, which is exact, while its
    per-token histogram stays rank 0's shard. Bytes skipped are summed over every rank (each
    skips its own shard of the weight)."""
    snaps = [s for s in per_worker if s]
    if not snaps:
        return None
    first = snaps[0]
    merged = {k: first[k] for k in ("p_by_site", "target", "backend", "resolved_backend")}
    sites: dict[tuple[int, str], dict] = {}
    latency = None
    for snap in snaps:
        lead = snap["tp_rank"] == 0
        for (layer, site, per_column, split), rows in zip(snap["sites"], snap["stats"]):
            entry = sites.setdefault((layer, site), {
                "rows": [[0] * WIDTH for _ in PHASES], "skipped_bytes": [0, 0]})
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
                latency = {"counts": [[0] * (len(LATENCY_BUCKETS_S) + 1) for _ in PHASES],
                           "sums": [0.0 for _ in PHASES]}
            for phase in (PREFILL, DECODE):
                latency["counts"][phase] = [a + b for a, b in zip(
                    latency["counts"][phase], snap["latency"]["counts"][phase])]
                latency["sums"][phase] += snap["latency"]["sums"][phase]
    merged["sites"] = sites
    merged["latency"] = latency
    return merged


# ---------------------------------------------------------------- API server: collector


class SparsityCollector:
    """prometheus-client collector of the latest merged snapshot (nothing before the first)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.snapshot: dict | None = None

    def describe(self):
        return []  # names vary with the snapshot; skips the registry's trial collect()

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily, InfoMetricFamily)
        from prometheus_client.utils import floatToGoString

        snap, name = self.snapshot, self.model_name
        if snap is None:
            return
        p = GaugeMetricFamily("vllm_sparsity_p_ratio", "Top-p share of each token's L1 "
                              "activation mass kept at this site (1 = the site keeps everything).",
                              labels=["model_name", "site"])
        for site, value in sorted(snap["p_by_site"].items()):
            p.add_metric([name, site], value)
        yield p
        info = InfoMetricFamily("vllm_sparsity_config", "Sparsity target and backend "
                                "(requested, and resolved per layer).", labels=["model_name"])
        info.add_metric([name], {"target": snap["target"], "backend": snap["backend"],
                                 "resolved_backend": snap["resolved_backend"]})
        yield info

        labels = ["model_name", "layer", "site", "phase"]
        zeroed = CounterMetricFamily("vllm_sparsity_activations_zeroed", "Activations the top-p "
                                     "rule zeroed (or that were already zero).", labels=labels)
        total = CounterMetricFamily("vllm_sparsity_activations", "Activations that reached the "
                                    "site (tokens x inputs).", labels=labels)
        hist = HistogramMetricFamily("vllm_sparsity_token_sparsity_ratio", "Per token: share of "
                                     "the site's inputs zeroed.", labels=labels)
        read = CounterMetricFamily("vllm_sparsity_weight_columns_read", "Weight columns (input "
                                   "features) the GEMM loaded; phase = the batch's.", labels=labels)
        columns = CounterMetricFamily("vllm_sparsity_weight_columns", "Weight columns the GEMM "
                                      "would load dense; phase = the batch's.", labels=labels)
        skipped = CounterMetricFamily("vllm_sparsity_weight_skipped_bytes", "Weight bytes not "
                                      "loaded (all tensor-parallel shards); phase = the batch's.",
                                      labels=labels)
        upper = [floatToGoString((i + 1) / SPARSITY_BUCKETS) for i in range(SPARSITY_BUCKETS)]
        for (layer, site), entry in sorted(snap["sites"].items()):
            for phase, phase_name in enumerate(PHASES):
                values = [name, str(layer), site, phase_name]
                row = entry["rows"][phase]
                zeroed.add_metric(values, row[ZEROED])
                total.add_metric(values, row[TOTAL])
                cumulative, buckets = 0, []
                for le, n in zip(upper, row[HIST:HIST + SPARSITY_BUCKETS]):
                    cumulative += n
                    buckets.append((le, cumulative))
                buckets.append(("+Inf", cumulative))
                # Sum of the per-token ratios zeroed_t / K = zeroed / K, and K = total / tokens.
                ratio_sum = row[ZEROED] * cumulative / row[TOTAL] if row[TOTAL] else 0.0
                hist.add_metric(values, buckets, sum_value=ratio_sum)
                read.add_metric(values, row[COLS_READ])
                columns.add_metric(values, row[COLS_TOTAL])
                skipped.add_metric(values, entry["skipped_bytes"][phase])
        yield from (zeroed, total, hist, read, columns, skipped)

        if snap["latency"] is not None:
            latency = HistogramMetricFamily("vllm_sparsity_mlp_latency_seconds", "Host time of "
                                            "one MLP forward (CPU only); phase = the batch's.",
                                            labels=["model_name", "phase"])
            upper = [floatToGoString(b) for b in LATENCY_BUCKETS_S] + ["+Inf"]
            for phase, phase_name in enumerate(PHASES):
                cumulative, buckets = 0, []
                for le, n in zip(upper, snap["latency"]["counts"][phase]):
                    cumulative += n
                    buckets.append((le, cumulative))
                latency.add_metric([name, phase_name], buckets,
                                   sum_value=snap["latency"]["sums"][phase])
            yield latency


# ---------------------------------------------------------------- API server: publisher

_publisher: tuple[SparsityCollector, asyncio.Task] | None = None


async def _poll(engine_client, collector: SparsityCollector, interval: float) -> None:
    failures = 0
    while True:
        try:
            merged = merge(await engine_client.collective_rpc("vllm_sparsity_metrics"))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the engine is busy dying or restarting: keep the last snapshot
            if getattr(engine_client, "errored", False):
                logger.info("vllm-sparsity metrics: engine stopped; no more polls")
                return
            failures += 1
            (logger.warning if failures == 1 else logger.debug)(
                "vllm-sparsity metrics: poll failed (%s: %s); retrying", type(e).__name__, e)
        else:
            if merged is None:
                logger.info("vllm-sparsity metrics: no worker runs the sparsity rule; not polling")
                return
            collector.snapshot = merged
        await asyncio.sleep(interval)


def start_publisher(engine_client, vllm_config) -> asyncio.Task | None:
    """In the API server: poll the workers periodically and serve the result on ``/metrics``.

    Called once the ``AsyncLLM`` exists (see ``_vllm_compat``). Does nothing when sparsity or its
    metrics are off, or outside a running event loop. Replaces an earlier publisher of this
    process (one engine client per API server)."""
    global _publisher
    additional_config = vllm_config.additional_config
    if SparsityConfig.from_additional_config(additional_config) is None \
            or not enabled(additional_config):
        return None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    from prometheus_client import REGISTRY

    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        logger.warning("vllm-sparsity metrics: PROMETHEUS_MULTIPROC_DIR is set (e.g. "
                       "--api-server-count > 1), so /metrics serves only multiprocess files; the "
                       "vllm_sparsity_* series are not exported (GET /v1/sparsity still works)")
    stop_publisher()
    collector = SparsityCollector(vllm_config.model_config.served_model_name)
    REGISTRY.register(collector)
    interval = interval_s() or DEFAULT_INTERVAL_S
    task = loop.create_task(_poll(engine_client, collector, interval))
    _publisher = (collector, task)
    logger.info("vllm-sparsity metrics: publishing vllm_sparsity_* on /metrics, polling the "
                "workers every %g s", interval)
    return task


def stop_publisher() -> None:
    """Cancel the poll task and drop its series from the registry (idempotent)."""
    global _publisher
    if _publisher is None:
        return
    from prometheus_client import REGISTRY

    collector, task = _publisher
    task.cancel()
    REGISTRY.unregister(collector)
    _publisher = None
