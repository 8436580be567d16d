"""The regression check's logic and exit codes, on small hand-built results (the end-to-end test
with real sweeps is test_eval_sweep.py)."""

import json

import pytest

from vllm_sparsity.eval import check
from vllm_sparsity.eval.cli import main


def results(normalized_at, critical=0.30, interval=(0.25, 0.35), tasks=("piqa", "lambada"),
            limit=40, target="all_inputs", spread=0.05):
    """A results.json-shaped dict: points at p in normalized_at ({p: normalized average}), each
    with a paired interval of +- spread."""
    points = [{"p": p, "sparsity": {"overall": 0.5 * (1 - p) + 0.001}, "average": 0.5 * n,
               "normalized_average": n, "normalized_average_interval": [n - spread, n + spread],
               "normalized": {t: n for t in tasks},
               "tasks": {t: {"acc": 0.5 * n, "primary": "acc"} for t in tasks}}
              for p, n in normalized_at.items()]
    crit = {"sparsity": critical, "interval": list(interval), "p": None, "fail_share": 0.0}
    return {"model": "/models/m", "tasks": list(tasks), "limit": limit, "target": target,
            "grid": list(normalized_at), "points": points,
            "critical_sparsity": {"average": crit, "tasks": {}}}


@pytest.fixture
def baseline():
    return check.make_baseline(results({1.0: 1.0, 0.98: 0.995, 0.9: 0.95}), 0.98, "test")


def test_passes_when_nothing_regressed(baseline):
    assert check.check(results({1.0: 1.0, 0.98: 0.993, 0.9: 0.9}, critical=0.26),
                       baseline) == ([], [])


def test_fails_when_accuracy_at_the_deployed_p_drops(baseline):
    failures, _ = check.check(results({1.0: 1.0, 0.98: 0.9}), baseline)
    assert len(failures) == 1
    assert failures[0].startswith("accuracy at the deployed p=0.98 is 0.900 of dense "
                                  "(paired 95% interval [0.850, 0.950]")


def test_a_drop_within_sampling_noise_warns_unless_strict(baseline):
    noisy = results({1.0: 1.0, 0.98: 0.97}, spread=0.05)  # interval [0.92, 1.02] reaches 0.99
    failures, warnings = check.check(noisy, baseline)
    assert failures == [] and warnings[0].startswith("accuracy at the deployed p=0.98 is 0.970")
    failures, warnings = check.check(noisy, baseline, strict=True)
    assert failures[0].startswith("accuracy at the deployed p=0.98 is 0.970") and warnings == []


def test_fails_when_critical_sparsity_drops_below_the_interval(baseline):
    failures, _ = check.check(results({1.0: 1.0, 0.98: 0.995}, critical=0.1,
                                      interval=(0.05, 0.15)), baseline)
    assert len(failures) == 1 and failures[0].startswith("critical sparsity 0.100")
    # Intervals that still overlap: a warning; strict: a failure.
    overlapping = results({1.0: 1.0, 0.98: 0.995}, critical=0.2, interval=(0.1, 0.3))
    failures, warnings = check.check(overlapping, baseline)
    assert failures == [] and warnings[0].startswith("critical sparsity 0.200")
    assert check.check(overlapping, baseline, strict=True)[0][0].startswith("critical sparsity")
    # Within the tolerance of the interval's low end: measurement wobble, not a regression.
    assert check.check(results({1.0: 1.0, 0.98: 0.995}, critical=0.245), baseline) == ([], [])


def test_a_critical_sparsity_where_no_point_passes_counts_as_zero(baseline):
    failures, _ = check.check(results({1.0: 1.0, 0.98: 0.995}, critical=None,
                                      interval=(0.0, 0.0)), baseline)
    assert failures[0].startswith("critical sparsity 0.000")


def test_reports_every_failed_criterion_and_refuses_incomparable_results(baseline):
    failures, _ = check.check(results({1.0: 1.0, 0.9: 0.95}, critical=0.1,
                                      interval=(0.0, 0.1)), baseline)
    assert [f.split(" ")[0] for f in failures] == ["no", "critical"]
    with pytest.raises(ValueError, match="not comparable to the baseline: limit 20 where the "
                                         "baseline has 40"):
        check.check(results({1.0: 1.0, 0.98: 0.995}, limit=20), baseline)
    failures, _ = check.check(results({1.0: 1.0, 0.9: 0.8}), baseline, deployed_p=0.9)
    assert failures[0].startswith("accuracy at the deployed p=0.9 is 0.800")


def test_make_baseline_needs_the_deployed_point():
    with pytest.raises(ValueError, match="no point at p=0.5"):
        check.make_baseline(results({1.0: 1.0}), 0.5, "test")


def test_cli_exit_codes_and_messages(tmp_path, baseline, capsys):
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps(baseline))
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(results({1.0: 1.0, 0.98: 0.995})))
    bad.write_text(json.dumps(results({1.0: 1.0, 0.98: 0.8}, critical=0.0, interval=(0, 0))))
    assert main(["check", "--results", str(good), "--baseline", str(base)]) == 0
    assert capsys.readouterr().out.startswith("ok: at the deployed p=0.98")
    assert main(["check", "--results", str(bad), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.startswith("FAIL: ") for line in out)
