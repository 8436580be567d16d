"""Metrics: the exposition of a merged snapshot and the publisher (replicas summed, ranks that
disagree reported, stale and dead engines); then end to end, a real Prometheus scraping the
session's sparse server: every dashboard and rule query returns data, and the values match ground
truth (the requests' token usage, vLLM's own counters, the /v1/sparsity route). Last of the
session, a worker of that server is killed. The counters and their merge are tested in
test_counters.py."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_counters import site_rows, worker

from conftest import free_port
from vllm_sparsity import config, control, metrics
from vllm_sparsity.clock import LATENCY_BUCKETS_S
from vllm_sparsity.counters import HIST, PREFILL, SPARSITY_BUCKETS, merge

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vllm-sparsity.json"
NB = SPARSITY_BUCKETS


def scrape(collector) -> dict:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_collector_exposition_names_labels_and_histograms():
    collector = metrics.SparsityCollector("demo")
    assert scrape(collector) == {}  # nothing before the first poll
    rows = site_rows(30, 200, 60, 100)
    rows[PREFILL][HIST:HIST + 3] = [1, 0, 1]  # 2 tokens of K = 100
    collector.snapshot = merge([worker(0, [[4, "input", 10, 0]], [rows])])
    collector.polled_at = 1.7e9
    families = scrape(collector)
    assert families["vllm_sparsity_last_poll_timestamp_seconds"].samples[0].value == 1.7e9
    assert {f"{n}" for n in families} | {"vllm_sparsity_config_info"} >= {
        n.removesuffix("_total") for n in metrics.METRIC_NAMES if "latency" not in n}
    assert "vllm_sparsity_mlp_latency_seconds" not in families  # no latency: not published
    hist = {(s.name, s.labels.get("le")): s.value
            for s in families["vllm_sparsity_token_sparsity_ratio"].samples
            if s.labels["phase"] == "prefill"}
    assert hist[("vllm_sparsity_token_sparsity_ratio_bucket", "0.05")] == 1
    assert hist[("vllm_sparsity_token_sparsity_ratio_bucket", "0.1")] == 1
    assert hist[("vllm_sparsity_token_sparsity_ratio_bucket", "0.15")] == 2
    assert hist[("vllm_sparsity_token_sparsity_ratio_bucket", "+Inf")] == 2
    assert hist[("vllm_sparsity_token_sparsity_ratio_count", None)] == 2
    assert hist[("vllm_sparsity_token_sparsity_ratio_sum", None)] == pytest.approx(0.3)  # 30/100
    skipped = {s.labels["phase"]: s.value
               for s in families["vllm_sparsity_weight_skipped_bytes"].samples}
    assert skipped == {"prefill": 400, "decode": 800}
    labels = {k for f in families.values() for s in f.samples for k in s.labels}
    assert labels <= {"model_name", "layer", "site", "phase", "le", "target", "backend",
                      "resolved_backend", "rule"}
    info = next(s.labels for f in families.values() for s in f.samples
                if s.name == "vllm_sparsity_config_info")
    assert (info["rule"], info["target"]) == ("top-p", "input")


class FakeEngine:
    """An engine client whose workers answer the metrics poll with a growing counter; ``fail``
    makes the RPC raise, ``hang`` not answer until it is cleared, ``errored`` is vLLM's
    dead-engine flag."""

    def __init__(self):
        self.polls = 0
        self.fail = self.hang = self.errored = False

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "vllm_sparsity_snapshot"
        assert timeout is None  # no deadline inside the engine (engine_rpc)
        self.polls += 1
        n = self.polls  # this call's own number: its reply says which call it is
        while self.hang:
            await asyncio.sleep(0.005)
        if self.fail or self.errored:
            raise RuntimeError("worker gone")
        rows = site_rows(30 * n, 100 * n, 0, 0)
        return [worker(0, [[0, "input", 10, 0]], [rows])]


def registry_samples(name) -> dict:
    from prometheus_client import REGISTRY

    text = generate_latest(REGISTRY).decode()
    return {(s.labels.get("phase"), s.labels.get("model_name")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}


def test_publisher_polls_serves_and_leaves_no_series_behind(monkeypatch):
    monkeypatch.setattr(metrics, "interval_s", lambda: 0.01)  # below the bound, for speed

    def additional(sparsity=True, on=True):
        return {"sparsity": {"p": 0.9}, "sparsity_metrics": on} if sparsity else {}

    async def run():
        engine = FakeEngine()
        assert metrics.start_publisher(engine, additional(sparsity=False), "m") is None
        assert metrics.start_publisher(engine, additional(on=False), "m") is None
        metrics.start_publisher(engine, additional(), "m")
        while engine.polls < 3:
            await asyncio.sleep(0.01)
        served = registry_samples("vllm_sparsity_activations_total")
        assert served[("prefill", "m")] >= 300 and served[("prefill", "m")] % 100 == 0
        metrics.start_publisher(engine, additional(), "m")  # a second client replaces the first
        await asyncio.sleep(0.05)
        from prometheus_client import REGISTRY

        exposed = generate_latest(REGISTRY).decode()
        assert exposed.count("vllm_sparsity_activations_total{") == 2  # prefill, decode: once
        metrics.stop_publisher()
        assert registry_samples("vllm_sparsity_activations_total") == {}

    asyncio.run(run())


def with_settings(snapshot, **settings):
    snapshot["settings"] = {**snapshot["settings"], **settings}
    return snapshot


def test_merge_route_and_metrics_report_workers_that_disagree():
    """Two TP ranks at p = 0.9 and one replica left at 0.7 by a failed set: the merge lists both
    groups with their workers (largest first), the route passes the list through, and the gauge
    counts the worker outside the largest group."""
    sites = [[0, "input", 10, 0]]
    per_worker = [worker(0, sites, [site_rows(1, 10, 0, 0)]),
                  worker(1, sites, [site_rows(1, 10, 0, 0)]),
                  None,  # a worker without the rule (nothing to agree on)
                  with_settings(worker(0, sites, [site_rows(1, 10, 0, 0)]), p=0.7)]
    agreed = {"target": "input", "backend": "auto", "rule": "top-p", "q": None}
    want = [{"p": 0.9, **agreed, "workers": [0, 1]}, {"p": 0.7, **agreed, "workers": [3]}]
    assert merge(per_worker)["settings"]["disagreement"] == want

    class Engine:
        async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            return per_worker

    assert asyncio.run(control._state(Engine()))["disagreement"] == want
    collector = metrics.SparsityCollector("m")
    collector.snapshot = merge(per_worker)
    assert scrape(collector)["vllm_sparsity_disagreeing_workers"].samples[0].value == 1
    per_worker[3] = with_settings(per_worker[3], p=0.9, target="intermediate", backend="torch")
    assert [g["workers"] for g in merge(per_worker)["settings"]["disagreement"]] == [[0, 1], [3]]
    per_worker[3] = worker(0, sites, [site_rows(1, 10, 0, 0)])
    collector.snapshot = merge(per_worker)
    assert collector.snapshot["settings"]["disagreement"] == []
    assert scrape(collector)["vllm_sparsity_disagreeing_workers"].samples[0].value == 0


def test_unknown_phase_tokens_are_summed_over_replicas_not_tp_ranks_and_exposed():
    """Tokens a worker could not tell the phase of: every TP rank of an engine sees the same
    tokens, so the merge takes TP rank 0 of each replica; the route and the counter carry it."""
    sites = [[0, "input", 10, 0]]
    per_worker = [{**worker(0, sites, [site_rows(1, 10, 0, 0)]), "unknown_phase_tokens": 7},
                  {**worker(1, sites, [site_rows(1, 10, 0, 0)]), "unknown_phase_tokens": 7},
                  {**worker(0, sites, [site_rows(1, 10, 0, 0)]), "unknown_phase_tokens": 5}]
    assert merge(per_worker)["unknown_phase_tokens"] == 12

    class Engine:
        async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            return per_worker

    assert asyncio.run(control._state(Engine()))["unknown_phase_tokens"] == 12
    collector = metrics.SparsityCollector("m")
    collector.snapshot = merge(per_worker)
    (sample,) = scrape(collector)["vllm_sparsity_unknown_phase_tokens"].samples
    assert (sample.name, sample.labels, sample.value) == (
        "vllm_sparsity_unknown_phase_tokens_total", {"model_name": "m"}, 12)


class DataParallelEngine(FakeEngine):
    """vLLM's client under data parallelism (``DPLBAsyncMPClient``): ``collective_rpc`` answers
    with engine 0's workers only; ``engine_core.call_utility_all_async`` asks every engine."""

    def __init__(self, replicas):
        super().__init__()
        self.replicas = replicas  # per engine: (zeroed, total) of its one TP rank 0 worker
        engine = self

        class Core:
            async def call_utility_all_async(self, utility, method, timeout, args, kwargs):
                assert (utility, method) == ("collective_rpc", "vllm_sparsity_snapshot")
                assert timeout is None  # no deadline inside the engine (engine_rpc)
                engine.polls += 1
                return [[worker(0, [[0, "input", 10, 0]], [site_rows(z, t, 0, 0)])]
                        for z, t in engine.replicas]

        self.engine_core = Core()

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return (await self.engine_core.call_utility_all_async(
            "collective_rpc", method, timeout, args, kwargs))[0]


