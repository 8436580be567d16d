"""Every exit status of every ``vllm-sparsity eval`` command and of ``vllm-sparsity analyze``
(``errors.MEANINGS``), on real inputs: the committed sweep results of the demo model
(eval/results/demo-2026-11-29/) and the committed CI baseline; and where the statuses are
documented: each command's ``--help`` and eval/README.md list exactly ``MEANINGS``."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from test_eval_check import SERVING, results
from vllm_sparsity.eval import analyze, check, cli, errors
from vllm_sparsity.eval.errors import MEANINGS, ExitCode

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "eval" / "results" / "demo-2026-11-29"  # piqa + lambada, 40 documents each
BASELINE = REPO / "eval" / "baselines" / "gemma-3-270m-ci.json"  # intermediate, deployed p 0.8


def status(argv, main=cli.main):
    """(exit status, stdout, stderr) of ``main(argv)``; argparse's own exits included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("command", ["sweep", "check", "baseline", "tasks", "analyze"])
def test_help_lists_the_commands_statuses(command):
    code, out, _ = (status(["--help"], analyze.main) if command == "analyze"
                    else status([command, "--help"]))
    assert code == 0 and errors.epilog(command) in out
    assert [int(c) for c in re.findall(r"^  (\d)  ", out, re.M)] == [int(c)
                                                                    for c in MEANINGS[command]]


