"""The ``vllm-sparsity`` command line: every subcommand's ``--help`` exits 0 with its own usage,
and bad usage exits 2 with the usage and a line naming what is wrong (argparse's contract)."""

from __future__ import annotations

import pytest

from vllm_sparsity.tools.cli import DELEGATED, main

COMMANDS = ["demo-model", "random-model", *DELEGATED]


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_exits_0_with_its_own_usage(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: vllm-sparsity {command}"), out[:200]


def test_top_level_help_lists_every_subcommand(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and out.startswith("usage: vllm-sparsity")
    assert all(command in out for command in COMMANDS)


@pytest.mark.parametrize("argv, says", [
    ((), "the following arguments are required: COMMAND"),
    (("no-such-command",), "invalid choice: 'no-such-command'"),
    (("random-model", "llama-9000"), "argument MODEL: invalid choice: 'llama-9000'"),
    (("demo-model", "extra"), "unrecognized arguments: extra"),
])
def test_bad_usage_exits_2_with_the_usage_and_the_reason(capsys, argv, says):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("usage: vllm-sparsity") and says in err, err


def test_eval_check_help_explains_results_and_baseline(capsys):
    code, out, _ = run(capsys, "eval", "check", "--help")
    assert code == 0
    assert "the results.json of the sweep to judge" in out
    assert "baseline JSON to judge against" in out and "exit status:" in out
    assert "  3  results and baseline made with different settings" in out
