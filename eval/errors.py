"""The exit statuses of ``vllm-sparsity eval`` and ``vllm-sparsity analyze``, and the errors that
carry them: the one table of what each status means for each command (``--help`` epilogs and
eval/README.md are written from it; tests/eval/test_eval_exit_codes.py keeps the two equal).

One rule decides the status of an error: found before any server is contacted (a flag, a file, a
task) is usage (2, argparse's own status for bad usage); a run that cannot be compared or combined
with another (a baseline made with other settings, a folder holding another sweep) is 3; anything
learned from the server (unreachable, failed, refused, or serving something other than the flags
ask for), or lm-eval's scoring against it failing, is 4. An unexpected exception (a bug) prints
its traceback and exits 5, so that a crash never reads as "regressed" (1, Python's own status for
an uncaught exception).
"""

from __future__ import annotations

import sys
import textwrap
import traceback
from collections.abc import Callable
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    REGRESSED = 1  # check only: a criterion failed
    USAGE = 2  # bad flag or value, a missing or wrong input file, a task that cannot be scored
    NOT_COMPARABLE = 3  # two runs made with different settings
    SERVER = 4  # the server or lm-eval's scoring against it failed, or the server does not fit
    INTERNAL = 5  # an unexpected exception (a bug): its traceback is printed


class EvalError(Exception):
    """A user-facing error: one sentence naming the flag or file, and its exit status ``code``."""

    code = ExitCode.USAGE

    def __init__(self, message: str, code: ExitCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class UsageError(EvalError):
    code = ExitCode.USAGE


class NotComparable(EvalError):
    code = ExitCode.NOT_COMPARABLE


class ServerError(EvalError):
    code = ExitCode.SERVER


# What each status means for each command (the statuses a command never returns are left out).
MEANINGS = {
    "sweep": {
        ExitCode.OK: "results written (results.json, critical_sparsity.json, report.md); a sweep "
                     "measures, `check` judges",
        ExitCode.USAGE: "bad flag or value, a task that cannot be scored (found before any server "
                        "starts)",
        ExitCode.NOT_COMPARABLE: "--out holds a sweep with other settings, or points scored by "
                                 "another server (model, dtype, device, vLLM or plugin version)",
        ExitCode.SERVER: "the server: could not start, unreachable, failed, refused the key, or "
                         "serves another model or rule; or lm-eval's scoring against it failed",
    },
    "check": {
        ExitCode.OK: "no criterion failed (warnings within sampling noise may be printed)",
        ExitCode.REGRESSED: "a criterion failed: accuracy at the deployed p, critical sparsity or "
                            "gold log-likelihood (one FAIL line each)",
        ExitCode.USAGE: "bad flag or value; --results or --baseline missing, not JSON, or the "
                        "wrong kind of file",
        ExitCode.NOT_COMPARABLE: "results and baseline made with different settings (tasks, "
                                 "limit, target, model, dtype, device, rule, q, vLLM or plugin "
                                 "version), named in one sentence: rebuild the baseline",
    },
    "baseline": {
        ExitCode.OK: "baseline written",
        ExitCode.USAGE: "bad flag or value; --results missing or not a sweep's results; "
                        "--deployed-p not a point of the results",
    },
    "tasks": {
        ExitCode.OK: "tasks built; their folder printed",
        ExitCode.USAGE: "an unknown task",
    },
    "analyze": {
        ExitCode.OK: "analysis.json written",
        ExitCode.USAGE: "bad flag or value, too few documents for --requests",
        ExitCode.SERVER: "the server: could not start, unreachable, failed, refused the key, or "
                         "serves another model or rule",
    },
}
for _meanings in MEANINGS.values():  # every command can crash
    _meanings[ExitCode.INTERNAL] = "an unexpected error (a bug): its traceback is printed"


def epilog(command: str) -> str:
    """The ``--help`` epilog of ``command``: its exit statuses, one line each."""
    return "exit status:\n" + "\n".join(
        textwrap.fill(text, 79, initial_indent=f"  {int(code)}  ", subsequent_indent=" " * 5)
        for code, text in MEANINGS[command].items())


def run(main: Callable[[], int], prog: str) -> int:
    """``main()``'s status; an ``EvalError`` prints ``prog: error: MESSAGE`` on stderr and gives
    its code. A ``SystemExit`` with a message (rather than a status) counts as usage (2); one with
    a status (argparse's 0 and 2) passes through. Any other exception prints its traceback and
    gives ``INTERNAL``."""
    try:
        return int(main())
    except EvalError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return int(e.code)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        print(f"{prog}: error: {e.code}", file=sys.stderr)
        return int(ExitCode.USAGE)
    except Exception:  # noqa: BLE001 (a bug: its traceback, and a status that says so)
        traceback.print_exc()
        print(f"{prog}: unexpected error (exit {int(ExitCode.INTERNAL)}): please report it with "
              "the traceback above", file=sys.stderr)
        return int(ExitCode.INTERNAL)
