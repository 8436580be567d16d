"""Every shell command the docs show runs as written, at least to argument parsing; no command is
executed and no engine starts.

From each fenced code block of ``DOCS`` (backslash continuations joined; ``$(...)`` checked as
commands of their own, then read as one word; split at ``|``, ``&&``, ``||``, ``;``; leading
``VAR=value`` words dropped):

- ``vllm-sparsity ...``: the command's own argparse parsers parse the words (the top-level one,
  then the delegated subcommand's, ``tools/cli.py``); the subcommand is stopped right after its
  parser returns. Within one file, an ``eval check``/``eval baseline`` of ``DIR/results.json`` is
  also held to the ``eval sweep --out DIR`` shown before it: its ``--deployed-p`` is a point of
  that sweep's grid, and a committed ``--baseline`` was made for the sweep's tasks, limit and
  target (what ``eval check`` refuses otherwise);
- ``vllm serve MODEL ...``: the plugin's flags (``plugin._add_flags``) parse, and their values
  resolve (``config.resolve``, the check ``vllm serve`` makes at start-up);
- ``python -m MODULE`` / ``python FILE``: the module is importable / the file exists;
- ``make TARGET``: the Makefile has the target;
- ``curl URL``: the URL's path is a route of the plugin (``control.py``) or of vLLM's OpenAI
  server, and a ``-d`` body without shell variables is JSON.

A failure names the file and line of the command and what did not parse. Beside them: every
relative link of the docs leads to a file or folder, and eval/README.md links every folder of
committed results.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "eval/README.md", "kernels/bench/README.md", "eval/baselines/README.md",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "deploy").rglob("*.md"))]
# vLLM's OpenAI-compatible server's routes the docs may call (the plugin's come from control.py).
VLLM_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
               "/version", "/tokenize", "/detokenize"}
CHECKED = ("vllm-sparsity", "vllm", "python", "python3", "make", "curl")


def commands(doc: str) -> list[tuple[int, str]]:
    """(line, command) of every shell command in ``doc``'s fenced code blocks: continuation lines
    joined, comments kept (shlex drops them), ``$(...)`` extracted as commands of their own."""
    found, inside, pending, start = [], False, "", 0
    for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = number
        pending += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            text, pending = pending, ""
            for inner in re.findall(r"\$\(([^()]*)\)", text):
                found.append((start, inner))
            found.append((start, re.sub(r"\$\([^()]*\)", "SUBSTITUTED", text)))
    return found


def segments(command: str) -> list[list[str]]:
    """The simple commands of a shell line, as words, without leading ``VAR=value`` words."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    words, out = list(lexer), [[]]
    for word in words:
        if word in (";", "&&", "||", "|", "&"):
            out.append([])
        else:
            out[-1].append(word)
    result = []
    for seg in out:
        while seg and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", seg[0]):
            seg = seg[1:]
        if seg:
            result.append(seg)
    return result


class Parsed(BaseException):  # not an Exception: no handler of the command may catch it
    """Raised by the patched parser once the final parser of a command has parsed its words."""

    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


