"""The plugin's calls into the engine never carry a deadline the executor enforces, and a late
worker never stacks calls or changes the engine's state (``engine_rpc``, ``_vllm_compat``).

The served half, against a real ``vllm serve`` under vLLM's default multiprocess executor, is in
test_engine_safety.py."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
from pathlib import Path

import pytest
from test_control import FakeEngine, app_for, send

from vllm_sparsity import _vllm_compat, engine_rpc

REPO = Path(__file__).resolve().parents[1]


def engine_calls(tree: ast.AST):
    """Every call of ``collective_rpc`` or ``call_utility*`` in a module's syntax tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            owner = getattr(node.func, "value", None)
            if isinstance(owner, ast.Name) and owner.id == "_vllm_compat":
                continue  # the plugin's adapter: it takes no deadline (checked below)
            if name == "collective_rpc" or name.startswith("call_utility"):
                yield name, node


def deadline_of(name: str, call: ast.Call) -> ast.expr | None:
    """The executor timeout a call passes: keyword ``timeout``, or the positional slot of
    ``collective_rpc(method, timeout, ...)`` and ``call_utility*("collective_rpc", method,
    timeout, ...)``; None when it passes none."""
    for kw in call.keywords:
        if kw.arg == "timeout":
            return kw.value
    slot = 1 if name == "collective_rpc" else 2
    args = call.args
    if name != "collective_rpc" and not (args and isinstance(args[0], ast.Constant)
                                         and args[0].value == "collective_rpc"):
        return None  # another utility: no executor call
    return args[slot] if len(args) > slot else None