def poll_until(engine, collector, done, interval=0.01):
    """Run the poller on ``engine`` until ``done()`` (or 5 s), then stop it."""
    async def run():
        task = asyncio.create_task(metrics._poll(engine, collector, interval))
        for _ in range(500):
            if done():
                break
            await asyncio.sleep(0.01)
        task.cancel()
        assert done()

    asyncio.run(run())


def test_poller_sums_the_counters_of_every_data_parallel_replica():
    engine = DataParallelEngine([(30, 100), (50, 200), (7, 40)])
    collector = metrics.SparsityCollector("m")
    poll_until(engine, collector, lambda: collector.snapshot is not None)
    served = {(s.name, s.labels["phase"]): s.value for s in
              scrape(collector)["vllm_sparsity_activations"].samples}
    # site_rows: decode rows are twice the prefill ones.
    assert served[("vllm_sparsity_activations_total", "prefill")] == 100 + 200 + 40
    assert served[("vllm_sparsity_activations_total", "decode")] == 2 * (100 + 200 + 40)
    zeroed = scrape(collector)["vllm_sparsity_activations_zeroed"].samples
    assert {s.labels["phase"]: s.value for s in zeroed} == {"prefill": 87, "decode": 174}


def stamp(collector):
    families = scrape(collector)
    (sample,) = families["vllm_sparsity_last_poll_timestamp_seconds"].samples
    return sample.value, families