def test_the_readme_lists_every_commands_statuses():
    readme = (REPO / "eval" / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| (\d) \| (.+) \|$", readme, re.M)
    assert rows == [(command, str(int(code)), text) for command, meanings in MEANINGS.items()
                    for code, text in meanings.items()]


def test_check_statuses_on_the_committed_sweeps(tmp_path):
    base = tmp_path / "baseline.json"
    intermediate = DEMO / "intermediate" / "results.json"
    assert status(["baseline", "--results", str(intermediate), "--deployed-p", "0.8",
                   "--out", str(base)])[0] == ExitCode.OK
    code, out, _ = status(["check", "--results", str(intermediate), "--baseline", str(base)])
    assert code == ExitCode.OK and out.splitlines()[-1].startswith("ok: at the deployed p=0.8")
    # At p = 0.5 the demo model keeps 0.781 of dense accuracy (interval [0.632, 0.981]).
    code, out, _ = status(["check", "--results", str(intermediate), "--baseline", str(base),
                           "--deployed-p", "0.5"])
    assert code == ExitCode.REGRESSED and out.startswith("FAIL: accuracy at the deployed p=0.5 is "
                                                         "0.781 of dense")
    # The all_inputs sweep against the committed (intermediate) baseline.
    code, _, err = status(["check", "--results", str(DEMO / "all_inputs" / "results.json"),
                           "--baseline", str(BASELINE)])
    assert code == ExitCode.NOT_COMPARABLE
    assert "are not comparable: target is all_inputs in the results and intermediate in the " \
           "baseline; check against a baseline built" in err
    code, _, err = status(["check", "--results", str(tmp_path / "none.json"), "--baseline",
                           str(base)])
    assert code == ExitCode.USAGE and err.endswith(f"--results {tmp_path / 'none.json'}: no such "
                                                   "file\n")
    code, _, err = status(["baseline", "--results", str(intermediate), "--deployed-p", "0.33",
                           "--out", str(base)])
    assert code == ExitCode.USAGE and "--deployed-p 0.33: the results have no point" in err


@pytest.mark.parametrize("field, value, sentence", [
    ("model", "/models/other", "model is other in the results and m in the baseline"),
    ("rule", "max-p", "rule is max-p in the results and top-p in the baseline"),
    ("q", 2.0, "q is 2.0 in the results and unset in the baseline"),
    ("dtype", "float32", "dtype is float32 in the results and bfloat16 in the baseline"),
    ("device", "cuda", "device is cuda in the results and cpu in the baseline"),
    ("vllm", "0.33.0", "vLLM version is 0.33.0 in the results and 0.32.0 in the baseline"),
    ("vllm_sparsity", "0.2.0", "plugin version is 0.2.0 in the results and 0.1.0 in the "
                               "baseline"),
])
def test_check_refuses_each_other_setting_in_one_sentence(tmp_path, field, value, sentence):
    res, base = tmp_path / "results.json", tmp_path / "baseline.json"
    same = {1.0: 1.0, 0.98: 0.995}
    base.write_text(json.dumps(check.make_baseline(results(same), 0.98, "t")))
    other = (results(same) | {"model": value} if field == "model"
             else results(same, **{field: value}))
    res.write_text(json.dumps(other))
    code, _, err = status(["check", "--results", str(res), "--baseline", str(base)])
    assert code == ExitCode.NOT_COMPARABLE
    assert err == (f"vllm-sparsity eval: error: --results {res} and --baseline {base} are not "
                   f"comparable: {sentence}; check against a baseline built from a sweep with "
                   "the same settings on the same software (eval/README.md, CI job)\n")


def test_a_baseline_that_does_not_record_a_setting_warns(tmp_path):
    """The committed baseline predates nothing it needs; a copy without its serving fields (a
    baseline from before they were recorded) is still judged, with one warning naming them."""
    old = json.loads(BASELINE.read_text())
    old.pop("serving", None)
    base = tmp_path / "old.json"
    base.write_text(json.dumps(old))
    res = tmp_path / "results.json"
    res.write_text(json.dumps(results({1.0: 1.0, 0.8: 1.0}, tasks=old["tasks"],
                                      limit=old["limit"], target=old["target"])
                              | {"model": old["model"]}))
    code, out, _ = status(["check", "--results", str(res), "--baseline", str(base)])
    assert code in (ExitCode.OK, ExitCode.REGRESSED)  # judged: the synthetic points differ
    assert ("WARN: the baseline does not record dtype, device, vLLM version, plugin version "
            "(made before they were recorded): not compared; rebuild it to have them checked"
            in out.splitlines())


def test_sweep_statuses(tmp_path, monkeypatch):
    dead = "http://127.0.0.1:9"
    argv = ["sweep", "--model", "/models/m", "--url", dead, "--tasks", "piqa", "--p-grid",
            "1.0,0.9", "--out", str(tmp_path / "out")]
    code, _, err = status([*argv, "--search", "--sparsity-bracket", "2"])
    assert (code, err) == (ExitCode.USAGE, "vllm-sparsity eval: error: --sparsity-bracket: a "
                                           "width of measured sparsity in (0, 1), got 2.0\n")
    code, _, err = status([*argv, "--search", "--tol", "0.02"])
    assert code == ExitCode.USAGE and err.endswith(
        "error: --tol was renamed --sparsity-bracket: the search's stopping width in measured "
        "sparsity, not an accuracy tolerance\n")
    code, _, err = status(argv)
    assert code == ExitCode.SERVER and f"--url {dead}: no server answers there" in err
    # The folder now holds that sweep's settings: another grid is refused before any server.
    code, _, err = status([*argv[:-3], "1.0,0.8", "--out", str(tmp_path / "out")])
    assert code == ExitCode.NOT_COMPARABLE and "holds a sweep with other settings" in err
    # A bug: its traceback, and 5 rather than 1 ("regressed").
    from vllm_sparsity.eval import grid

    monkeypatch.setattr(grid, "ordered_grid", lambda *args: 1 / 0)
    code, _, err = status(argv)
    assert code == ExitCode.INTERNAL and "ZeroDivisionError" in err and "Traceback" in err


def test_tasks_and_analyze_statuses(tmp_path):
    code, out, _ = status(["tasks", "--tasks", "piqa"])
    assert code == ExitCode.OK and (Path(out.strip()) / "piqa.yaml").exists()
    assert status(["tasks", "--tasks", "nope"])[0] == ExitCode.USAGE
    argv = ["--model", "/models/m", "--url", "http://127.0.0.1:9", "--tasks", "piqa",
            "--p-grid", "0.9", "--out", str(tmp_path / "a")]
    code, _, err = status([*argv, "--requests", "0"], analyze.main)
    assert (code, err) == (ExitCode.USAGE, "vllm-sparsity analyze: error: --requests: at least "
                                           "1, got 0\n")
    code, _, err = status(argv, analyze.main)
    assert code == ExitCode.SERVER and "no server answers there" in err


def test_a_folder_scored_by_another_server_is_not_resumed(tmp_path):
    """``serving.json`` records what the server ran; a later run on a server of another dtype
    (or model, device, versions) is refused rather than mixed into the same results."""
    from vllm_sparsity.eval.comparable import record_serving
    from vllm_sparsity.eval.errors import NotComparable

    assert record_serving(tmp_path, {"serving": SERVING}) == SERVING
    assert record_serving(tmp_path, {"serving": {**SERVING, "model": "/elsewhere/m"}})
    with pytest.raises(NotComparable, match=r"holds points scored by another server \(dtype is "
                                            r"bfloat16 there and float32 on this server\)"):
        record_serving(tmp_path, {"serving": {**SERVING, "dtype": "float32"}})
