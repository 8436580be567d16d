"""Runtime control of p and target, and the activation counters, across vLLM's processes.

The model runs in worker processes; HTTP arrives at the API server. As vLLM's endpoint-plugin
contract prescribes (``vllm/plugins/endpoint_plugins/interface.py``), the general plugin installs
worker-side RPC methods (``worker_rpc.WORKER_METHODS``, installed by ``plugin.py``) and the endpoint plugin
(entry point ``vllm.endpoint_plugins: sparsity``) reaches them through the engine client
(``engine_rpc.call``: every worker of every engine; no deadline inside the engine, the route
waits ``engine_rpc.WAIT_S`` and answers 503 when the workers are late).

Routes (opt-in: start the server with ``VLLM_PLUGINS=sparsity``; under ``/v1`` so that vLLM's
``--api-key`` check guards them):

- ``GET /v1/sparsity``: ``{"p", "target", "backend", "rule", "q", "targets", ...}`` plus
  ``"layers"``: per layer
  and site, the monotonic counters ``zeroed`` and ``total`` (activations since start-up), merged
  over the workers as ``/metrics`` merges them (``counters.merge``); and ``"experts"``: per
  fused-MoE layer and site, the same counters per routed expert (lists indexed by expert id;
  empty without routed experts); and ``"serving"``: the model, dtype, device and vLLM and plugin
  versions the server runs (``versions.serving``).
- ``POST /v1/sparsity`` with ``Content-Type: application/json`` and a body such as
  ``{"p": 0.8, "target": "intermediate"}`` or ``{"p": {"input": 0.9, "intermediate": 0.8}}``
  (any key may be left out; at most ``MAX_BODY_BYTES``). ``rule`` and ``q`` are accepted when they
  repeat the server's: the rule is part of the compiled graph (vLLM compiles the model once and
  drops torch.compile's guards; CUDA graphs replay it), so changing it needs a restart, and the
  route answers 400 saying so (naming the kernel backend when one serves the model: its kernels
  run top-p only).
- ``POST /v1/sparsity/analysis`` with ``{"tokens": N, "rank_batch": B}`` arms the analyses in
  every worker (``analysis``: at most N activation rows per layer and site for the effective rank,
  computed per batch of B rows; Jaccard of the kept sets across batch-1 decode steps); 409 unless
  the server runs eagerly (``--enforce-eager``) without tensor parallelism. ``GET
  /v1/sparsity/analysis`` disarms them and answers per layer and site (``analysis.merge``); 409
  when nothing is armed.

Semantics of a POST: **a change applies to the requests admitted after it**. The route pauses the
engine (``EngineClient.pause_generation(mode="wait", clear_cache=True)``, vLLM's
``EngineCoreProc.pause_scheduler``): the requests in flight run to their end at the p they started
with, requests arriving meanwhile wait in the queue, and once the engine is idle vLLM clears the
KV and prefix caches (it raises if it cannot). The route then confirms the prefix cache is empty
(``reset_prefix_cache()`` returns True on an idle engine), sets p and target on every worker,
checks that every worker took them, and resumes generation, in that order, under one lock, so
concurrent POSTs are applied one after the other and each reply shows its own change. No prompt is
ever served from KV computed at another p. One exception, from vLLM's scheduler: a request that was
preempted for lack of KV space before the change holds no KV and waits in the queue like a new one;
it is recomputed at the new p, so its tokens from before the preemption came from the old p and the
rest from the new one.

What a POST costs: it returns once the slowest request in flight has finished (new requests wait as
long), and the prefix cache starts empty. If the requests in flight do not finish within
``VLLM_SPARSITY_DRAIN_TIMEOUT_S`` (default 60 s), it resumes the engine, changes nothing and answers
503. Errors: 400 bad value (the message names the field and the allowed values), 409 sparsity off
or the engine paused by someone else, 413 body too large, 415 not ``application/json``, 500 the
engine could not confirm an empty prefix cache or a worker did not take the change, 503 drain
timeout or workers that did not answer within ``engine_rpc.WAIT_S`` (a late change still applies
before generation resumes; GET shows it). The server keeps serving after every one of them.

The lock is per API server process: with ``--api-server-count`` > 1 send changes to one of them.
"""

# No `from __future__ import annotations` here: FastAPI reads the route handlers' annotations
# (``request: Request``) at runtime.
import asyncio
import json
import logging
from typing import Any

from vllm_sparsity import analysis, counters, engine_rpc, versions
from vllm_sparsity import config as cfg
from vllm_sparsity.config import (RULES, SparsityConfigError, parse_p_sites, parse_q,
                                  parse_target, quote)

