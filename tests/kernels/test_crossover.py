"""The CPU backend's crossover (kernels/crossover.py): the decision from timings (a fake timer), its
cache and what invalidates it, the override, and the op's batch branch following the decision.
No speed is asserted: the one real measurement only has to return a valid M and be cached."""

import json
import logging

import pytest
import torch
from kernel_inputs import activations, ptensor

from vllm_sparsity.kernels import cpu_backend, crossover
from vllm_sparsity.rule import top_p_mask

_REASON = cpu_backend._load()  # builds the extension on first use (cached)
if _REASON is not None:
    pytest.skip(f"cpu backend unavailable here: {_REASON}", allow_module_level=True)

MAX_ROWS = int(torch.ops.vllm_sparsity.cpu_input_sparse_gemv_max_rows())
K, N = 301, 137  # odd, as in test_cpu_sparse_gemv.py


class FakeTimer:
    """Seconds per call from fixed tables: ``dense`` at every M, ``sparse(m)``; counts its calls."""

    def __init__(self, sparse, dense=1.0):
        self.sparse, self.dense, self.calls = sparse, dense, []

    def __call__(self, path, m):
        self.calls.append((path, m))
        return self.dense if path == "dense" else self.sparse(m)


def never_called(path, m):
    raise AssertionError(f"timed {path} at M = {m}: the decision should have come from the cache")


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder, no override, no decision of earlier tests in this process."""
    monkeypatch.setenv("VLLM_SPARSITY_CACHE", str(tmp_path))
    monkeypatch.delenv(crossover.ENV, raising=False)
    monkeypatch.setattr(crossover, "_DECIDED", {})
    return tmp_path


def wt(dtype=torch.bfloat16, k=K, n=N):
    return torch.randn(k, n, generator=torch.Generator().manual_seed(0)).to(dtype)


def decide(timer, **kw):
    return crossover.decide_for(wt(), None, timer=timer, **kw)


def test_dense_faster_from_m2_sends_m2_and_above_to_dense():
    timer = FakeTimer(lambda m: 0.5 if m == 1 else 1.2)
    d = decide(timer)
    assert (d.m_max, d.source) == (1, "measured")
    assert d.ratios == {1: 0.5, 2: 1.2}  # stops at the first M the sparse kernel loses
    assert {m for _, m in timer.calls} == {1, 2}
    # Rounds alternate which path goes first, with the same number of samples of each.
    firsts = [timer.calls[i][0] for i in range(0, 2 * crossover.ROUNDS, 2)]
    assert firsts == ["dense", "sparse"] * (crossover.ROUNDS // 2) + ["dense"]


def test_sparse_faster_at_every_m_keeps_them_all():
    d = decide(FakeTimer(lambda m: 0.1 * m / MAX_ROWS))
    assert d.m_max == MAX_ROWS and sorted(d.ratios) == list(range(1, MAX_ROWS + 1))


def test_sparse_slower_at_m1_is_never_used():
    assert decide(FakeTimer(lambda m: 1.0)).m_max == 0  # a tie goes to dense


def test_decision_is_the_median_of_rounds():
    # One noisy round (sparse 5x slower) among five does not move the decision.
    noisy = iter([0.5, 0.5, 2.5, 0.5, 0.5])
    m_max, ratios = crossover.decide(FakeTimer(lambda m: next(noisy) if m == 1 else 2.0),
                                     max_rows=2)
    assert (m_max, ratios) == (1, {1: 0.5, 2: 2.0})


def test_cache_hit_skips_the_timing(fresh_cache):
    first = decide(FakeTimer(lambda m: 0.5 if m <= 3 else 2.0))
    assert first.m_max == 3
    data = json.loads((fresh_cache / crossover.CACHE_FILE).read_text())
    (entry,) = data.values()
    assert entry["m_max"] == 3 and entry["key"]["N"] == N and entry["key"]["K"] == K
    assert entry["key"]["dtype"] == "bfloat16" and entry["key"]["sparsity"] == 0.5
    crossover._DECIDED.clear()  # a new process
    again = decide(never_called)
    assert (again.m_max, again.source) == (3, "cache")


@pytest.mark.parametrize("change", ["cpu flags", "cpu model", "torch", "dtype", "shape",
                                    "sparsity"])
def test_a_changed_key_part_invalidates_the_cache(change, monkeypatch):
    assert decide(FakeTimer(lambda m: 0.5 if m <= 3 else 2.0)).m_max == 3
    crossover._DECIDED.clear()
    model, flags = crossover.cpu_identity()
    kwargs = {}
    weight = wt()
    if change == "cpu flags":
        monkeypatch.setattr(crossover, "cpu_identity",
                            lambda: (model, " ".join(f for f in flags.split() if f != "avx2")))
    elif change == "cpu model":
        monkeypatch.setattr(crossover, "cpu_identity", lambda: (model + " v2", flags))
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", torch.__version__ + ".post1")
    elif change == "dtype":
        weight = wt(torch.float16)
    elif change == "shape":
        weight = wt(n=N + 1)
    else:
        kwargs["sparsity"] = 0.7
    timer = FakeTimer(lambda m: 0.5 if m <= 5 else 2.0)
    d = crossover.decide_for(weight, None, timer=timer, **kwargs)
    assert (d.m_max, d.source) == (5, "measured") and timer.calls


def test_one_measurement_and_one_log_line_per_shape(caplog):
    timer = FakeTimer(lambda m: 0.5 if m <= 2 else 2.0)
    with caplog.at_level(logging.INFO, logger="vllm.vllm_sparsity"):
        for _ in range(3):  # three layers of one shape
            assert crossover.decide_for(wt(), None, timer=timer).m_max == 2
        crossover._DECIDED.clear()
        crossover.decide_for(wt(), None, timer=never_called)  # the next process: from the cache
    assert len(timer.calls) == 2 * crossover.ROUNDS * 3
    lines = [r.getMessage() for r in caplog.records if "crossover" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "bfloat16 [N 137, K 301] at s = 0.5" in lines[0] and "up to M = 2" in lines[0]
    assert "measured in" in lines[0] and "from the cache" in lines[1]


def test_override_fixes_the_crossover_without_timing(monkeypatch, fresh_cache):
    monkeypatch.setenv(crossover.ENV, "0")
    assert decide(never_called) == crossover.Decision(0, crossover.ENV, {})
    monkeypatch.setenv(crossover.ENV, str(MAX_ROWS))
    assert decide(never_called).m_max == MAX_ROWS
    assert not (fresh_cache / crossover.CACHE_FILE).exists()


@pytest.mark.parametrize("value", ["-1", str(MAX_ROWS + 1), "eight", "2.5"])
def test_override_out_of_range_is_refused(monkeypatch, value):
    monkeypatch.setenv(crossover.ENV, value)
    with pytest.raises(ValueError, match=f"{crossover.ENV}='{value}': must be an integer from 0 "
                                         f"to {MAX_ROWS}"):
        decide(never_called)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_inputs_have_the_expected_zeros_on_random_supports(sparsity):
    x = crossover.sparse_inputs(8, K, torch.bfloat16, sparsity)
    zeros = (x == 0).sum(-1)
    assert zeros.tolist() == [round(sparsity * K)] * 8
    assert len({tuple(row.nonzero().flatten().tolist()) for row in x}) == 8
    assert (x != 0).any(0).sum() > (1 - sparsity) * K  # the union grows with the rows


def prepared_layer(timer_factory, monkeypatch):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if timer_factory is not None:
        monkeypatch.setattr(crossover, "LayerTimer", timer_factory)
    layer = torch.nn.Module()
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * K**-0.5
    layer.weight = torch.nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
    cpu_backend.prepare(layer, UnquantizedLinearMethod())
    return layer


@pytest.mark.parametrize("sparse_up_to", [1, MAX_ROWS])
def test_the_op_follows_the_layers_crossover(sparse_up_to, monkeypatch):
    layer = prepared_layer(
        lambda wt, dense, s: FakeTimer(lambda m: 0.5 if m <= sparse_up_to else 2.0), monkeypatch)
    assert layer.sparsity_m_max == sparse_up_to
    # Identical rows: the union of kept inputs is one row's kept set (< K) at any M.
    x = activations(1, K, torch.bfloat16, seed=3).expand(MAX_ROWS + 1, K).contiguous()
    one_row = int(top_p_mask(x[:1], ptensor(0.5)).sum())
    assert one_row < K
    for m in (1, 2, MAX_ROWS, MAX_ROWS + 1):
        _, _, rows_read = cpu_backend.apply_counted(layer, x[:m], ptensor(0.5))
        assert rows_read.tolist() == [one_row if m <= sparse_up_to else K], m


def test_real_measurement_returns_a_valid_m_and_caches_it(fresh_cache, monkeypatch):
    layer = prepared_layer(None, monkeypatch)
    assert 0 <= layer.sparsity_m_max <= MAX_ROWS
    data = json.loads((fresh_cache / crossover.CACHE_FILE).read_text())
    (entry,) = data.values()
    assert entry["m_max"] == layer.sparsity_m_max
    assert entry["key"] == crossover.cache_key(torch.bfloat16, N, K, crossover.EXPECTED_SPARSITY,
                                                cpu_backend.select_isa()[0])
    assert all(r > 0 for r in entry["ratios"].values())


def test_every_timed_call_starts_after_an_eviction(monkeypatch):
    events = []

    class Evictor:
        def evict(self):
            events.append("evict")

    ticks = iter(range(100))
    monkeypatch.setattr(crossover.time, "perf_counter", lambda: next(ticks) * 1e-3)
    per_call = crossover.timed_cold(lambda: events.append("call"), Evictor(), sample_s=1.0,
                                    max_calls=3)
    assert events == ["evict", "call"] * 3  # at most max_calls, each after its eviction
    assert per_call == pytest.approx(1e-3)  # only the calls are timed (one tick each)
    events.clear()
    crossover.timed_cold(lambda: events.append("call"), Evictor(), sample_s=2.5e-3, max_calls=8)
    assert events == ["evict", "call"] * 3  # stops once the sample lasts sample_s


def fake_cache(root, cpu, index, level, size, shared):
    d = root / f"cpu{cpu}" / "cache" / f"index{index}"
    d.mkdir(parents=True)
    (d / "level").write_text(f"{level}\n")
    (d / "size").write_text(f"{size}\n")
    (d / "shared_cpu_list").write_text(f"{shared}\n")


def test_the_last_level_caches_of_the_process_cpus_are_summed_once_each(tmp_path, monkeypatch):
    # 4 CPUs, two L3s of 32 MiB (CPUs 0-1 and 2-3), private L2s: the process may run on 0, 1, 2.
    for cpu in range(4):
        fake_cache(tmp_path, cpu, 2, 2, "1024K", str(cpu))
        fake_cache(tmp_path, cpu, 3, 3, "32768K", "0-1" if cpu < 2 else "2-3")
    real_path = crossover.Path
    monkeypatch.setattr(crossover, "Path", lambda p: real_path(
        str(p).replace("/sys/devices/system/cpu", str(tmp_path))))
    monkeypatch.setattr(crossover.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert crossover.last_level_cache_bytes() == 64 << 20
    monkeypatch.setattr(crossover.os, "sched_getaffinity", lambda pid: {1})
    assert crossover.last_level_cache_bytes() == 32 << 20
    monkeypatch.setattr(crossover.os, "sched_getaffinity", lambda pid: {7})  # nothing listed
    assert crossover.last_level_cache_bytes() == 0
    assert crossover.CacheEvictor().buffer.nbytes == 2 * crossover.CacheEvictor.FALLBACK_BYTES


def test_the_evictor_reads_twice_this_machines_last_level_cache():
    llc = crossover.last_level_cache_bytes()
    cpu0 = [f.read_text().strip() for f in
            crossover.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")]
    if llc == 0:  # sysfs lists no caches here: the fallback size, said by the assertion
        assert cpu0 == [] and crossover.CacheEvictor().buffer.nbytes == \
            2 * crossover.CacheEvictor.FALLBACK_BYTES
    else:
        assert llc >= max(int(s.rstrip("KM")) << (10 if s.endswith("K") else 20) for s in cpu0)
        assert crossover.CacheEvictor().buffer.nbytes == 2 * llc


def test_the_backend_reports_how_each_layers_crossover_was_decided(monkeypatch):
    timer = lambda wt, dense, s: FakeTimer(lambda m: 0.5 if m <= 3 else 2.0)  # noqa: E731
    assert cpu_backend.crossover_of(prepared_layer(timer, monkeypatch)) == {
        "m_max": 3, "measured": True, "source": "measured"}
    monkeypatch.setattr(crossover, "_DECIDED", {})  # a new process: the cache answers
    monkeypatch.setattr(crossover, "LayerTimer", lambda wt, dense, s: never_called)
    assert cpu_backend.crossover_of(prepared_layer(None, monkeypatch)) == {
        "m_max": 3, "measured": True, "source": "cache"}
    monkeypatch.setenv(crossover.ENV, "5")
    assert cpu_backend.crossover_of(prepared_layer(None, monkeypatch)) == {
        "m_max": 5, "measured": False, "source": crossover.ENV}
    assert cpu_backend.crossover_of(torch.nn.Linear(2, 2)) is None  # not prepared
