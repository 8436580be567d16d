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
])
def test_bad_flags_are_refused_before_start_up(argv, message, capsys, monkeypatch):
    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(bench, "_Child", no_engine)
    monkeypatch.setattr(bench, "_serve_measurements", no_engine)
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err