def test_failed_polls_age_the_snapshot_and_a_dead_engine_drops_the_series(monkeypatch):
    monkeypatch.setattr(metrics, "POLL_WAIT_S", 0.05)
    engine = FakeEngine()
    collector = metrics.SparsityCollector("m", engine)
    before = time.time()
    poll_until(engine, collector, lambda: engine.polls >= 2)
    fresh, families = stamp(collector)
    assert before <= fresh <= time.time()
    assert "vllm_sparsity_activations" in families

    # Failing RPCs: the poller goes on, the timestamp stays (late ones: the next test).
    engine.fail = True
    polls = engine.polls
    poll_until(engine, collector, lambda: engine.polls >= polls + 2)
    engine.fail = False
    assert stamp(collector)[0] == fresh
    assert "vllm_sparsity_activations" in stamp(collector)[1]  # counters: true lower bounds

    # The engine dies: every series but the frozen timestamp goes, at once and for good.
    engine.errored = True
    value, families = stamp(collector)
    assert (value, set(families)) == (fresh, {"vllm_sparsity_last_poll_timestamp_seconds"})
    collector.engine_client = None  # the poller's own finding suffices too
    poll_until(engine, collector, lambda: collector.dead)
    assert set(scrape(collector)) == {"vllm_sparsity_last_poll_timestamp_seconds"}


class RecordingCollector(metrics.SparsityCollector):
    """A collector that keeps every snapshot the poller gives it, in order."""

    def __init__(self, *args):
        self.history = []
        super().__init__(*args)

    @property
    def snapshot(self):
        return self.history[-1] if self.history else None

    @snapshot.setter
    def snapshot(self, value):
        if value is not None:
            self.history.append(value)


