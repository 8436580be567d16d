"""Runtime control of p and target, and the activation counters, across vLLM's processes.

The model runs in worker processes; HTTP arrives at the API server. As vLLM's endpoint-plugin
contract prescribes (``vllm/plugins/endpoint_plugins/interface.py``), the general plugin installs
worker-side RPC methods (``WORKER_METHODS``, on ``WorkerWrapperBase``) and the endpoint plugin
(entry point ``vllm.endpoint_plugins: sparsity``) reaches them with ``EngineClient.collective_rpc``,
which the engine core runs between two steps, so a change applies to every worker before the next
step.

Routes (opt-in: start the server with ``VLLM_PLUGINS=sparsity``; under ``/v1`` so that vLLM's
``--api-key`` check guards them):

- ``GET /v1/sparsity``: ``{"p", "target", "backend", "targets"}`` plus ``"layers"``: per layer and
  site, the monotonic counters ``zeroed`` and ``total`` (activations since start-up);
- ``POST /v1/sparsity`` with ``{"p": 0.8, "target": "intermediate"}`` (either key may be left
  out): sets them, clears the prefix cache (cached KV was computed under the old p) and answers as
  GET. Bad values get HTTP 400 with a message; the server keeps serving.
"""

# No `from __future__ import annotations` here: FastAPI reads the route handlers' annotations
# (``request: Request``) at runtime.
from typing import Any

import torch

from vllm_sparsity.config import SparsityConfigError, parse_p

# ---------------------------------------------------------------- worker side


def _model(worker_wrapper) -> torch.nn.Module:
    model = worker_wrapper.worker.model_runner.get_model()
    return model.unwrap() if hasattr(model, "unwrap") else model  # CUDA graph wrapper


def vllm_sparsity_state(self) -> dict[str, Any] | None:
    """This worker's settings and counters (None when the plugin is off)."""
    from vllm_sparsity.replace import runtime_state

    model = _model(self)
    state = runtime_state(model)
    return None if state is None else state.describe(model)


def vllm_sparsity_set(self, p: float | None, target: str | None) -> None:
    """Set p and/or target in this worker (values already validated by the caller)."""
    from vllm_sparsity.replace import runtime_state

    state = runtime_state(_model(self))
    if state is not None:
        state.set(p=p, target=target)


def vllm_sparsity_metrics(self) -> dict[str, Any] | None:
    """This worker's metric counters (``vllm_sparsity.metrics.snapshot``), None when sparsity or
    its metrics are off. Polled by the API server's metrics publisher."""
    from vllm_sparsity import _vllm_compat, metrics
    from vllm_sparsity.replace import runtime_state

    state = runtime_state(_model(self))
    if state is None or not state.metrics:
        return None
    return metrics.snapshot(state, _vllm_compat.tp_rank())


WORKER_METHODS = {f.__name__: f for f in (vllm_sparsity_state, vllm_sparsity_set,
                                          vllm_sparsity_metrics)}


# ---------------------------------------------------------------- API server side


def _merge(per_worker: list[dict | None]) -> dict[str, Any] | None:
    """One view of all workers: settings from the first, one row per (layer, site). Pipeline
    ranks hold different layers. Tensor-parallel ranks see the same replicated gate_up_proj input,
    so the first worker reporting it speaks for it; a split input (down_proj's under TP, a shard
    of K per rank) has its counts summed over the ranks."""
    states = [s for s in per_worker if s is not None]
    if not states:
        return None
    merged = {k: v for k, v in states[0].items() if k != "layers"}
    rows: dict[tuple, dict] = {}
    for state in states:
        for row in state["layers"]:
            key = (row["layer"], row["site"])
            if key not in rows:
                rows[key] = dict(row)
            elif row.get("split"):
                rows[key]["zeroed"] += row["zeroed"]
                rows[key]["total"] += row["total"]
    merged["layers"] = [rows[k] for k in sorted(rows)]
    return merged


class SparsityEndpoint:
    """``vllm.endpoint_plugins`` factory: the ``/v1/sparsity`` routes (see module doc)."""

    name = "sparsity"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse

        router = APIRouter()

        async def current(engine) -> JSONResponse:
            state = _merge(await engine.collective_rpc("vllm_sparsity_state"))
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
            state = _merge(await engine.collective_rpc("vllm_sparsity_state"))
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
            f"(input, intermediate, all_inputs); got {body!r}")
    if isinstance(body.get("p"), str):
        raise SparsityConfigError(f"p must be a number in (0, 1], got {body['p']!r}")
    p = parse_p(body["p"], "p") if body.get("p") is not None else None
    target = body.get("target")
    if target is not None and not isinstance(target, str):
        raise SparsityConfigError(f"target must be a string; got {target!r}")
    return p, target