logger = logging.getLogger("vllm.vllm_sparsity")

MAX_BODY_BYTES = 4096  # a valid body is under 60 bytes
# The workers compute the analyses off their model thread (``analysis.fetch``): seconds to minutes
# of eigenproblems on a CPU. The route asks every ANALYSIS_POLL_S whether they are done, and gives
# up (503, the results stay in the workers for the next GET) after ANALYSIS_WAIT_S.
ANALYSIS_POLL_S = 0.5
ANALYSIS_WAIT_S = 900.0
BODY_KEYS = ("p", "target", "rule", "q")

# ---------------------------------------------------------------- API server side


class RouteError(Exception):
    """An answer other than 200: HTTP ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _workers(engine, method: str, args: tuple = ()) -> list[Any]:
    """``method`` on every worker (``engine_rpc.call``, caller ``"route"``). RouteError 503 when
    the workers answer late, or an earlier route call is still unanswered: the engine goes on
    serving, and a retry later gets an answer."""
    try:
        return await engine_rpc.call(engine, method, args, caller="route")
    except (engine_rpc.WorkersLate, engine_rpc.WorkersBusy) as e:
        raise RouteError(503, f"{e}; the engine goes on serving, retry later") from None


async def _state(engine) -> dict[str, Any]:
    """The route's answer: the settings and per-layer counters of all workers, merged (plus
    whatever ``counters.merge`` reports of disagreeing workers). RouteError 409 when off, 503
    when the workers answer late."""
    merged = counters.merge(await _workers(engine, "vllm_sparsity_snapshot"))
    if merged is None:
        raise RouteError(409, "sparsity is off: start the server with --sparsity-p to enable "
                         "runtime control")
    return {**merged["settings"], "unknown_phase_tokens": merged["unknown_phase_tokens"],
            "layers": counters.route_layers(merged), "request_p": merged["request_p"],
            "experts": counters.route_experts(merged),
            "serving": versions.serving(getattr(engine, "model_config", None))}


async def arm_analysis(engine, tokens: int, rank_batch: int) -> dict[str, Any]:
    """``POST /v1/sparsity/analysis``: arm every worker (``analysis.arm``). RouteError 409 when
    sparsity is off or a worker cannot record (the message says why; none stays armed)."""
    replies = await _workers(engine, "vllm_sparsity_analysis_arm", (tokens, rank_batch))
    if not any(replies):
        raise RouteError(409, "sparsity is off: start the server with --sparsity-p to analyse")
    errors = [r["error"] for r in replies if r and "error" in r]
    if errors:
        await _workers(engine, "vllm_sparsity_analysis_disarm")
        raise RouteError(409, errors[0])
    return {"armed": True, "tokens": tokens, "rank_batch": rank_batch,
            "sites": sum(r["sites"] for r in replies if r)}


async def fetch_analysis(engine, poll_s: float = ANALYSIS_POLL_S,
                         wait_s: float = ANALYSIS_WAIT_S) -> dict[str, Any]:
    """``GET /v1/sparsity/analysis``: disarm every worker and answer their merged analyses
    (``analysis.merge``). Each worker computes its results in a thread of its own
    (``analysis.fetch``): the route asks again every ``poll_s`` seconds, each call a quick one,
    until every worker has answered. RouteError 409 when nothing is armed, 503 past ``wait_s``
    seconds (the workers keep computing; a later GET collects the results)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    results: list[Any] = []
    pending: list[int] | None = None  # workers still computing (None: not asked yet)
    while True:
        replies = await _workers(engine, "vllm_sparsity_analysis_fetch")
        if pending is None:
            results, pending = list(replies), list(range(len(replies)))
        for i in pending:  # a worker that answered once has forgotten its results: keep them
            results[i] = replies[i]
        pending = [i for i in pending if analysis.is_pending(replies[i])]
        if not pending:
            break
        if asyncio.get_running_loop().time() > deadline:
            raise RouteError(503, f"the workers are still computing the analyses after "
                             f"{wait_s:g} s; GET again later to collect them")
        await asyncio.sleep(poll_s)
    try:
        return analysis.merge(results)
    except ValueError as e:
        raise RouteError(409, str(e)) from None