def test_a_late_poll_is_waited_for_not_stacked_and_logged_with_its_reason(monkeypatch):
    """Workers slower than the poll's wait: the poll fails with a log line that says why, the
    next rounds wait for that same call (one call in flight, however many rounds pass), and its
    late reply is the next snapshot."""
    monkeypatch.setattr(metrics, "POLL_WAIT_S", 0.05)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("vllm.vllm_sparsity").addHandler(handler)
    engine = FakeEngine()
    collector = RecordingCollector("m", engine)

    async def run():
        task = asyncio.create_task(metrics._poll(engine, collector, 0.05))
        while not collector.history:
            await asyncio.sleep(0.01)
        engine.hang = True
        seen, polls = len(collector.history), engine.polls
        await asyncio.sleep(1.0)  # about ten rounds of a 0.05 s wait and a 0.05 s interval
        calls_while_late = engine.polls - polls
        engine.hang = False
        while len(collector.history) == seen:
            await asyncio.sleep(0.01)
        task.cancel()
        return seen, polls, calls_while_late

    try:
        seen, polls, calls_while_late = asyncio.run(run())
    finally:
        logging.getLogger("vllm.vllm_sparsity").removeHandler(handler)
    assert calls_while_late <= 1  # nothing stacked behind the late call
    # The next snapshot is the late call's own reply (FakeEngine's rows grow with its call count).
    assert collector.history[seen]["sites"][(0, "input")]["rows"][0][1] == 100 * (polls + 1)
    late = [line for line in lines if "poll failed" in line]
    assert late and ("poll failed (WorkersLate: the workers did not answer "
                     "vllm_sparsity_snapshot within 0.05 s") in late[0]
    assert "1 in a row" in late[0]


@pytest.mark.parametrize("raw", ["1e-9", "0.01", "0.49", "3601", "inf", "-5"])
def test_poll_interval_below_or_above_its_bounds_is_refused_with_the_range(raw):
    with pytest.raises(config.SparsityConfigError) as e:
        config.interval_s({config.INTERVAL_ENV: raw})
    assert str(e.value) == (f"{config.INTERVAL_ENV} must be 0 (metrics off) or a number of "
                            f"seconds in [0.5, 3600], got {raw!r}")


@pytest.mark.parametrize("raw, value", [("0", 0.0), ("0.5", 0.5), ("3600", 3600.0)])
def test_poll_interval_bounds_are_inclusive(raw, value):
    assert config.interval_s({config.INTERVAL_ENV: raw}) == value


# ------------------------------------------------------------------ end to end with Prometheus

SCRAPE_S = 1
# Oldest a healthy server's snapshot may be: a poll interval, one poll at its deadline, scrapes.
FRESH_S = config.DEFAULT_INTERVAL_S + metrics.POLL_WAIT_S + 3 * SCRAPE_S


