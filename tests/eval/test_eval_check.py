"""The regression check's logic and exit codes, on small hand-built results (the end-to-end test
with real sweeps is test_eval_sweep.py)."""

import json

import numpy as np
import pytest

from vllm_sparsity.eval import check
from vllm_sparsity.eval.cli import main
from vllm_sparsity.eval.errors import NotComparable


N_DOCS = 40
# What a server reports running (GET /v1/sparsity's "serving"), as a sweep records it.
SERVING = {"model": "/models/m", "dtype": "bfloat16", "device": "cpu", "vllm": "0.32.0",
           "vllm_sparsity": "0.1.0"}
LOGLIK = {"piqa": np.linspace(-120.0, -40.0, N_DOCS), "lambada": np.linspace(-9.0, -0.5, N_DOCS)}


def results(normalized_at, critical=0.30, interval=(0.25, 0.35), tasks=("piqa", "lambada"),
            limit=N_DOCS, target="all_inputs", spread=0.05, loglik=None, rule="top-p", q=None,
            **serving):
    """A results.json-shaped dict: points at p in normalized_at ({p: normalized average}), each
    with a paired interval of +- spread, and per-document gold log-likelihoods (``loglik``: task
    -> values at every point; default ``LOGLIK``); ``serving``: fields of ``SERVING`` to change."""
    loglik = LOGLIK if loglik is None else loglik
    points = [{"p": p, "sparsity": {"overall": 0.5 * (1 - p) + 0.001}, "average": 0.5 * n,
               "normalized_average": n, "normalized_average_interval": [n - spread, n + spread],
               "normalized": {t: n for t in tasks},
               "tasks": {t: {"acc": 0.5 * n, "primary": "acc",
                             "loglik": [float(v) for v in loglik.get(t, LOGLIK["lambada"])]}
                       for t in tasks}}
              for p, n in normalized_at.items()]
    crit = {"sparsity": critical, "interval": list(interval), "p": None, "fail_share": 0.0}
    return {"model": "/models/m", "tasks": list(tasks), "limit": limit, "target": target,
            "rule": rule, "q": q, "serving": {**SERVING, **serving},
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
    with pytest.raises(NotComparable, match="not comparable: limit is 20 in the results and 40 "
                                            "in the baseline; check against a baseline built"):
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


# ------------------------------------------------ paired per-document log-likelihood comparison


def test_a_point_of_one_document_has_no_stderr_and_still_reports(tmp_path):
    """lm-eval writes its stderr as "N/A" for a single document (``--limit 1``)."""
    from vllm_sparsity.eval import registry, report as report_mod

    write_samples(tmp_path, "my_mc", [([-3.5, -1.25], 1)])
    lm_results = next((tmp_path / "lm_eval" / "model").glob("results_*.json"))
    lm_results.write_text(json.dumps({"results": {"my_mc": {"acc,none": 1.0,
                                                            "acc_stderr,none": "N/A"}}}))
    spec = registry.TaskSpec("my_mc", "my_mc", (registry.Leaf("my_mc", "acc"),))
    point, _ = report_mod.load_point(tmp_path, [spec])
    assert point["tasks"]["my_mc"]["acc"] == 1.0 and point["tasks"]["my_mc"]["acc_stderr"] is None
    crit = {"sparsity": 0.0, "p": 1.0, "interval": [0.0, 0.0]}
    result = {"model": "m", "target": "input", "tasks": ["my_mc"], "docs": {"my_mc": 1},
              "critical_sparsity": {"average": crit, "tasks": {"my_mc": crit}, "level": 0.95,
                                    "n_boot": 10, "threshold": 0.99},
              "points": [{**point, "p": 1.0, "sparsity": {"input": 0.0, "overall": 0.0},
                          "average": 1.0,
                          "normalized_average": 1.0, "normalized_average_interval": [1, 1],
                          "wall_s": 1.0}]}
    assert "| 1 | 0.000 | 0.000 | 1.000 ± n/a |" in report_mod.report(result)


def write_samples(pdir, task, docs):
    """One point of lm-eval output by hand: ``docs`` is [(choice logliks, gold index)] per
    document, in lm-eval's samples format (strings, one [loglik, is_greedy] per choice)."""
    run = pdir / "lm_eval" / "model"
    run.mkdir(parents=True, exist_ok=True)
    (pdir / "point.json").write_text(json.dumps({"p": 0.8}))
    (run / "results_2026-12-01T00-00-00.json").write_text(json.dumps(
        {"results": {task: {"acc,none": 0.5, "acc_stderr,none": 0.1}}}))
    with (run / f"samples_{task}_2026-12-01T00-00-00.jsonl").open("w") as f:
        for i, (lls, gold) in reversed(list(enumerate(docs))):
            resps = [[[repr(ll), "False"]] for ll in lls]
            f.write(json.dumps({"doc_id": i, "target": str(gold), "resps": resps,
                                "filtered_resps": [r[0] for r in resps], "filter": "none",
                                "acc": float(np.argmax(lls) == gold)}) + "\n")


def test_load_point_records_the_gold_continuations_log_likelihood(tmp_path):
    from vllm_sparsity.eval import registry, report as report_mod

    docs = [([-3.5, -1.25], 1), ([-0.5, -7.0, -2.0], 2), ([-4.0], 0)]
    write_samples(tmp_path, "my_mc", docs)
    spec = registry.TaskSpec("my_mc", "my_mc", (registry.Leaf("my_mc", "acc"),))
    point, correct = report_mod.load_point(tmp_path, [spec])
    assert point["tasks"]["my_mc"]["loglik"] == [-1.25, -2.0, -4.0]  # gold choice of each
    assert correct["my_mc"].tolist() == [1.0, 0.0, 1.0]
    # Generations carry no log-likelihood: no "loglik" rather than a wrong one.
    assert report_mod.gold_loglik({"resps": [["The answer is 4."]], "target": "4"}) is None


@pytest.fixture
def ll_baseline():
    return check.make_baseline(results({1.0: 1.0, 0.8: 1.0}), 0.8, "test")


def shifted(shift, noise=0.0, seed=1):
    """LOGLIK moved by ``shift`` nats per document, plus symmetric per-document noise."""
    rng = np.random.default_rng(seed)
    return {t: v + shift + noise * rng.standard_normal(len(v)) for t, v in LOGLIK.items()}


def test_an_identical_rerun_does_not_fire(ll_baseline):
    assert check.check(results({1.0: 1.0, 0.8: 1.0}), ll_baseline) == ([], [])
    shift = check.loglik_shift(results({1.0: 1.0, 0.8: 1.0}), ll_baseline, 0.8)
    assert shift["shift"] == 0.0 and shift["interval"] == [0.0, 0.0]


def test_a_rerun_with_rounding_noise_does_not_fire(ll_baseline):
    # Sparse points are not bit-reproducible: symmetric noise (0.3 nats a document) keeps 0
    # inside the interval.
    for seed in range(5):
        rerun = results({1.0: 1.0, 0.8: 1.0}, loglik=shifted(0.0, noise=0.3, seed=seed))
        assert check.check(rerun, ll_baseline) == ([], []), seed


def test_a_small_shift_fires_where_accuracy_does_not(ll_baseline):
    # 0.2 nats per document lower at the deployed p, with the same noise: every document's
    # accuracy unchanged (normalized 1.0), so only the log-likelihood comparison can see it.
    regressed = results({1.0: 1.0, 0.8: 1.0}, loglik=shifted(-0.2, noise=0.3))
    failures, warnings = check.check(regressed, ll_baseline)
    assert warnings == [] and len(failures) == 1
    assert failures[0].startswith("gold log-likelihood at the deployed p=0.8 is -0.2")
    assert "paired 99% interval [-0." in failures[0]
    shift = check.loglik_shift(regressed, ll_baseline, 0.8)
    naive = np.mean([np.mean(shifted(-0.2, noise=0.3)[t] - LOGLIK[t]) for t in LOGLIK])
    assert shift["shift"] == pytest.approx(naive)
    lo, hi = shift["interval"]
    assert lo < naive < hi < 0
    # A tolerance wider than the shift lets it pass; a gain never fails.
    assert check.check(regressed, ll_baseline, loglik_tol=0.5) == ([], [])
    assert check.check(results({1.0: 1.0, 0.8: 1.0}, loglik=shifted(+0.2, noise=0.3)),
                       ll_baseline) == ([], [])


def test_files_without_log_likelihoods_warn_and_cli_reports_the_shift(tmp_path, ll_baseline,
                                                                        capsys):
    old = json.loads(json.dumps(ll_baseline))
    for pt in old["points"]:
        for t in pt["tasks"].values():
            del t["loglik"]
    failures, warnings = check.check(results({1.0: 1.0, 0.8: 1.0}), old)
    assert failures == [] and warnings == [
        "no per-document log-likelihoods at p=0.8 in both the results and the baseline "
        "(generative tasks only, or a file from before they were recorded): the log-likelihood "
        "comparison was skipped"]
    base, res = tmp_path / "baseline.json", tmp_path / "results.json"
    base.write_text(json.dumps(ll_baseline))
    res.write_text(json.dumps(results({1.0: 1.0, 0.8: 1.0}, loglik=shifted(-0.2, noise=0.3))))
    assert main(["check", "--results", str(res), "--baseline", str(base)]) == 1
    assert capsys.readouterr().out.startswith("FAIL: gold log-likelihood at the deployed p=0.8")
    assert main(["check", "--results", str(res), "--baseline", str(base), "--loglik-tol",
                 "-1"]) == 2
    assert capsys.readouterr().err == ("vllm-sparsity eval: error: --loglik-tol: nats per "
                                       "document, >= 0, got -1.0\n")
