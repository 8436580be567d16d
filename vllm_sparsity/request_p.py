"""p per request: a request may carry its own p in vLLM's per-request extension field.

How to send it: ``vllm_xargs`` on ``/v1/completions`` and ``/v1/chat/completions`` (with the openai
client, ``extra_body={"vllm_xargs": {"sparsity_p": 0.8}}``); vLLM copies ``vllm_xargs`` into
``SamplingParams.extra_args`` (``vllm/entrypoints/openai/completion/protocol.py``,
``to_sampling_params``). Offline: ``SamplingParams(extra_args={"sparsity_p": 0.8})``.

Semantics: the rule is per token row, so every token of that request (prompt and generated, in
prefill and decode) follows its p at every site of the server's target; tokens of requests without
it follow the server's p (which ``POST /v1/sparsity`` may change). One number: when the server runs
one p per site (``input=0.95,intermediate=0.85``), a request's p replaces the p of every site of the
target alike. It is the parameter of the server's rule (``--sparsity-rule``, fixed at start-up: the
share of L1 mass for top-p, of K for top-k, ...). Sites outside the target stay at the rule's
keep-everything p (``rule.KEEP_ALL_P``: 1, or 0 for max-p) for every request, exactly as
``SparsityConfig.p_of`` says for the server's p.

API server (``check_request``, called from ``_vllm_compat.on_process_inputs``): the value is
checked by ``config.parse_p`` (a JSON number in [1e-6, 1], or 0 under max-p) and refused with
HTTP 400 naming ``vllm_xargs.sparsity_p``; and the request's prefix-cache salt gets the p
(``salted``), so that KV blocks computed at one p are never reused by a request at another (vLLM's
``cache_salt`` enters every block hash, ``vllm/v1/core/kv_cache_utils.py``). Requests without it keep their salt and
share the cache with each other (the route clears it whenever the server's p changes).

Worker (``RuntimeState.set_request_p`` / ``mark_phases``): each step, the p of each request in the
model runner's batch order goes into a device buffer, and ``token_p`` expands it over each
request's tokens with ``query_start_loc``.

Counters per p (``request_slots``, ``counters.count_by_p``): beside the per-layer counters, which
mix every p, each layer counts the activations zeroed and in all per request p, for the first
``P_SLOTS`` distinct p a worker sees (a bounded table, never a label per request; later p are
counted with the requests without p). ``GET /v1/sparsity`` answers them under ``request_p``, so a
client that sends several p at once (``eval sweep --p-mode request``) measures each p's sparsity.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vllm_sparsity.config import parse_p

EXTRA_ARG = "sparsity_p"
FIELD = f"vllm_xargs.{EXTRA_ARG}"
SALT_PREFIX = "vllm-sparsity-p="
# Distinct request p counted apart per worker (rows of each layer's ``sparsity_p_stats``; one more
# row for tokens without a counted p: no p, a p past the table, padding).
P_SLOTS = 64


def requested_p(extra_args: dict[str, Any] | None,
                rule_name: str | None = "top-p") -> float | None:
    """The p a request carries (``SamplingParams.extra_args``), checked for the server's rule
    ``rule_name`` (``config.parse_p``), or None when it carries none.

    Raises:
        config.SparsityConfigError (a ValueError): not a number in [1e-6, 1] (nor the rule's
            keep-everything p: 0 for max-p); the message names ``vllm_xargs.sparsity_p``.
    """
    if not extra_args or EXTRA_ARG not in extra_args:
        return None
    return parse_p(extra_args[EXTRA_ARG], FIELD, strings=False, rule_name=rule_name)


def salted(cache_salt: str | None, p: float) -> str:
    """The request's prefix-cache salt with its p appended (``repr``: exact, so two p share a salt
    only when they are the same float)."""
    return f"{cache_salt or ''}|{SALT_PREFIX}{p!r}"


def request_ps(req_ids: list[str], sampling_params_of) -> list[float]:
    """p of each request of a step, in batch order; NaN for a request without one.

    Args:
        req_ids: the step's request ids in the model runner's batch order (the order of
            ``query_start_loc``).
        sampling_params_of: req_id -> its ``SamplingParams`` (or None: a pooling request).
    """
    out = []
    for req_id in req_ids:
        params = sampling_params_of(req_id)
        extra = getattr(params, "extra_args", None)
        value = extra.get(EXTRA_ARG) if extra else None
        out.append(math.nan if value is None else float(value))
    return out


def token_p(request_p: torch.Tensor, site_p: torch.Tensor, site_on: torch.Tensor,
            request_of_token: torch.Tensor) -> torch.Tensor:
    """p of each token at one site: its request's own p where it has one and the site is in the
    target, else the site's p (the server's p, or 1 outside the target).

    Capture-safe: device ops on the given tensors only, shapes fixed by theirs.

    Args:
        request_p: float64 [R], each request's p in batch order, NaN where it carries none.
        site_p: float64 [1], the site's p (``RuntimeState.p[site]``).
        site_on: bool [1], whether the site is in the current target.
        request_of_token: int64 [T], each token's index into ``request_p`` (in [0, R)).

    Returns:
        float64 [T].
    """
    own = request_p[request_of_token]
    return torch.where(own.isnan() | ~site_on, site_p, own)


def request_slots(request_p: torch.Tensor, slot_p: torch.Tensor) -> torch.Tensor:
    """Each request's counter slot: the index of its p in ``slot_p``, ``P_SLOTS`` when it has none
    or its p has no slot. Capture-safe (device ops, shapes fixed by the inputs).

    Args:
        request_p: float64 [R], each request's p in batch order, NaN where it carries none.
        slot_p: float64 [P_SLOTS], the p of each slot, NaN for a free one (NaN equals nothing).

    Returns:
        int64 [R], in [0, P_SLOTS].
    """
    same = request_p[:, None] == slot_p[None, :]
    return torch.where(same.any(dim=-1), same.to(torch.int64).argmax(dim=-1), P_SLOTS)


def counter_key(p: float) -> str:
    """The key of p in the route's ``request_p.counters`` (``repr``: exact)."""
    return repr(float(p))