@pytest.fixture(scope="module")
def prometheus(sparse_server, tmp_path_factory):
    """A real Prometheus on loopback scraping the sparse server every second with deploy/'s
    scrape job and rules; stopped at the end whatever happened."""
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s")
    config["rule_files"] = [str(DEPLOY / f) for f in config["rule_files"]]
    config["scrape_configs"][0]["static_configs"] = [
        {"targets": [f"127.0.0.1:{sparse_server.port}"]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={work / 'prometheus.yml'}",
         f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(f"{url}/-/ready", timeout=2).status_code == 200, 60,
                   "Prometheus ready", proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_until(check, timeout, what, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except (requests.RequestException, KeyError, IndexError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not reached in {timeout} s")


def query(prom, expr) -> list[dict]:
    r = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=30)
    assert r.status_code == 200, (expr, r.text)
    return r.json()["data"]["result"]


def value(prom, expr) -> float:
    result = query(prom, expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def by_labels(prom, expr, *labels) -> dict:
    return {tuple(s["metric"][k] for k in labels): float(s["value"][1]) for s in query(prom, expr)}


def route_counters(server) -> dict:
    state = requests.get(f"{server.url}/v1/sparsity", headers=server.headers).json()
    return {(str(r["layer"]), r["site"]): (r["zeroed"], r["total"]) for r in state["layers"]}


def settle(prom, server) -> dict:
    """Wait until Prometheus holds the workers' current counters (the publisher polls every 5 s,
    Prometheus scrapes every second); return the route's counters."""
    route = route_counters(server)
    want = sum(t for _, t in route.values())
    wait_until(lambda: value(prom, f'sum(vllm_sparsity_activations_total{{{sel(server)}}})')
               == want, 60, "Prometheus catches up with the workers")
    # vLLM counts a request's tokens in the API server after its last step: a scrape or two
    # later they are in Prometheus too.
    time.sleep(2 * SCRAPE_S)
    return route


def sel(server) -> str:
    return f'model_name="{server.model}"'


COUNTERS = {  # name -> PromQL of one number, at an instant
    "prompt": 'sum(vllm:prompt_tokens_total{{{s}}})',
    "generation": 'sum(vllm:generation_tokens_total{{{s}}})',
    "cached": 'sum(vllm:prompt_tokens_cached_total{{{s}}})',
    "prefill_tokens": 'sum(vllm_sparsity_token_sparsity_ratio_count{{{s}, phase="prefill"}})',
    "decode_tokens": 'sum(vllm_sparsity_token_sparsity_ratio_count{{{s}, phase="decode"}})',
    "prefill_mlps": 'sum(vllm_sparsity_mlp_latency_seconds_count{{{s}, phase="prefill"}})',
    "decode_mlps": 'sum(vllm_sparsity_mlp_latency_seconds_count{{{s}, phase="decode"}})',
}


def counters(prom, server) -> dict:
    return {k: value(prom, q.format(s=sel(server))) for k, q in COUNTERS.items()}


def unique_prompt(words: int) -> str:
    # A fresh first word: no prefix-cache hit, so every prompt token is computed.
    return f"{uuid.uuid4().hex} " + " ".join(["the quick brown fox jumps"] * (words // 5 + 1))


def test_prometheus_scrapes_plugin_and_vllm_metrics_with_true_values(sparse_server, prometheus):
    server, prom = sparse_server, prometheus
    n_sites = len(route_counters(server))  # 18 layers x 2 sites
    wait_until(lambda: query(prom, f"vllm_sparsity_p_ratio{{{sel(server)}}}"), 60,
               "first scrape with the plugin's series")
    started = time.time()
    route0 = settle(prom, server)
    c0 = counters(prom, server)

    # 1. One request at a time: every step is one request's prefill or one decode token.
    usage = [server.completion(unique_prompt(n), max_tokens=g, ignore_eos=True)["usage"]
             for n, g in ((12, 5), (30, 8), (7, 3))]
    settle(prom, server)
    c1 = counters(prom, server)
    P = sum(u["prompt_tokens"] for u in usage)
    G = sum(u["completion_tokens"] for u in usage)
    assert c1["cached"] == c0["cached"]
    assert c1["prompt"] - c0["prompt"] == P  # vLLM's counters vs the requests' usage
    assert c1["generation"] - c0["generation"] == G
    assert c1["prefill_tokens"] - c0["prefill_tokens"] == n_sites * P  # every site saw each token
    assert c1["decode_tokens"] - c0["decode_tokens"] == n_sites * (G - len(usage))
    # One timed MLP (the first layer's) per step; each request's prefill is one step.
    assert c1["prefill_mlps"] - c0["prefill_mlps"] == len(usage)
    assert c1["decode_mlps"] - c0["decode_mlps"] == G - len(usage)

    # 2. Concurrent requests: batched decode; per-token phases stay exact.
    results = []

    def send(words):
        results.append(server.completion(unique_prompt(words), max_tokens=16,
                                          ignore_eos=True)["usage"])

    threads = [threading.Thread(target=send, args=(w,)) for w in (9, 14, 21, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    route2 = settle(prom, server)
    c2 = counters(prom, server)
    P2 = sum(u["prompt_tokens"] for u in results)
    G2 = sum(u["completion_tokens"] for u in results)
    assert (c2["prompt"] - c1["prompt"], c2["generation"] - c1["generation"]) == (P2, G2)
    assert c2["prefill_tokens"] - c1["prefill_tokens"] == n_sites * P2
    assert c2["decode_tokens"] - c1["decode_tokens"] == n_sites * (G2 - len(results))

    # The series equal what the plugin computed (the route), per layer and site.
    s = sel(server)
    zeroed = by_labels(
        prom, f"sum by (layer, site) (vllm_sparsity_activations_zeroed_total{{{s}}})",
        "layer", "site")
    total = by_labels(prom, f"sum by (layer, site) (vllm_sparsity_activations_total{{{s}}})",
                      "layer", "site")
    assert {k: (zeroed[k], total[k]) for k in total} == route2
    assert any(route2[k][0] - route0[k][0] > 0 for k in route2)  # the rule zeroed something
    # Torch backend: a dense GEMM, nothing skipped, and the series say so. The cpu backend
    # (auto on an x86-64 CPU with the kernels) skips columns in decode, and the series say that.
    backend = requests.get(f"{server.url}/v1/sparsity", headers=server.headers,
                           timeout=30).json()["resolved_backend"]
    skipped = value(prom, f"sum(vllm_sparsity_weight_skipped_bytes_total{{{s}}})")
    read = value(prom, f"sum(vllm_sparsity_weight_columns_read_total{{{s}}})")
    columns = value(prom, f"sum(vllm_sparsity_weight_columns_total{{{s}}})")
    if backend == "torch":
        assert skipped == 0 and read == columns > 0
    else:
        assert skipped > 0 and 0 < read < columns
    # Bounded cardinality: the same series whatever the traffic.
    series = len(query(prom, f'{{__name__=~"vllm_sparsity_.*", {s}}}'))
    per_site = 2 * (5 + NB + 3)  # phases x (5 counters + buckets, +Inf, _sum, _count)
    latency = 2 * (len(LATENCY_BUCKETS_S) + 3)
    # p x 2, info, stamp, disagreeing, unknown phase
    assert series == 2 + 1 + 3 + n_sites * per_site + latency
    # Fresh, and every worker agrees.
    age = value(prom, f"time() - vllm_sparsity_last_poll_timestamp_seconds{{{s}}}")
    assert 0 <= age < FRESH_S
    assert value(prom, f"vllm_sparsity_disagreeing_workers{{{s}}}") == 0

    # 3. Every query of the dashboard and the rules returns data.
    time.sleep(3 * SCRAPE_S)  # a few rule evaluations after the last traffic
    window = f"{int(time.time() - started) + 10}s"
    instance = f"127.0.0.1:{server.port}"
    exprs = dashboard_queries(server.model, instance, window) + rule_queries()
    for what, expr in exprs:
        result = query(prom, expr)
        if what.startswith("silent alert"):  # a set operation: no series while all is well
            assert result == [], (what, result)
            continue
        assert result, f"{what}: no data for {expr}"
        if what.startswith("dashboard"):
            assert any(math.isfinite(float(r["value"][1])) for r in result), (what, result)
            assert {r["metric"].get("instance", instance) for r in result} == {instance}, what
        if what in HEALTHY_QUIET:
            assert all(float(r["value"][1]) == 0 for r in result), (what, result)


# Alerts that a healthy, freshly polled server must not trip.
HEALTHY_QUIET = {"alert VllmSparsityMetricsStale", "alert VllmSparsityWorkersDisagree",
                 "alert VllmSparsityUnknownPhaseTokens"}


def dashboard_queries(model, instance, window) -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(f"dashboard: {p['title']}",
             t["expr"].replace("$model_name", model).replace("$instance", instance)
             .replace("$__rate_interval", window))
            for p in board["panels"] for t in p["targets"]]


def rule_queries() -> list[tuple[str, str]]:
    """Recording rules: their expression and the recorded series. Alerts: their expression with
    its top-level comparison turned into `bool`, which returns 0/1 instead of filtering; an alert
    without one (a set operation such as `unless`) as it is, named "silent alert"."""
    out = []
    for group in yaml.safe_load((DEPLOY / "rules.yml").read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                out += [(f"record {rule['record']}", rule["expr"]),
                        (f"recorded {rule['record']}", rule["record"])]
            elif (expr := with_bool(rule["expr"])) is None:
                out.append((f"silent alert {rule['alert']}", rule["expr"]))
            else:
                out.append((f"alert {rule['alert']}", expr))
    return out


def with_bool(expr: str) -> str | None:
    depth = 0
    for i, ch in enumerate(expr):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and ch in "<>" and expr[i + 1] not in "=":
            return expr[:i + 1] + " bool" + expr[i + 1:]
    return None


def test_bad_interval_stops_the_server_with_one_clear_line(demo_model):
    vllm = Path(sys.executable).with_name("vllm")
    proc = subprocess.run([str(vllm), "serve", str(demo_model), "--sparsity-p", "0.5"],
                          capture_output=True, text=True, timeout=300,  # vLLM's imports
                          env={**os.environ, config.INTERVAL_ENV: "1e-9"})  # back-to-back RPCs
    assert proc.returncode == 2
    assert (f"vllm serve: error: {config.INTERVAL_ENV} must be 0 (metrics off) or a number of "
            "seconds in [0.5, 3600], got '1e-9'") in proc.stderr.splitlines()


def test_metrics_endpoint_needs_no_api_key_and_carries_both_prefixes(sparse_server):
    r = requests.get(f"{sparse_server.url}/metrics", timeout=30)  # no Authorization header
    assert r.status_code == 200
    assert re.search(r"^vllm:generation_tokens_total\{", r.text, re.M)
    wait_until(lambda: "vllm_sparsity_p_ratio{" in requests.get(
        f"{sparse_server.url}/metrics", timeout=30).text, 30, "first poll of the workers")


def test_plugin_off_publishes_no_sparsity_series(dense_server):
    text = requests.get(f"{dense_server.url}/metrics", timeout=30).text
    assert "vllm:generation_tokens_total" in text and "vllm_sparsity_" not in text


# ------------------------------------------------------------------ last: a worker dies

def plugin_families(server) -> dict:
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)
            if f.name.startswith("vllm_sparsity_")}


def poll_stamp(families) -> float:
    (sample,) = families["vllm_sparsity_last_poll_timestamp_seconds"].samples
    return sample.value


@pytest.mark.kills_server
def test_killed_worker_fails_requests_and_stops_claiming_fresh_metrics(sparse_server):
    """SIGKILL the sparse server's model worker while a request decodes (the session's last test:
    the server is dead after it; it keeps its API server, VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1)."""
    import psutil

    server = sparse_server
    wait_until(lambda: "vllm_sparsity_activations" in plugin_families(server), 30,
               "a poll of the workers")  # the parser names a counter family without _total
    assert time.time() - poll_stamp(plugin_families(server)) < FRESH_S

    outcome = {}

    def long_request():
        try:
            r = requests.post(f"{server.url}/v1/completions", headers=server.headers, timeout=300,
                              json={"model": server.model, "prompt": unique_prompt(10),
                                    "max_tokens": 1500, "ignore_eos": True})
            outcome["status"] = r.status_code
        except requests.RequestException as e:
            outcome["error"] = e

    thread = threading.Thread(target=long_request)
    thread.start()
    running = 'vllm:num_requests_running{'
    wait_until(lambda: any(line.startswith(running) and float(line.split()[-1]) >= 1
                           for line in requests.get(f"{server.url}/metrics", timeout=30)
                           .text.splitlines()), 60, "the request is running")
    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
               if " ".join(p.cmdline()).startswith("VLLM::Worker")]
    assert workers, [p.cmdline() for p in psutil.Process(server.proc.pid).children(True)]
    killed_at = time.time()
    workers[0].kill()

    # The API server reports the failure: the running request fails, /health says 503, the
    # route does not answer as if all were well.
    thread.join(timeout=60)
    assert not thread.is_alive(), "the running request neither failed nor finished"
    assert outcome.get("status", 0) >= 500 or (
        isinstance(outcome.get("error"), requests.ConnectionError)), outcome
    wait_until(lambda: requests.get(f"{server.url}/health", timeout=10).status_code == 503, 60,
               "/health reports the dead engine")
    assert requests.get(f"{server.url}/v1/sparsity", headers=server.headers,
                        timeout=30).status_code != 200

    # The metrics stop claiming fresh data: only the timestamp of the last good poll is left,
    # from before the kill, and it stays frozen past another poll interval.
    families = plugin_families(server)
    assert set(families) == {"vllm_sparsity_last_poll_timestamp_seconds"}, set(families)
    frozen = poll_stamp(families)
    assert frozen <= killed_at
    time.sleep(config.DEFAULT_INTERVAL_S + 1)
    assert poll_stamp(plugin_families(server)) == frozen