async def read_json_body(request) -> Any:
    """The request's JSON body. RouteError 415 unless ``Content-Type`` is ``application/json``
    (as vLLM's own routes demand, ``validate_json_request``: a browser cannot send that
    cross-site without a CORS preflight, which vLLM refuses unless ``--allowed-origins`` allows
    it), 413 past ``MAX_BODY_BYTES`` (not read further), 400 when it is not JSON (bad UTF-8,
    syntax, nesting too deep for the parser)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise RouteError(415, "Content-Type must be application/json, got "
                         + quote(request.headers.get("content-type")))
    too_large = RouteError(413, f"body must be at most {MAX_BODY_BYTES} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise too_large
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError included
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
        raise RouteError(400, f"body must be a JSON object ({reason}), got {quote(raw)}") from None


def validate(body: Any) -> tuple[float | dict | None, str | None, str | None, float | None]:
    """``(p, target, rule, q)`` from a parsed POST body, None for a key left out; p is a float or
    a dict {site: p}, target canonical (``config.parse_target``). Raises SparsityConfigError
    naming the field and the allowed values (quoting at most ``config.QUOTE_CHARS`` characters
    of a bad value). Whether they fit the server (its sites, its rule) is ``change``'s check."""
    usage = (f'body must be a JSON object with "p" (a number in {cfg.P_RANGE} or {{site: p}}) '
             'and/or "target" ("rule" and "q" may repeat the server\'s)')
    if not isinstance(body, dict) or not body:
        raise SparsityConfigError(f"{usage}; got {quote(body)}")
    unknown = sorted(set(body) - set(BODY_KEYS))
    if unknown:
        raise SparsityConfigError(f"{usage}; unknown key(s) {quote(unknown)}")
    # A key given as null is an error, not "unchanged": leave the key out for that.
    # Any rule's keep-everything p passes here (max-p: 0); ``change`` checks it against the rule.
    p = parse_p_sites(body["p"], "p", strings=False, rule_name=None) if "p" in body else None
    target = parse_target(body["target"], "target") if "target" in body else None
    rule = body.get("rule")
    if "rule" in body and rule not in RULES:
        raise SparsityConfigError(f"rule must be one of {', '.join(RULES)}; got {quote(rule)}")
    q = parse_q(body["q"], "q", strings=False) if "q" in body else None
    return p, target, rule, q


async def change(engine, p: float | dict | None, target: str | None, drain_timeout_s: float,
                 rule: str | None = None, q: float | None = None) -> dict[str, Any]:
    """Apply a validated change with the semantics of the module doc; returns the route's answer
    (``_state``) after it. Call it under the route's lock. Raises RouteError (nothing changed,
    unless the message says which workers did) and resumes generation whatever happens once it
    has paused it. ``rule``/``q``: accepted when they repeat the server's (see module doc)."""
    before = await _state(engine)
    _check_rule(before, rule, q)
    if target is not None and not set(cfg.sites.sites_of(target)) <= set(before["sites"]):
        raise RouteError(400, f"target must name installed sites ({', '.join(before['sites'])}) "
                         f"on this server (started with --sparsity-target "
                         f"{before['started_target']}; start with all_inputs to switch "
                         f"freely); got {quote(target)}")
    try:  # p and target together (a per-site p names exactly the target's sites)
        wanted = cfg.SparsityConfig(**{k: before[k] for k in cfg.FIELDS}).with_changes(
            p=p, target=target)
    except SparsityConfigError as e:
        raise RouteError(400, str(e)) from None
    if await engine.is_paused():
        raise RouteError(409, "the engine is paused by another caller (e.g. a weight update); "
                         "try again once it resumes")
    # Shielded: a timeout must not cancel the engine's pause half-way (see _resume).
    pause = asyncio.ensure_future(engine.pause_generation(mode="wait", clear_cache=True))
    try:
        await asyncio.wait_for(asyncio.shield(pause), drain_timeout_s)
    except BaseException as e:  # the drain timed out, the engine failed, or we were cancelled
        await _resume(engine, pause)
        if isinstance(e, asyncio.TimeoutError):
            raise RouteError(503, f"the requests in flight did not finish within "
                             f"{drain_timeout_s:g} s ({cfg.DRAIN_TIMEOUT_ENV}); nothing changed, "
                             "generation resumed") from None
        if isinstance(e, Exception):
            raise RouteError(500, f"the engine could not pause and clear its caches ({engine_rpc.why(e)}); "
                             "nothing changed, generation resumed") from None
        raise
    try:
        if not await engine.reset_prefix_cache():
            raise RouteError(500, "the engine could not confirm an empty prefix cache; nothing "
                             "changed, generation resumed")
        want_p, want_target = wanted.p, wanted.target
        asked = f"p={cfg.describe_p(want_p)}, target={want_target}"
        try:
            replies = await engine_rpc.call(engine, "vllm_sparsity_set", (p, target),
                                            caller="route")
        except engine_rpc.WorkersLate:
            # Still queued in the engine ahead of the resume below: it applies before any new
            # request runs, and the late reply is dropped.
            raise RouteError(503, f"the workers did not confirm {asked} within "
                             f"{engine_rpc.WAIT_S:g} s; the change is still being applied "
                             "before generation resumes: GET /v1/sparsity shows the state"
                             ) from None
        except Exception as e:  # a worker failed: some may have taken the change
            raise RouteError(500, f"setting {asked} on the workers failed ({engine_rpc.why(e)}); GET "
                             "/v1/sparsity shows the state, POST again to retry") from None
        wrong = [rank for rank, r in enumerate(replies)
                 if not r or (r["p"], r["target"]) != (want_p, want_target)]
        if wrong or not replies:
            raise RouteError(500, f"workers {wrong} did not take {asked}; GET /v1/sparsity shows "
                             "the state, POST again to retry")
        return await _state(engine)
    finally:
        await _resume(engine, pause)


