"""tests/skip_policy.py in a pytest run of its own: a skip for a machine-capability reason is
listed and passes; any other skip (a missing package, the network) fails the run; and .ci/run
runs ``make test`` with ``PYTEST_ARGS`` cleared."""

import os
import stat
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

ALLOWED = '''
import pytest

def test_passes():
    pass

@pytest.mark.skipif(True, reason="no CUDA device")
def test_on_a_gpu():
    pass

def test_kernels():
    pytest.skip("cpu kernels unavailable here: CPU lacks avx2, fma for the avx2 build")
'''

MODULE_SKIP = '''
import pytest

pytest.skip("PyPI unreachable", allow_module_level=True)
'''


def run(tmp_path, **files):
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "skip_policy", "-p", "no:randomly",
                           "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def test_machine_capability_skips_pass_and_are_listed(tmp_path):
    proc = run(tmp_path, test_allowed=ALLOWED)
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "skips allowed (machine capability)" in line)
    assert lines[start + 1:start + 3] == [
        "test_allowed.py::test_on_a_gpu: no CUDA device",
        "test_allowed.py::test_kernels: cpu kernels unavailable here: CPU lacks avx2, fma for the "
        "avx2 build"]
    assert "NOT allowed" not in proc.stdout


def test_any_other_skip_fails_the_run(tmp_path):
    proc = run(tmp_path, test_allowed=ALLOWED, test_module_skip=MODULE_SKIP,
               test_missing=ALLOWED.replace('"no CUDA device"', '"matplotlib not installed"'))
    assert proc.returncode == 1, proc.stdout
    refused = proc.stdout[proc.stdout.index("skips NOT allowed"):].splitlines()[1:3]
    assert sorted(refused) == ["test_missing.py::test_on_a_gpu: matplotlib not installed",
                               "test_module_skip.py: PyPI unreachable"], proc.stdout


def test_ci_runs_make_test_with_pytest_args_cleared(tmp_path):
    """.ci/run with a ``make`` on PATH that records its arguments and PYTEST_ARGS."""
    fake = tmp_path / "make"
    fake.write_text('#!/bin/sh\necho "args=$* PYTEST_ARGS=${PYTEST_ARGS-unset}" > "$OUT"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "PYTEST_ARGS": "-k nothing", "OUT": str(out)}
    subprocess.run(["bash", str(TESTS.parent / ".ci" / "run")], check=True, env=env, timeout=60)
    assert out.read_text() == "args=test PYTEST_ARGS=unset\n"
