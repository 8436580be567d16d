"""Every kernel configuration the launchers can pick compiles for sm_80 and sm_90 without spills:
under this environment's Triton, and under the oldest and the newest Triton release PyPI offers in
the checked range (``kernels/version_matrix.py``: each installed once into the cache, about 45 s;
compile results are cached per Triton version and kernel source, so an unchanged kernel costs
seconds). Skipped, with the reason, only when pip cannot reach PyPI to list the releases.

CPU only: ``triton.compile`` builds PTX and cubins with no GPU present. It runs in a subprocess
because the test session runs Triton's interpreter (tests/triton_interpreter.py), under which
``@triton.jit`` yields interpreter functions that cannot be compiled.
"""

import json
import os
import subprocess
import sys

import pytest

from vllm_sparsity.kernels import version_matrix

KERNELS = {"_top_p_threshold_kernel", "_top_p_partial_mass_kernel", "_sparse_gemv_kernel",
           "_split_k_reduce_kernel"}


def assert_no_spills(results: list[dict]) -> None:
    assert {r["kernel"] for r in results} == KERNELS
    assert {r["arch"] for r in results} == {"sm_80", "sm_90a"}
    spilling = [r for r in results if r["n_spills"] != 0]
    assert not spilling, spilling
    assert all(0 < r["n_regs"] <= 255 for r in results)


def test_every_config_compiles_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "vllm_sparsity.kernels.compile_check", "--json"],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    assert_no_spills(json.loads(proc.stdout))


@pytest.fixture(scope="module")
def triton_releases() -> list[str]:
    releases = version_matrix.available()
    if releases is None:
        pytest.skip("PyPI unreachable: `pip index versions triton` failed, so the oldest and "
                    "newest Triton releases cannot be listed or installed")
    return releases


@pytest.mark.parametrize("end", ["oldest", "newest"])
def test_oldest_and_newest_triton_compile_without_spills(end, triton_releases):
    version = triton_releases[0] if end == "oldest" else triton_releases[-1]
    results = version_matrix.compile_check(version)
    assert {r["triton"] for r in results} == {version}
    assert_no_spills(results)