def _check_rule(before: dict[str, Any], rule: str | None, q: float | None) -> None:
    """RouteError 400 when ``rule``/``q`` differ from the server's: the rule is fixed at start-up
    (module doc), and a kernel backend runs top-p only."""
    want_rule = before["rule"] if rule is None else rule
    want_q = before["q"] if q is None and want_rule == before["rule"] else q
    try:
        cfg.check_together(1.0, "input", "auto", want_rule, want_q, lambda field: field)
    except SparsityConfigError as e:
        raise RouteError(400, str(e)) from None
    if (want_rule, want_q) == (before["rule"], before["q"]):
        return
    asked = want_rule + (f" (q={want_q:g})" if want_q is not None else "")
    kernels = sorted(set(before["resolved_backend"].split("+")) & set(cfg.backends.TOP_P_ONLY))
    why = (f"the {', '.join(kernels)} backend serving this model implements the top-p rule "
           f"only, and " if kernels and want_rule != "top-p" else "")
    raise RouteError(400, f"rule cannot change at runtime: {why}the rule is compiled into the "
                     f"model's graph; restart with --sparsity-rule {want_rule} to run {asked} "
                     f"(this server runs {before['rule']})")


async def _resume(engine, pause: asyncio.Future) -> None:
    """Resume generation. A data-parallel engine refuses while its pause is still pending
    (``DPEngineCoreProc.resume_scheduler``): then resume as soon as the pause completes."""
    pause.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
    try:
        await engine.resume_generation()
    except Exception as e:
        if pause.done():
            raise RouteError(500, f"generation could not be resumed ({engine_rpc.why(e)})") from None
        logger.warning("vllm-sparsity: resume refused while the pause is pending (%s); resuming "
                       "once it completes", e)
        pause.add_done_callback(lambda _: asyncio.ensure_future(engine.resume_generation()))


class SparsityEndpoint:
    """``vllm.endpoint_plugins`` factory: the ``/v1/sparsity`` routes (see module doc)."""

    name = "sparsity"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.engine = None
        self.drain_timeout_s = cfg.DEFAULT_DRAIN_TIMEOUT_S
        self.lock = asyncio.Lock()  # one change at a time (binds to the server's loop on first use)

    def attach_router(self, app) -> None:
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse

        router = APIRouter()

        async def answer(work) -> JSONResponse:
            try:
                return JSONResponse(await work)
            except RouteError as e:
                return JSONResponse({"error": e.message}, status_code=e.status)

        @router.get("/v1/sparsity")
        async def get_sparsity(request: Request):
            return await answer(_state(self.engine))

        @router.post("/v1/sparsity")
        async def set_sparsity(request: Request):
            return await answer(self._post(request))

        @router.post("/v1/sparsity/analysis")
        async def arm(request: Request):
            return await answer(self._arm(request))

        @router.get("/v1/sparsity/analysis")
        async def fetch(request: Request):
            return await answer(self._locked(fetch_analysis(self.engine)))

        app.include_router(router)

    async def _post(self, request) -> dict[str, Any]:
        try:
            p, target, rule, q = validate(await read_json_body(request))
        except SparsityConfigError as e:
            raise RouteError(400, str(e)) from None
        async with self.lock:
            return await change(self.engine, p, target, self.drain_timeout_s, rule, q)

    async def _arm(self, request) -> dict[str, Any]:
        try:
            tokens, rank_batch = analysis.check_arm_body(await read_json_body(request))
        except ValueError as e:
            raise RouteError(400, str(e)) from None
        return await self._locked(arm_analysis(self.engine, tokens, rank_batch))

    async def _locked(self, work) -> dict[str, Any]:
        async with self.lock:  # never beside a change of p: a point's recording is one setting
            return await work

    async def init_state(self, engine_client, state, args) -> None:
        self.engine = engine_client
        self.drain_timeout_s = cfg.drain_timeout_s()
