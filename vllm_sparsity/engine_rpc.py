"""The API server's side of every RPC the plugin makes into the engine (the worker side is
``worker_rpc``): the ``/v1/sparsity`` routes and the metrics publisher call the workers only here.

Why no deadline reaches the engine. vLLM's multiprocess executor (the default of ``vllm serve``,
always on CPU) matches a worker's reply to a call by position in a first-in, first-out queue,
not by call id. If an executor-side deadline passes, the executor gives up on the call, but the
worker still answers it later, and that late reply is then read as the reply of the next call:
the next model step takes a snapshot dict for its output and the engine dies (under tensor
parallelism, every later reply of the late rank shifts by one). So ``_vllm_compat.collective_rpc``
passes no deadline to the engine, and the caller stops waiting on its own side: the engine core
client matches utility replies by call id, so a late reply resolves its own future, which nobody
awaits any more, and is dropped (or, for a caller that ``join``s, used when it comes).

Nothing stacks behind a late call: while a caller's late call is unanswered, that caller's next
call either joins it (the metrics poll: it waits for the late reply and uses it, instead of
queueing another call behind it) or is refused at once with ``WorkersBusy`` (the routes: HTTP
503). Calls that are not late run side by side as before. No call changes the engine's state
because it was late.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from vllm_sparsity import _vllm_compat

logger = logging.getLogger("vllm.vllm_sparsity")

# How long a caller waits for the workers' replies, in seconds, before it answers without them.
# A step of a long prefill, a compile or a starved core may take longer: the call is then late,
# not failed (see module doc).
WAIT_S = 10.0

_late: dict[tuple[int, str], asyncio.Future] = {}  # per (engine client, caller): a late call


class WorkersLate(TimeoutError):
    """The workers did not answer within the caller's wait; the call goes on in the engine."""


class WorkersBusy(RuntimeError):
    """The caller's previous call is still unanswered; no second one was sent."""


async def call(engine_client, method: str, args: tuple = (), *, caller: str,
               wait_s: float | None = None, join: bool = False) -> list[Any]:
    """``method`` (a ``worker_rpc`` method name) on every worker of every engine; one reply per
    worker, replicas concatenated in engine order (``_vllm_compat.collective_rpc``).

    Args:
        engine_client: vLLM's ``EngineClient`` (``AsyncLLM``) of this API server.
        method, args: the worker method and its arguments.
        caller: who calls (``"metrics"``, ``"route"``): what a late call holds back.
        wait_s: seconds to wait for the replies (> 0); None: ``WAIT_S``.
        join: while this caller's late call is unanswered, wait for that one (its replies,
            whatever method it was) instead of refusing; once it is answered, its replies are
            this call's (nothing is sent).

    Raises:
        WorkersLate: no reply within ``wait_s`` (the call stays in flight, as this caller's late
            call, until the workers answer it).
        WorkersBusy: ``join`` is False and this caller's late call is still unanswered.
        whatever the engine client raises (a dead engine, a worker error).
    """
    wait_s = WAIT_S if wait_s is None else wait_s
    key = (id(engine_client), caller)
    late = _late.pop(key, None)
    if late is not None and late.done() and join and not late.cancelled() \
            and late.exception() is None:
        return late.result()  # the late reply came between two calls: use it, send nothing
    if late is not None and not late.done():
        if not join:
            _late[key] = late
            raise WorkersBusy(f"the workers have not yet answered an earlier call, which was "
                              f"late (the engine is busy: a long step, a compile or a stuck "
                              f"worker); not sending {method} behind it")
        pending = late
    else:
        pending = asyncio.ensure_future(_vllm_compat.collective_rpc(engine_client, method, args))
        # A reply or error nobody awaits any more must not be logged as never retrieved.
        pending.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        return await asyncio.wait_for(asyncio.shield(pending), wait_s)
    except asyncio.TimeoutError:
        _late[key] = pending
        raise WorkersLate(f"the workers did not answer {method} within {wait_s:g} s (a long "
                          "step, a compile or a stuck worker); the call goes on in the engine "
                          "and its reply will be dropped") from None


def why(e: BaseException) -> str:
    """One line for a log or an HTTP answer: the exception's type and message."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
