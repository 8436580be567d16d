"""Every kernel configuration the launchers can pick compiles for sm_80 and sm_90 without spills:
under this environment's Triton, and under Triton 3.6.0 and 3.9.0, the two ends of the checked
range, named in ``kernels/version_matrix.py`` (``ENDS``; each fetched from PyPI once into the
cache unless installed, about 45 s; compile results are cached per Triton version and kernel
source, so an unchanged kernel costs seconds). A release that cannot be fetched fails its test.

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


def test_the_checked_range_ends_at_the_named_releases():
    lo, hi = (version_matrix._version_tuple(v) for v in version_matrix.ENDS)
    assert lo[:2] == version_matrix.OLDEST and hi[:2] == version_matrix.NEWEST_MINOR


@pytest.mark.parametrize("version", version_matrix.ENDS)
def test_range_end_triton_compiles_without_spills(version):
    results = version_matrix.compile_check(version)  # raises when the release cannot be fetched
    assert {r["triton"] for r in results} == {version}
    assert_no_spills(results)