def parse_vllm_sparsity(argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run ``vllm-sparsity argv`` up to its last parser (``Parsed``); SystemExit on bad usage."""
    from vllm_sparsity.tools import cli

    original = argparse.ArgumentParser.parse_known_args
    depth = [0]

    def parse_known_args(self, args=None, namespace=None):
        depth[0] += 1
        try:
            ns, rest = original(self, args, namespace)
        finally:
            depth[0] -= 1
        if depth[0] or (self.prog == "vllm-sparsity" and ns.command in cli.DELEGATED):
            return ns, rest  # a subparser inside, or the top level handing over
        if rest:
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        raise Parsed(ns)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
        try:
            cli.main(argv)
        except Parsed as done:
            return done.namespace
    raise AssertionError(f"vllm-sparsity {' '.join(argv)}: ran past its parser")


def check_eval_workflow(ns: argparse.Namespace, sweeps: dict[str, argparse.Namespace]) -> str:
    """What an ``eval check``/``eval baseline`` of a sweep shown earlier would refuse, or ''."""
    from vllm_sparsity.eval import check
    from vllm_sparsity.eval.cli import parse_grid
    from vllm_sparsity.eval.grid import PAPER_GRIDS, ordered_grid

    if getattr(ns, "command", None) not in ("check", "baseline"):
        return ""
    sweep = sweeps.get(str(ns.results.parent))
    if sweep is None:
        return ""
    grid = ordered_grid(parse_grid(sweep.p_grid) if sweep.p_grid
                        else list(PAPER_GRIDS[sweep.rule]), sweep.rule)
    p = ns.deployed_p
    if p is not None and not any(check.same_p(g, p) for g in grid):
        return f"--deployed-p {p} is not a point of the sweep into {sweep.out} ({grid})"
    if ns.command == "check" and (ROOT / ns.baseline).exists():
        baseline = json.loads((ROOT / ns.baseline).read_text())
        settings = {"tasks": sweep.tasks, "limit": sweep.limit, "target": sweep.target}
        diff = [f"{k} {v!r} where the baseline has {baseline[k]!r}"
                for k, v in settings.items() if baseline[k] != v]
        if p is None and not any(check.same_p(g, baseline["deployed_p"]) for g in grid):
            diff.append(f"no point at the baseline's deployed p {baseline['deployed_p']}")
        return "; ".join(diff)
    return ""


def plugin_routes() -> set[str]:
    source = (ROOT / "vllm_sparsity" / "control.py").read_text()
    return set(re.findall(r"\"(/v1/sparsity[a-z/]*)\"", source))


def check_segment(words: list[str], monkeypatch, sweeps: dict) -> str:
    """'' when the command parses, else why not."""
    name = words[0]
    if name == "vllm-sparsity":
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                ns = parse_vllm_sparsity(words[1:], monkeypatch)
        except SystemExit as e:  # 0: --help printed; else argparse's usage error
            error = (stderr.getvalue().strip().splitlines() or [""])[-1]
            return "" if e.code == 0 else f"argument parsing exited with {e.code}: {error}"
        if getattr(ns, "command", None) == "sweep":
            sweeps[str(ns.out)] = ns
        return check_eval_workflow(ns, sweeps)
    if name == "vllm":
        if words[1:2] != ["serve"]:
            return ""  # another vLLM command, or its output quoted (`vllm serve: error: ...`)
        if len(words) < 3 or words[2].startswith("-"):
            return "expected `vllm serve MODEL [flags]`"
        from vllm_sparsity import config, plugin

        parser = argparse.ArgumentParser(prog="vllm serve", exit_on_error=False)
        plugin._add_flags(parser)
        try:
            args, _ = parser.parse_known_args(words[3:])
            config.resolve({f: getattr(args, f"sparsity_{f}") for f in config.FIELDS}, None, {})
        except (argparse.ArgumentError, config.SparsityConfigError) as e:
            return str(e)
        return ""
    if name in ("python", "python3"):
        if words[1:2] == ["-m"]:
            return "" if importlib.util.find_spec(words[2]) else f"no module {words[2]}"
        if words[1:2] == ["-c"]:
            return ""
        return "" if (ROOT / words[1]).is_file() else f"no file {words[1]}"
    if name == "make":
        makefile = (ROOT / "Makefile").read_text()
        missing = [t for t in words[1:] if not t.startswith("-") and "=" not in t
                   and not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
        return f"no Makefile target {', '.join(missing)}" if missing else ""
    if name == "curl":
        urls = [w for w in words[1:] if re.match(r"(https?://)?[\w.$-]+:\d+/", w)]
        if len(urls) != 1:
            return f"expected one URL, found {urls}"
        path = urlsplit(urls[0] if "://" in urls[0] else f"http://{urls[0]}").path
        if path not in plugin_routes() | VLLM_ROUTES:
            return f"no route {path}"
        for flag, body in zip(words, words[1:]):
            if flag in ("-d", "--data") and "$" not in body:
                try:
                    json.loads(body)
                except ValueError as e:
                    return f"-d is not JSON: {e}"
        return ""
    return ""


CASES = [(doc, line, command) for doc in DOCS for line, command in commands(doc)]


def test_the_docs_show_commands_of_every_kind():
    kinds = {seg[0] for _, _, c in CASES for seg in segments(c)}
    assert {"vllm-sparsity", "vllm", "make", "curl"} <= kinds, kinds


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_in_the_docs_parses(doc, monkeypatch):
    failures, sweeps = [], {}
    for line, command in commands(doc):
        for words in segments(command):
            if words[0] not in CHECKED:
                continue
            why = check_segment(words, monkeypatch, sweeps)
            if why:
                failures.append(f"{doc}:{line}: `{shlex.join(words)}`: {why}")
    assert not failures, "commands in the docs that do not run as written:\n" + "\n".join(
        failures)


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_in_the_docs_exists(doc):
    text = (ROOT / doc).read_text()
    missing = [f"{doc}:{text[:m.start()].count(chr(10)) + 1}: {m.group(1)}"
               for m in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
               if "://" not in m.group(1) and not m.group(1).startswith("mailto:")
               and not ((ROOT / doc).parent / m.group(1)).exists()]
    assert not missing, "links to nothing:\n" + "\n".join(missing)


def test_every_results_folder_is_linked_from_the_eval_readme():
    """Each folder of committed results (``*/results/<folder>``, ``tests/results``) has a row in
    eval/README.md's Committed results, linked."""
    readme = (ROOT / "eval" / "README.md").read_text()
    folders = [p for pattern in ("eval/results/*", "kernels/bench/results/*") for p in
               sorted(ROOT.glob(pattern)) if p.is_dir()] + [ROOT / "tests" / "results"]
    eval_dir = ROOT / "eval"
    unlinked = [str(f.relative_to(ROOT)) for f in folders
                if f"]({Path(os.path.relpath(f, eval_dir)).as_posix()}/)" not in readme]
    assert folders and not unlinked, f"results folders eval/README.md does not link: {unlinked}"


def test_the_deploy_files_serve_commands_parse(monkeypatch):
    """The ``vllm serve`` arguments of deploy/compose.yaml (vLLM's image: the command's items are
    ``vllm serve``'s arguments) and deploy/k8s/deployment.yaml pass the plugin's flag parsing."""
    import yaml

    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    k8s = next(d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml")
                                             .read_text()) if d and d.get("kind") == "Deployment")
    container = k8s["spec"]["template"]["spec"]["containers"][0]
    served = {"deploy/compose.yaml": ["vllm", "serve", "MODEL", *compose["services"]["vllm"]
                                      ["command"]],
              "deploy/k8s/deployment.yaml": [*container["command"], *container["args"]]}
    failures = [f"{name}: {why}" for name, words in served.items()
                if (why := check_segment(words, monkeypatch, {}))]
    assert not failures and all(any(w.startswith("--sparsity-p") for w in words)
                                for words in served.values()), failures
