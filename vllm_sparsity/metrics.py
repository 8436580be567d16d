"""Prometheus metrics of vllm-sparsity, served on vLLM's own ``/metrics``.

Series (every one labelled ``model_name``, vLLM's served model name; no request ids, no text):

- ``vllm_sparsity_p_ratio`` gauge {site}: share of each token's L1 mass kept (1 = site off);
- ``vllm_sparsity_config_info`` info {target, backend, resolved_backend, rule};
- ``vllm_sparsity_activations_zeroed_total``, ``vllm_sparsity_activations_total`` counters
  {layer, site, phase}: activations zeroed, and all activations (tokens x inputs);
- ``vllm_sparsity_token_sparsity_ratio`` histogram {layer, site, phase}: per token, the share of
  the site's inputs zeroed;
- ``vllm_sparsity_weight_columns_read_total``, ``vllm_sparsity_weight_columns_total`` counters
  {layer, site, phase}: weight columns the GEMM loaded, and all it would load dense;
- ``vllm_sparsity_weight_skipped_bytes_total`` counter {layer, site, phase}: bytes not loaded;
- ``vllm_sparsity_mlp_latency_seconds`` histogram {phase}: one MLP forward (CPU only; the first
  decoder layer's MLP, once per step);
- ``vllm_sparsity_last_poll_timestamp_seconds`` gauge: Unix time of the last successful poll of
  the workers (the age of every other series);
- ``vllm_sparsity_disagreeing_workers`` gauge: workers whose p, target or backend differ from the
  largest group's (0 when all agree; ``counters.disagreement``);
- ``vllm_sparsity_unknown_phase_tokens_total`` counter: tokens whose phase the worker could not
  tell (no request boundaries from the model runner, see ``state.RuntimeState``); they are counted
  as prefill. Nonzero means the phase split of every other series is wrong.

``layer`` is the decoder layer index, ``site`` is ``input`` (gate_up_proj's input) or
``intermediate`` (down_proj's input), ``phase`` is ``prefill`` or ``decode``: a token is a decode
token when its request's query length in the step is 1. For the weight-column counters and the MLP
latency, ``phase`` is the step's: ``decode`` when every token of the batch is a decode token. A
weight column is one input feature of the linear layer (a row of the K-major weight); the columns
read are what the GEMM really loaded: all of them on the torch backend (a dense GEMM: nothing is
skipped, reported as such), the union of the rows' kept inputs on the triton backend's sparse path.

Data flow, with no host synchronisation on the forward path:

1. Worker, eagerly before each forward (``state.RuntimeState.mark_phases``): the per-token phase
   (0 prefill, 1 decode, 2 padding or dummy run, never published) goes into a persistent device
   buffer, from the model runner's persistent ``query_start_loc`` buffer (bound before vLLM's
   warm-up, the same for every attention backend; tokens without one count in
   ``unknown_phase_tokens``).
2. Worker, inside the compiled graph (``sparse_linear``): each sparsified linear layer adds its
   counts into its own int64 [3, WIDTH] device buffer with one ``index_add_`` (``counters``). On
   CPU, opaque ``mlp_clock`` ops around each MLP feed a host-side histogram (``clock``).
3. API server (this module): ``start_publisher`` (started when vLLM builds its ``AsyncLLM``) asks
   every worker of every engine (data-parallel replicas included) for its snapshot every
   ``VLLM_SPARSITY_METRICS_INTERVAL_S`` seconds through ``engine_rpc.call`` (no deadline inside
   the engine; the poll waits ``POLL_WAIT_S`` and never has two calls in flight), merges the
   ranks and replicas (``counters.merge``), and a custom
   collector in prometheus-client's default registry serves the latest merge. It lives in the API
   server's memory: a restart starts from nothing, and no series outlives the server.

Freshness: a failed poll (late workers, worker error) keeps the last merge, whose counters remain true
lower bounds, and ``vllm_sparsity_last_poll_timestamp_seconds`` stops advancing, so its age shows.
Once the engine is dead (``EngineClient.errored``: vLLM then refuses every request and ``/health``
answers 503), every series but that timestamp is dropped: nothing claims to describe a model that
no longer runs, and the frozen timestamp says since when.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from vllm_sparsity import engine_rpc
from vllm_sparsity.clock import LATENCY_BUCKETS_S
from vllm_sparsity.config import DEFAULT_INTERVAL_S, SparsityConfig, interval_s, metrics_enabled
from vllm_sparsity.counters import (COLS_READ, COLS_TOTAL, HIST, PHASES, SPARSITY_BUCKETS, TOTAL,
                                    ZEROED, merge)

logger = logging.getLogger("vllm.vllm_sparsity")  # under vLLM's handler and format

# name -> help of every series (prometheus-client adds ``_total`` to counters and ``_info`` to
# info families on exposition: they are named here as exposed).
METRICS = {
    "vllm_sparsity_p_ratio": "The rule's p at this site (top-p: share of each token's L1 "
    "activation mass kept); outside the target, the p that keeps everything (1; 0 for max-p).",
    "vllm_sparsity_config_info": "Sparsity target, rule and backend (requested, and resolved "
    "per layer).",
    "vllm_sparsity_activations_zeroed_total": "Activations the top-p rule zeroed (or that were "
    "already zero).",
    "vllm_sparsity_activations_total": "Activations that reached the site (tokens x inputs).",
    "vllm_sparsity_token_sparsity_ratio": "Per token: share of the site's inputs zeroed.",
    "vllm_sparsity_weight_columns_read_total": "Weight columns (input features) the GEMM loaded; "
    "phase = the batch's.",
    "vllm_sparsity_weight_columns_total": "Weight columns the GEMM would load dense; phase = the "
    "batch's.",
    "vllm_sparsity_weight_skipped_bytes_total": "Weight bytes not loaded (all tensor-parallel "
    "shards); phase = the batch's.",
    "vllm_sparsity_mlp_latency_seconds": "Host time of one MLP forward (CPU only); phase = the "
    "batch's.",
    "vllm_sparsity_last_poll_timestamp_seconds": "Unix time of the last successful poll of the "
    "workers: the other vllm_sparsity_* series are that old (only this one remains once the "
    "engine is dead).",
    "vllm_sparsity_disagreeing_workers": "Workers whose p, target or backend differ from the "
    "largest group's (0 = all agree; GET /v1/sparsity lists them).",
    "vllm_sparsity_unknown_phase_tokens_total": "Tokens whose phase could not be told (no request "
    "boundaries from the model runner), counted as prefill; nonzero = the phase split is wrong.",
}
METRIC_NAMES = tuple(METRICS)
# How long one poll waits for the workers, in seconds: a late poll fails (the series keep their
# last values) and the next round waits for its reply (``engine_rpc``); the engine never sees it.
POLL_WAIT_S = 10.0


# ---------------------------------------------------------------- API server: collector


class SparsityCollector:
    """prometheus-client collector of the latest merged snapshot (nothing before the first poll;
    only the poll timestamp once ``engine_client.errored`` or ``dead``)."""

    def __init__(self, model_name: str, engine_client=None) -> None:
        self.model_name = model_name
        self.engine_client = engine_client
        self.snapshot: dict | None = None
        self.polled_at: float | None = None  # Unix time of the last successful poll
        self.dead = False  # set by the poller when a poll finds the engine dead

    def engine_dead(self) -> bool:
        return self.dead or bool(getattr(self.engine_client, "errored", False))

    def describe(self):
        return []  # names vary with the snapshot; skips the registry's trial collect()

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily, InfoMetricFamily)
        from prometheus_client.utils import floatToGoString

        def family(kind, exposed: str, labels: list[str]):
            # prometheus-client appends the suffix of counters (_total) and infos (_info) itself.
            suffix = {CounterMetricFamily: "_total", InfoMetricFamily: "_info"}.get(kind, "")
            return kind(exposed.removesuffix(suffix), METRICS[exposed], labels=labels)

        snap, name = self.snapshot, self.model_name
        if self.polled_at is not None:
            stamp = family(GaugeMetricFamily, "vllm_sparsity_last_poll_timestamp_seconds",
                           ["model_name"])
            stamp.add_metric([name], self.polled_at)
            yield stamp
        if snap is None or self.engine_dead():
            return
        split = snap["settings"]["disagreement"]
        disagreeing = family(GaugeMetricFamily, "vllm_sparsity_disagreeing_workers", ["model_name"])
        disagreeing.add_metric([name], snap["workers"] - len(split[0]["workers"]) if split else 0)
        yield disagreeing
        unknown = family(CounterMetricFamily, "vllm_sparsity_unknown_phase_tokens_total",
                         ["model_name"])
        unknown.add_metric([name], snap.get("unknown_phase_tokens", 0))
        yield unknown
        p = family(GaugeMetricFamily, "vllm_sparsity_p_ratio", ["model_name", "site"])
        for site, value in sorted(snap["p_by_site"].items()):
            p.add_metric([name, site], value)
        yield p
        info = family(InfoMetricFamily, "vllm_sparsity_config_info", ["model_name"])
        settings = snap["settings"]
        info.add_metric([name], {k: settings[k] for k in ("target", "backend",
                                                           "resolved_backend", "rule")})
        yield info

        labels = ["model_name", "layer", "site", "phase"]
        zeroed = family(CounterMetricFamily, "vllm_sparsity_activations_zeroed_total", labels)
        total = family(CounterMetricFamily, "vllm_sparsity_activations_total", labels)
        hist = family(HistogramMetricFamily, "vllm_sparsity_token_sparsity_ratio", labels)
        read = family(CounterMetricFamily, "vllm_sparsity_weight_columns_read_total", labels)
        columns = family(CounterMetricFamily, "vllm_sparsity_weight_columns_total", labels)
        skipped = family(CounterMetricFamily, "vllm_sparsity_weight_skipped_bytes_total", labels)
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
            latency = family(HistogramMetricFamily, "vllm_sparsity_mlp_latency_seconds",
                             ["model_name", "phase"])
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
    """Every ``interval`` seconds, the workers' snapshots merged into ``collector``. A poll the
    workers answer late is not repeated: the next round waits for that same reply
    (``engine_rpc.call(join=True)``), so at most one poll is ever in flight."""
    failures = 0
    while True:
        try:
            merged = merge(await engine_rpc.call(engine_client, "vllm_sparsity_snapshot",
                                                 caller="metrics", wait_s=POLL_WAIT_S, join=True))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # keep the last snapshot; its timestamp shows its age
            if getattr(engine_client, "errored", False):
                collector.dead = True
                logger.warning("vllm-sparsity metrics: engine dead; vllm_sparsity_* series "
                               "dropped but the last poll's timestamp")
                return
            failures += 1
            (logger.warning if failures == 1 else logger.debug)(
                "vllm-sparsity metrics: poll failed (%s), %d in a row; the series keep the last "
                "poll's values (vllm_sparsity_last_poll_timestamp_seconds gives their age)",
                engine_rpc.why(e), failures)
        else:
            if failures:
                logger.info("vllm-sparsity metrics: the workers answered again after %d failed "
                            "polls", failures)
            if merged is None:
                logger.info("vllm-sparsity metrics: no worker runs the sparsity rule; not polling")
                return
            split = merged["settings"]["disagreement"]
            last = collector.snapshot["settings"]["disagreement"] if collector.snapshot else []
            if split and split != last:  # once per change, not every poll
                logger.warning("vllm-sparsity: workers disagree on p/target/backend: %s", split)
            collector.snapshot, collector.polled_at, failures = merged, time.time(), 0
        await asyncio.sleep(interval)


def start_publisher(engine_client, additional_config: Mapping[str, Any] | None,
                    model_name: str) -> asyncio.Task | None:
    """In the API server: poll the workers periodically and serve the result on ``/metrics``.

    Called once the ``AsyncLLM`` exists (see ``plugin.py``), with vLLM's ``additional_config``
    and served model name. Does nothing when sparsity or its metrics are off, or outside a running
    event loop. Replaces an earlier publisher of this process (one engine client per API server)."""
    global _publisher
    if SparsityConfig.from_additional_config(additional_config) is None \
            or not metrics_enabled(additional_config):
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
    collector = SparsityCollector(model_name, engine_client)
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
