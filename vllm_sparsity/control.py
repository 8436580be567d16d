"""Runtime control of p and target, and the activation counters, across vLLM's processes.

The model runs in worker processes; HTTP arrives at the API server. As vLLM's endpoint-plugin
contract prescribes (``vllm/plugins/endpoint_plugins/interface.py``), the general plugin installs
worker-side RPC methods (``WORKER_METHODS``, installed by ``plugin.py``) and the endpoint plugin
(entry point ``vllm.endpoint_plugins: sparsity``) reaches them with ``EngineClient.collective_rpc``,
which the engine core runs between two steps, so a change applies to every worker before the next
step.

Routes (opt-in: start the server with ``VLLM_PLUGINS=sparsity``; under ``/v1`` so that vLLM's
``--api-key`` check guards them):

- ``GET /v1/sparsity``: ``{"p", "target", "backend", "targets"}`` plus ``"layers"``: per layer and
  site, the monotonic counters ``zeroed`` and ``total`` (activations since start-up), merged over
  the workers as ``/metrics`` merges them (``counters.merge``);
- ``POST /v1/sparsity`` with ``{"p": 0.8, "target": "intermediate"}`` (either key may be left
  out): sets them, clears the prefix cache (cached KV was computed under the old p) and answers as
  GET. Bad values get HTTP 400 with a message; the server keeps serving.
"""

# No `from __future__ import annotations` here: FastAPI reads the route handlers' annotations
# (``request: Request``) at runtime.
from typing import Any

from vllm_sparsity import _vllm_compat, counters
from vllm_sparsity.clock import CLOCK
from vllm_sparsity.config import TARGETS, SparsityConfigError, parse_p
from vllm_sparsity.state import runtime_state

# ---------------------------------------------------------------- worker side


def vllm_sparsity_snapshot(self) -> dict[str, Any] | None:
    """This worker's settings and counters (``counters.snapshot``), None when the plugin is off.
    Read by the route and polled by the API server's metrics publisher."""
    state = runtime_state(_vllm_compat.worker_model(self))
    if state is None:
        return None
    return counters.snapshot(state, _vllm_compat.tp_rank(),
                             CLOCK.snapshot() if state.clock else None)


def vllm_sparsity_set(self, p: float | None, target: str | None) -> None:
    """Set p and/or target in this worker (values already validated by the caller)."""
    state = runtime_state(_vllm_compat.worker_model(self))
    if state is not None:
        state.set(p=p, target=target)


WORKER_METHODS = {f.__name__: f for f in (vllm_sparsity_snapshot, vllm_sparsity_set)}


# ---------------------------------------------------------------- API server side


async def _state(engine) -> dict[str, Any] | None:
    """The route's answer: the settings and per-layer counters of all workers, merged."""
    merged = counters.merge(await engine.collective_rpc("vllm_sparsity_snapshot"))
    if merged is None:
        return None
    return {**merged["settings"], "layers": counters.route_layers(merged)}


class SparsityEndpoint:
    """``vllm.endpoint_plugins`` factory: the ``/v1/sparsity`` routes (see module doc)."""

    name = "sparsity"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse

        router = APIRouter()

        async def current(engine) -> JSONResponse:
            state = await _state(engine)
            if state is None:
                return JSONResponse({"error": "sparsity is off: start the server with "
                                     "--sparsity-p to enable runtime control"}, status_code=409)
            return JSONResponse(state)

        @router.get("/v1/sparsity")
        async def get_sparsity(request: Request):
            return await current(request.app.state.vllm_sparsity_engine)

        @router.post("/v1/sparsity")
        async def set_sparsity(request: Request):
            engine = request.app.state.vllm_sparsity_engine
            try:
                body = await request.json()
            except ValueError:
                body = None
            try:
                p, target = _validate(body)
            except SparsityConfigError as e:
                return JSONResponse({"error": str(e)}, status_code=400)
            state = await _state(engine)
            if state is None:
                return await current(engine)
            if target is not None and target not in state["targets"]:
                return JSONResponse({"error": (
                    f"target must be one of {', '.join(state['targets'])} on this server "
                    f"(started with --sparsity-target {state['started_target']}; start with "
                    "all_inputs to switch freely); got " + repr(target))}, status_code=400)
            await engine.collective_rpc("vllm_sparsity_set", args=(p, target))
            await engine.reset_prefix_cache()
            return await current(engine)

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        state.vllm_sparsity_engine = engine_client


def _validate(body: Any) -> tuple[float | None, str | None]:
    if not isinstance(body, dict) or not body or set(body) - {"p", "target"}:
        raise SparsityConfigError(
            'body must be a JSON object with "p" (a number in (0, 1]) and/or "target" '
            f"({', '.join(TARGETS)}); got {body!r}")
    p = parse_p(body["p"], "p", strings=False) if body.get("p") is not None else None
    target = body.get("target")
    if target is not None and not isinstance(target, str):
        raise SparsityConfigError(f"target must be a string; got {target!r}")
    return p, target
