"""The worker side of every RPC the plugin makes: methods installed on vLLM's worker wrapper
(``WorkerWrapperBase``, by ``plugin.py``) and called by name through ``collective_rpc``.

Callers: the engine core's executor around warm-up (``vllm_sparsity_bind_step`` before it,
``vllm_sparsity_start_counting`` after it, see ``plugin.py``); the API server's ``/v1/sparsity``
routes and metrics publisher (``engine_rpc``: snapshot, set, analysis arm/fetch). Each runs in the
worker's own thread between two model steps, so each must return quickly.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from vllm_sparsity import _vllm_compat, analysis, counters, request_p
from vllm_sparsity import config as cfg
from vllm_sparsity.clock import CLOCK
from vllm_sparsity.state import runtime_state

logger = logging.getLogger("vllm.vllm_sparsity")


def vllm_sparsity_bind_step(self) -> None:
    """Worker RPC, before warm-up: take token phases from this worker's model-runner buffer.

    Raises:
        RuntimeError: sparsity is configured and the model has gated MLPs or routed experts, but
            none was sparsified:
            its loader built it without ``BaseModelLoader.create_model`` (``--load-format
            tensorizer``, the weight-cache IPC loader ``ipc_cache``), which would serve it dense.
    """
    from vllm_sparsity.replace import find_gated_mlps, find_routed_experts

    model = _vllm_compat.worker_model(self)
    state = runtime_state(model)
    if state is not None:
        state.bind_query_start_loc(_vllm_compat.runner_query_start_loc(self),
                                   _vllm_compat.runner_name(self))
        state.request_p_applied = _vllm_compat.before_runner_forward(
            self, lambda req_ids, params_of: state.set_request_p(
                request_p.request_ps(req_ids, params_of)))
        if not state.request_p_applied:
            logger.warning("vllm-sparsity: %s has no per-step hook the plugin knows: requests' "
                           "own %s is not applied (they run at the server's p); "
                           "VLLM_USE_V2_MODEL_RUNNER=0 selects vLLM's V1 model runner, which "
                           "applies it", _vllm_compat.runner_name(self), request_p.FIELD)
        return
    vllm_config = _vllm_compat.worker_vllm_config(self)
    if (cfg.SparsityConfig.from_additional_config(vllm_config.additional_config) is not None
            and (find_gated_mlps(model)[0] or find_routed_experts(model)[0])):
        raise RuntimeError(
            f"vllm-sparsity: --load-format {_vllm_compat.load_format(vllm_config)} built "
            f"{type(model).__name__} without BaseModelLoader.create_model, where the plugin "
            "installs sparsity, so it would be served dense: load it with another --load-format "
            "(e.g. auto or safetensors), or unset --sparsity-p")


def vllm_sparsity_start_counting(self) -> None:
    """Worker RPC, after warm-up: zero the counters (warm-up and capture runs are no traffic)."""
    state = runtime_state(_vllm_compat.worker_model(self))
    if state is not None:
        state.reset_counters()


def vllm_sparsity_snapshot(self) -> dict[str, Any] | None:
    """This worker's settings and counters (``counters.snapshot``), None when the plugin is off.
    Read by the route and polled by the API server's metrics publisher."""
    state = runtime_state(_vllm_compat.worker_model(self))
    if state is None:
        return None
    return counters.snapshot(state, _vllm_compat.tp_rank(),
                             CLOCK.snapshot() if state.clock else None)


def vllm_sparsity_set(self, p: float | None, target: str | None) -> dict[str, Any] | None:
    """Set p and/or target in this worker (values already validated by the caller); returns the
    worker's settings after the change (``RuntimeState.settings``), None when the plugin is off."""
    state = runtime_state(_vllm_compat.worker_model(self))
    if state is None:
        return None
    state.set(p=p, target=target)
    return state.settings()


def vllm_sparsity_analysis_arm(self, tokens: int, rank_batch: int) -> dict[str, Any] | None:
    """Start recording the analyses in this worker (``analysis.arm``); None when the plugin is
    off. TP ranks past 0 record nothing: their rows are rank 0's (split sites are refused)."""
    state = runtime_state(_vllm_compat.worker_model(self))
    if state is None:
        return None
    if _vllm_compat.tp_rank() != 0:
        return {"sites": 0}
    return analysis.arm(state, tokens, rank_batch, _vllm_compat.eager_only_reason(
        _vllm_compat.worker_vllm_config(self)))


def vllm_sparsity_analysis_fetch(self) -> dict[str, Any] | None:
    """Stop recording and return this worker's analyses once computed (``analysis.fetch``: in a
    thread of its own, ``analysis.PENDING`` until then); None when the plugin is off or nothing
    was armed here."""
    state = runtime_state(_vllm_compat.worker_model(self))
    return None if state is None else analysis.fetch(state)


def vllm_sparsity_analysis_disarm(self) -> None:
    """Stop recording and drop what was recorded (``analysis.disarm``)."""
    state = runtime_state(_vllm_compat.worker_model(self))
    if state is not None:
        analysis.disarm(state)


def _test_delay(method):
    """A test-only switch: while the file named by ``TEST_DELAY_ENV`` exists and holds a JSON
    object {method name: seconds}, that worker method sleeps so long before it runs (how the
    suite makes a worker answer later than the API server waits). Unset in production."""
    @functools.wraps(method)
    def delayed(self, *args, **kwargs):
        path = os.environ.get(TEST_DELAY_ENV)
        if path:
            try:
                seconds = json.loads(Path(path).read_text()).get(method.__name__, 0)
            except (OSError, ValueError):
                seconds = 0
            time.sleep(seconds)
        return method(self, *args, **kwargs)

    return delayed


TEST_DELAY_ENV = "VLLM_SPARSITY_TEST_RPC_DELAY_FILE"
WORKER_METHODS = {f.__name__: _test_delay(f) for f in (
    vllm_sparsity_bind_step, vllm_sparsity_start_counting, vllm_sparsity_snapshot,
    vllm_sparsity_set, vllm_sparsity_analysis_arm, vllm_sparsity_analysis_fetch,
    vllm_sparsity_analysis_disarm)}