def test_no_call_into_the_engine_passes_a_deadline_to_the_executor():
    """Reads every call site in the installed packages (runtime, kernels, eval): a deadline is
    absent or the literal None."""
    sites = []
    for folder in ("vllm_sparsity", "kernels", "eval"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for name, call in engine_calls(ast.parse(path.read_text(), str(path))):
                deadline = deadline_of(name, call)
                sites.append((path.relative_to(REPO), call.lineno))
                assert deadline is None or (isinstance(deadline, ast.Constant)
                                            and deadline.value is None), \
                    f"{path.relative_to(REPO)}:{call.lineno} passes a deadline to the executor"
    assert any(str(p) == "vllm_sparsity/_vllm_compat.py" for p, _ in sites), sites
    assert list(inspect.signature(_vllm_compat.collective_rpc).parameters) == \
        ["engine_client", "method", "args"]


def test_the_call_site_reader_finds_a_deadline():
    """The reader above, on the code it must refuse (the shape of the old adapter)."""
    bad = ast.parse("core.call_utility_all_async('collective_rpc', m, timeout_s, args, None)\n"
                    "engine.collective_rpc(m, timeout=10.0, args=args)\n"
                    "executor.collective_rpc(m, 5)\n")
    found = [deadline_of(name, call) for name, call in engine_calls(bad)]
    assert len(found) == 3 and all(d is not None for d in found)


class Recorder:
    """An engine client that records what reaches the engine; replies after ``delay_s``."""

    def __init__(self, data_parallel: bool, delay_s: float = 0.0):
        self.calls, self.delay_s = [], delay_s
        if data_parallel:
            recorder = self

            class Core:
                async def call_utility_all_async(self, utility, method, timeout, args, kwargs):
                    recorder.calls.append((method, timeout, args))
                    await asyncio.sleep(recorder.delay_s)
                    return [[f"{method} e0w0", f"{method} e0w1"], [f"{method} e1w0"]]

            self.engine_core = Core()

    async def collective_rpc(self, method, timeout=None, args=()):
        self.calls.append((method, timeout, args))
        await asyncio.sleep(self.delay_s)
        return [f"{method} w0"]


@pytest.mark.parametrize("data_parallel", [False, True])
def test_the_adapter_asks_every_engine_with_no_deadline(data_parallel):
    engine = Recorder(data_parallel)
    replies = asyncio.run(_vllm_compat.collective_rpc(engine, "m", (1, 2)))
    assert engine.calls == [("m", None, (1, 2))]
    assert replies == (["m e0w0", "m e0w1", "m e1w0"] if data_parallel else ["m w0"])


def test_a_late_call_is_never_stacked_upon_and_its_reply_reaches_a_joining_caller():
    async def run():
        engine = Recorder(data_parallel=False, delay_s=0.3)
        with pytest.raises(engine_rpc.WorkersLate, match="did not answer a within 0.05 s"):
            await engine_rpc.call(engine, "a", caller="route", wait_s=0.05)
        # The same caller: refused while the late call is out, nothing sent.
        with pytest.raises(engine_rpc.WorkersBusy, match="not sending b"):
            await engine_rpc.call(engine, "b", caller="route", wait_s=0.05)
        # Another caller is not held back by it.
        other = asyncio.ensure_future(engine_rpc.call(engine, "c", caller="metrics", wait_s=1))
        # Joining: the late call's own reply, no new call.
        assert await engine_rpc.call(engine, "b", caller="route", wait_s=1, join=True) == ["a w0"]
        assert await other == ["c w0"]
        assert [m for m, _, _ in engine.calls] == ["a", "c"]
        # A late reply that comes between two calls of a joining caller is its next reply.
        with pytest.raises(engine_rpc.WorkersLate):
            await engine_rpc.call(engine, "e", caller="metrics", wait_s=0.05)
        await asyncio.sleep(0.4)
        assert await engine_rpc.call(engine, "f", caller="metrics", wait_s=1, join=True) == \
            ["e w0"]
        assert [m for m, _, _ in engine.calls] == ["a", "c", "e"]
        # Answered: the caller's next call goes out as usual.
        engine.delay_s = 0
        assert await engine_rpc.call(engine, "d", caller="route", wait_s=1) == ["d w0"]
        assert [m for m, _, _ in engine.calls] == ["a", "c", "e", "d"]

    asyncio.run(run())


class SlowEngine(FakeEngine):
    """test_control's fake engine (real worker methods over real RuntimeStates) whose workers
    take ``slow[method]`` seconds to answer, as a long model step would make them."""

    def __init__(self, slow: dict[str, float], **kw):
        super().__init__(**kw)
        self.slow = slow

    async def collective_rpc(self, method, timeout=None, args=()):
        assert timeout is None
        paused = self.paused  # the engine core runs calls in order: this one before a resume
        await asyncio.sleep(self.slow.get(method, 0))
        self.paused, now = paused, self.paused
        try:
            return await super().collective_rpc(method, timeout, args)
        finally:
            self.paused = now


def test_late_workers_make_the_route_answer_503_and_a_late_change_still_applies(monkeypatch):
    monkeypatch.setattr(engine_rpc, "WAIT_S", 0.2)

    engine = SlowEngine({"vllm_sparsity_set": 0.5})
    app = app_for(engine)

    async def run():
        (reply,) = await send(app, ("POST", json.dumps({"p": 0.5}), {}))
        assert reply.status_code == 503, reply.text
        assert "did not confirm p=0.5, target=all_inputs within 0.2 s" in reply.json()["error"]
        # The reply went out before the workers answered; the engine was resumed after the set
        # was queued (the engine core runs utility calls in order), and the set applies.
        assert engine.log[-1] == "resume"
        (busy,) = await send(app, ("GET", "", {}))
        assert busy.status_code == 503 and "not sending" in busy.json()["error"]
        await asyncio.sleep(0.5)
        assert {s.settings()["p"] for s in engine.states} == {0.5}
        (state,) = await send(app, ("GET", "", {}))
        assert state.status_code == 200 and state.json()["p"] == 0.5

        engine.slow = {"vllm_sparsity_snapshot": 0.5}
        (late,) = await send(app, ("GET", "", {}))
        assert late.status_code == 503
        assert "did not answer vllm_sparsity_snapshot within 0.2 s" in late.json()["error"]

    asyncio.run(run())
