"""``vllm-sparsity bench``'s bookkeeping (no engine started: the timings themselves are a
benchmark, not a test)."""

import pytest

from vllm_sparsity.tools import bench


def test_sparsity_sums_counts_before_dividing():
    # Two decode runs; per site [zeroed, total, weight columns read, columns in all].
    runs = [{"input": [30, 100, 50, 100], "intermediate": [10, 40, 40, 40]},
            {"input": [0, 20, 20, 20], "intermediate": [30, 40, 10, 40]}]
    got = bench._sparsity(runs)
    # Shares of the summed counts (30/120, not the mean of 0.3 and 0.0).
    assert got["input"] == pytest.approx(30 / 120)
    assert got["input_read"] == pytest.approx(70 / 120)
    assert got["intermediate"] == pytest.approx(40 / 80)
    assert got["intermediate_read"] == pytest.approx(50 / 80)
    assert got["all"] == pytest.approx((30 / 120 + 40 / 80) / 2)


def test_sparsity_dense_reads_are_not_reported():
    # The torch backend reads every column: no "_read" entry, the zeroed share still counts.
    got = bench._sparsity([{"input": [5, 10, 10, 10]}])
    assert got == {"input": 0.5, "all": 0.5}


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--prefill-tokens", "0"], "--prefill-tokens must be >= 1, got 0"),
    (["--p", "1.5"], "p must be a number in [1e-06, 1], got 1.5"),
    (["--backend", "gpu"], "backend"),
    (["--streams", "0", "4"], "--streams must be counts in [1, 256], got [0, 4]"),
    (["--mode", "fast"], "mode"),
])
def test_bad_flags_are_refused_before_start_up(argv, message, capsys, monkeypatch):
    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(bench, "_Child", no_engine)
    monkeypatch.setattr(bench, "_serve_measurements", no_engine)
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_stream_prompts_differ_and_stay_in_range():
    # Rows of one decode batch must keep different entries: identical prompts would make the
    # union of kept rows one row's set and flatter the sparse GEMV at M > 1.
    prompts = [p["prompt_token_ids"] for p in bench.stream_prompts(16)]
    assert prompts[0] == bench.SHORT_PROMPT
    assert len({tuple(p) for p in prompts}) == 16
    assert all(len(p) == len(bench.SHORT_PROMPT) and p[0] == bench.SHORT_PROMPT[0]
               for p in prompts)
    assert all(500 <= t < 5500 for p in prompts[1:] for t in p[1:])


def test_summary_ratios_are_per_round_medians_with_range():
    class Child:
        def __init__(self, rss):
            self.memory_gib, self.startup_s, self.crossover = {"rss": rss}, 1.0, None

    configs = [("off", "off", None), ("p=0.7", "plugin", 0.7)]
    runs = {"off": {"decode@2": [10.0, 20.0, 10.0], "counts": []},
            "p=0.7": {"decode@2": [15.0, 20.0, 12.0], "counts": []}}
    got = bench._summarize(runs, configs, ["decode@2"],
                           {"off": Child(4.0), "plugin": Child(5.0)})["p=0.7"]
    assert got["decode@2"] == {"tok_s": 15.0, "ratio": 1.2, "ratio_range": [1.0, 1.5]}
    assert got["rss_ratio"] == 1.25
