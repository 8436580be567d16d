"""Metrics: the seam's device counters against independent references, the phase split, the
rank merge, the exposition; then end to end, a real Prometheus scraping the session's sparse
server: every dashboard and rule query returns data, and the values match ground truth (the
requests' token usage, vLLM's own counters, the /v1/sparsity route)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "kernels"))
from kernel_inputs import activations  # noqa: E402  first: Triton's interpreter on

import asyncio  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from fractions import Fraction  # noqa: E402

import pytest  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from vllm.model_executor.layers.linear import LinearMethodBase  # noqa: E402

from conftest import free_port  # noqa: E402
from reference import paper_top_p_mask  # noqa: E402
from vllm_sparsity import metrics, sparse_linear  # noqa: E402
from vllm_sparsity.metrics import DECODE, PAD, PREFILL  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vllm-sparsity.json"
NB = metrics.SPARSITY_BUCKETS


class PlainLinear(LinearMethodBase):
    """Stand-in for vLLM's unquantized method: F.linear, nothing to do after loading."""

    def create_weights(self, *args, **kwargs):
        raise NotImplementedError

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)


def sparse_layer(K, N, phases, batch_phase, backend="torch", p=0.7):
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Module()
    w = torch.randn(N, K, generator=g).mul(K**-0.5).to(torch.bfloat16)
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    layer.quant_method = PlainLinear()
    phase = torch.tensor(phases + [PAD] * 64, dtype=torch.int64)
    sparse_linear.install(layer, "input", 3, torch.tensor([p], dtype=torch.float64), backend,
                          phase, torch.tensor([batch_phase]), stats=True)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def varied_rows(M, K, seed):
    """Rows whose sparsity under the rule spreads over many buckets: heavier tails per row, and
    exact zeros in some."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for m in range(M):
        row = torch.randn(K, generator=g) * torch.rand(K, generator=g).pow(1 + 3 * m / M)
        row[torch.rand(K, generator=g) < 0.1 * (m % 3)] = 0
        rows.append(row)
    return torch.stack(rows).to(torch.bfloat16)


def expected_stats(x, p, phases, batch_phase, columns_read):
    """The seam's [3, WIDTH] counters from the paper's sort rule and exact fractions."""
    K = x.shape[1]
    kept = paper_top_p_mask(x.float(), p).sum(-1).tolist()
    out = torch.zeros(3, metrics.WIDTH, dtype=torch.int64)
    for k, phase in zip(kept, phases):
        z = K - k
        out[phase, metrics.ZEROED] += z
        out[phase, metrics.TOTAL] += K
        # Bucket i holds sparsity in (i/NB, (i+1)/NB], 0 in bucket 0.
        out[phase, metrics.HIST + max(0, math.ceil(Fraction(z, K) * NB) - 1)] += 1
    out[batch_phase, metrics.COLS_READ] += columns_read
    out[batch_phase, metrics.COLS_TOTAL] += K
    return out


def test_seam_counts_per_token_phase_and_histogram():
    K, N, p = 200, 24, 0.7  # K = 200: bucket edges fall on whole counts of zeroed inputs
    phases = [PREFILL] * 9 + [DECODE] * 4 + [PAD] * 3
    x = varied_rows(len(phases), K, seed=5)
    layer = sparse_layer(K, N, phases, DECODE, p=p)
    layer.quant_method.apply(layer, x)
    want = expected_stats(x, p, phases, DECODE, K)  # torch backend: dense GEMM reads all K
    assert len(set(want[PREFILL, metrics.HIST:metrics.COLS_READ].nonzero().flatten().tolist())) > 3
    assert torch.equal(layer.sparsity_stats, want)
    # The route's counters: prefill + decode, padding left out.
    assert layer.sparsity_counts.tolist() == want[:PAD, :2].sum(0).tolist()


def test_seam_counts_survive_torch_compile_with_a_dynamic_batch():
    K, N, p = 200, 24, 0.6
    phases = [PREFILL, DECODE, DECODE, PREFILL, PAD, DECODE, PREFILL]
    layer = sparse_layer(K, N, phases, PREFILL, p=p)
    compiled = torch.compile(lambda x: layer.quant_method.apply(layer, x), backend="aot_eager",
                             fullgraph=True, dynamic=True)
    xs = [varied_rows(m, K, seed=m) for m in (3, 7)]
    for x in xs:
        compiled(x)
    want = sum(expected_stats(x, p, phases[:len(x)], PREFILL, K) for x in xs)
    assert torch.equal(layer.sparsity_stats, want)


@pytest.mark.parametrize("m", [1, 3, 8, 9])
def test_triton_backend_reports_the_weight_columns_it_read(m):
    from vllm_sparsity.kernels import backend

    K, N, p = 200, 72, 0.6
    x = activations(m, K, torch.bfloat16, seed=m)
    layer = sparse_layer(K, N, [DECODE] * m, DECODE, backend="triton", p=p)
    layer.quant_method.apply(layer, x)
    union = int(paper_top_p_mask(x.float(), p).any(dim=0).sum())
    read = union if m <= backend.M_MAX else K  # sparse GEMV: union of kept inputs; else dense
    assert read < K or m > backend.M_MAX
    assert torch.equal(layer.sparsity_stats, expected_stats(x, p, [DECODE] * m, DECODE, read))


@pytest.mark.parametrize("qsl, n, phases, batch", [
    ([0, 5, 6, 7], 9, [PREFILL] * 5 + [DECODE] * 2 + [PAD] * 2, PREFILL),  # mixed, padded
    ([0, 1, 2, 3, 3, 3], 4, [DECODE] * 3 + [PAD], DECODE),  # decode batch, padded requests
    ([0, 4], 4, [PREFILL] * 4, PREFILL),
    ([0, 1, 5], 5, [DECODE] + [PREFILL] * 4, PREFILL),
    (None, 3, [PAD] * 3, PAD),  # dummy run: no attention metadata
    ([0, 0], 0, [], PAD),  # an empty step
])
def test_token_phases_from_query_start_loc(qsl, n, phases, batch):
    got, got_batch = metrics.token_phases(
        None if qsl is None else torch.tensor(qsl, dtype=torch.int32), n)
    assert got.tolist() == phases and int(got_batch) == batch


def site_rows(zeroed, total, read, columns):
    row = [0] * metrics.WIDTH
    row[metrics.ZEROED], row[metrics.TOTAL] = zeroed, total
    row[metrics.HIST] = total // 100
    row[metrics.COLS_READ], row[metrics.COLS_TOTAL] = read, columns
    return [row, [x * 2 for x in row], [7] * metrics.WIDTH]  # prefill, decode, padding


def worker(tp_rank, sites, stats, latency=None):
    return {"p_by_site": {"input": 0.9}, "target": "input", "backend": "auto",
            "resolved_backend": "triton", "tp_rank": tp_rank, "sites": sites, "stats": stats,
            "latency": latency}


def test_merge_takes_counts_from_tp_rank_0_and_sums_bytes_over_shards():
    lat = {"counts": [[1] + [0] * len(metrics.LATENCY_BUCKETS_S), [0, 2] + [0] * 14][:2],
           "sums": [0.5, 0.25]}
    per_worker = [
        worker(0, [[0, "input", 100, 0]], [site_rows(30, 100, 60, 100)], lat),  # stage 0, TP 0
        worker(1, [[0, "input", 100, 0]], [site_rows(30, 100, 60, 100)], lat),  # stage 0, TP 1
        worker(0, [[1, "input", 100, 0]], [site_rows(50, 100, 80, 100)], lat),  # stage 1, TP 0
        None,
    ]
    merged = metrics.merge(per_worker)
    layer0 = merged["sites"][(0, "input")]
    assert layer0["rows"][PREFILL][metrics.ZEROED] == 30  # not doubled by the TP replica
    assert layer0["rows"][DECODE][metrics.COLS_READ] == 120
    assert layer0["skipped_bytes"] == [2 * 40 * 100, 2 * 80 * 100]  # both shards' bytes
    assert merged["sites"][(1, "input")]["rows"][PREFILL][metrics.ZEROED] == 50
    assert merged["latency"]["counts"][PREFILL][0] == 2  # two pipeline stages, TP rank 0 only
    assert merged["latency"]["sums"] == [1.0, 0.5]
    assert metrics.merge([None, None]) is None


def test_merge_sums_the_counters_of_an_input_split_over_tp_ranks():
    # down_proj under TP: each rank counts its shard of K for the same tokens.
    per_worker = [worker(0, [[0, "intermediate", 10, 1]], [site_rows(30, 100, 60, 100)]),
                  worker(1, [[0, "intermediate", 10, 1]], [site_rows(40, 120, 70, 120)])]
    rows = metrics.merge(per_worker)["sites"][(0, "intermediate")]["rows"]
    for phase, scale in ((PREFILL, 1), (DECODE, 2)):
        assert rows[phase][metrics.ZEROED] == scale * (30 + 40)
        assert rows[phase][metrics.TOTAL] == scale * (100 + 120)
        assert rows[phase][metrics.COLS_READ] == scale * (60 + 70)
        assert rows[phase][metrics.COLS_TOTAL] == scale * (100 + 120)
        assert rows[phase][metrics.HIST] == scale * (100 // 100)  # rank 0's histogram only


def test_sparsity_route_sums_a_split_input_over_tp_ranks():
    from vllm_sparsity.control import _merge

    def rows(zeroed, total, split):
        return {"target": "all_inputs", "layers": [
            {"layer": 0, "site": "input", "zeroed": zeroed, "total": total, "split": False},
            {"layer": 0, "site": "intermediate", "zeroed": zeroed, "total": total, "split": split}]}

    merged = _merge([rows(30, 100, True), rows(40, 120, True), None])["layers"]
    assert [(r["zeroed"], r["total"]) for r in merged] == [(30, 100), (70, 220)]


def scrape(collector) -> dict:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_collector_exposition_names_labels_and_histograms():
    collector = metrics.SparsityCollector("demo")
    assert scrape(collector) == {}  # nothing before the first poll
    rows = site_rows(30, 200, 60, 100)
    rows[PREFILL][metrics.HIST:metrics.HIST + 3] = [1, 0, 1]  # 2 tokens of K = 100
    collector.snapshot = metrics.merge([worker(0, [[4, "input", 10, 0]], [rows])])
    families = scrape(collector)
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
                      "resolved_backend"}


def test_mlp_clock_times_each_forward_in_its_batch_phase():
    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.003)
            return x * 2

    mlp, clock = Slow(), metrics.CLOCK
    metrics.time_mlp(mlp)
    before = clock.snapshot()
    clock.phase = DECODE
    assert torch.equal(mlp(torch.ones(2)), torch.full((2,), 2.0))
    clock.phase = PAD  # dummy runs are not timed
    mlp(torch.ones(2))
    after = clock.snapshot()
    assert sum(after["counts"][DECODE]) - sum(before["counts"][DECODE]) == 1
    assert after["counts"][PREFILL] == before["counts"][PREFILL]
    assert after["sums"][DECODE] - before["sums"][DECODE] >= 0.003


class FakeEngine:
    """An engine client whose workers answer the metrics poll with a growing counter."""

    def __init__(self):
        self.polls = 0

    async def collective_rpc(self, method):
        assert method == "vllm_sparsity_metrics"
        self.polls += 1
        rows = site_rows(30 * self.polls, 100 * self.polls, 0, 0)
        return [worker(0, [[0, "input", 10, 0]], [rows])]


def registry_samples(name) -> dict:
    from prometheus_client import REGISTRY

    text = generate_latest(REGISTRY).decode()
    return {(s.labels.get("phase"), s.labels.get("model_name")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}


def test_publisher_polls_serves_and_leaves_no_series_behind(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv(metrics.INTERVAL_ENV, "0.01")

    def config(sparsity=True, on=True):
        return SimpleNamespace(model_config=SimpleNamespace(served_model_name="m"),
                               additional_config={"sparsity": {"p": 0.9}, "sparsity_metrics": on}
                               if sparsity else {})

    async def run():
        engine = FakeEngine()
        assert metrics.start_publisher(engine, config(sparsity=False)) is None
        assert metrics.start_publisher(engine, config(on=False)) is None
        metrics.start_publisher(engine, config())
        while engine.polls < 3:
            await asyncio.sleep(0.01)
        served = registry_samples("vllm_sparsity_activations_total")
        assert served[("prefill", "m")] >= 300 and served[("prefill", "m")] % 100 == 0
        metrics.start_publisher(engine, config())  # a second engine client replaces the first
        await asyncio.sleep(0.05)
        from prometheus_client import REGISTRY

        exposed = generate_latest(REGISTRY).decode()
        assert exposed.count("vllm_sparsity_activations_total{") == 2  # prefill, decode: once
        metrics.stop_publisher()
        assert registry_samples("vllm_sparsity_activations_total") == {}

    asyncio.run(run())


@pytest.mark.parametrize("raw, value", [("", 5.0), ("0", 0.0), ("2.5", 2.5)])
def test_interval_from_the_environment(raw, value):
    assert metrics.interval_s({metrics.INTERVAL_ENV: raw}) == value


@pytest.mark.parametrize("env, given, on", [
    ("", None, True), ("0", None, False), ("0", True, True), ("5", False, False)])
def test_metrics_switch_reaches_additional_config(monkeypatch, env, given, on):
    """Process 0 stores the switch where every worker reads it and vLLM hashes it (the graph
    differs); re-resolving keeps it."""
    from vllm_sparsity._vllm_compat import with_resolved_sparsity

    for name in ("VLLM_SPARSITY_P", "VLLM_SPARSITY_TARGET", "VLLM_SPARSITY_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(metrics.INTERVAL_ENV, env)
    extra = {} if given is None else {metrics.ADDITIONAL_CONFIG_KEY: given}
    resolved = with_resolved_sparsity({"sparsity": {"p": 0.5}, **extra})
    assert resolved[metrics.ADDITIONAL_CONFIG_KEY] is on and metrics.enabled(resolved) is on
    assert with_resolved_sparsity(resolved) == resolved
    assert metrics.ADDITIONAL_CONFIG_KEY not in with_resolved_sparsity(extra)  # sparsity off


@pytest.mark.parametrize("raw", ["-1", "soon", "nan"])
def test_bad_interval_names_the_variable(raw):
    with pytest.raises(ValueError, match=metrics.INTERVAL_ENV):
        metrics.interval_s({metrics.INTERVAL_ENV: raw})


# ------------------------------------------------------------------ end to end with Prometheus

SCRAPE_S = 1


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
    # Torch backend on CPU: a dense GEMM, nothing skipped, and the series say so.
    assert value(prom, f"sum(vllm_sparsity_weight_skipped_bytes_total{{{s}}})") == 0
    assert value(prom, f"sum(vllm_sparsity_weight_columns_read_total{{{s}}})") == \
        value(prom, f"sum(vllm_sparsity_weight_columns_total{{{s}}})") > 0
    # Bounded cardinality: the same series whatever the traffic.
    series = len(query(prom, f'{{__name__=~"vllm_sparsity_.*", {s}}}'))
    per_site = 2 * (5 + NB + 3)  # phases x (5 counters + buckets, +Inf, _sum, _count)
    latency = 2 * (len(metrics.LATENCY_BUCKETS_S) + 3)
    assert series == 2 + 1 + n_sites * per_site + latency

    # 3. Every query of the dashboard and the rules returns data.
    time.sleep(3 * SCRAPE_S)  # a few rule evaluations after the last traffic
    window = f"{int(time.time() - started) + 10}s"
    exprs = dashboard_queries(server.model, window) + rule_queries()
    for what, expr in exprs:
        result = query(prom, expr)
        assert result, f"{what}: no data for {expr}"
        if what.startswith("dashboard"):
            assert any(math.isfinite(float(r["value"][1])) for r in result), (what, result)


def dashboard_queries(model, window) -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(f"dashboard: {p['title']}",
             t["expr"].replace("$model_name", model).replace("$__rate_interval", window))
            for p in board["panels"] for t in p["targets"]]


def rule_queries() -> list[tuple[str, str]]:
    """Recording rules: their expression and the recorded series. Alerts: their expression with
    its top-level comparison turned into `bool`, which returns 0/1 instead of filtering."""
    out = []
    for group in yaml.safe_load((DEPLOY / "rules.yml").read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                out += [(f"record {rule['record']}", rule["expr"]),
                        (f"recorded {rule['record']}", rule["record"])]
            else:
                out.append((f"alert {rule['alert']}", with_bool(rule["expr"])))
    return out


def with_bool(expr: str) -> str:
    depth = 0
    for i, ch in enumerate(expr):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and ch in "<>" and expr[i + 1] not in "=":
            return expr[:i + 1] + " bool" + expr[i + 1:]
    raise ValueError(f"no top-level comparison in {expr!r}")


def test_bad_interval_stops_the_server_with_one_clear_line(demo_model):
    vllm = Path(sys.executable).with_name("vllm")
    proc = subprocess.run([str(vllm), "serve", str(demo_model), "--sparsity-p", "0.5"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, metrics.INTERVAL_ENV: "soon"})
    assert proc.returncode == 2
    assert (f"vllm serve: error: {metrics.INTERVAL_ENV} must be a number of seconds >= 0 (0 turns "
            "the metrics off), got 'soon'") in proc.stderr.splitlines()


def test_metrics_endpoint_needs_no_api_key_and_carries_both_prefixes(sparse_server):
    r = requests.get(f"{sparse_server.url}/metrics", timeout=30)  # no Authorization header
    assert r.status_code == 200
    assert re.search(r"^vllm:generation_tokens_total\{", r.text, re.M)
    wait_until(lambda: "vllm_sparsity_p_ratio{" in requests.get(
        f"{sparse_server.url}/metrics", timeout=30).text, 30, "first poll of the workers")


def test_plugin_off_publishes_no_sparsity_series(dense_server):
    text = requests.get(f"{dense_server.url}/metrics", timeout=30).text
    assert "vllm:generation_tokens_total" in text and "vllm_sparsity_" not in text
