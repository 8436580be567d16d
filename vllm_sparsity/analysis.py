"""Analyses collected in the workers on request (paper Sec. 4.6, App. E): per layer and site, the
activation rows for the effective rank, the Jaccard overlap of kept sets across decode steps, and
the sparsity of the masks seen.

Off unless armed, and then only on an eager server. Arming sets ``observer`` on every sparse
site (``sparse_linear.InputSparseLinearMethod``, ``sparse_site.Site``) to a ``SiteRecorder``,
which each call of the site feeds with its input x [M, K] and the rule's mask [M, K]. In a
compiled graph (torch.compile, CUDA graphs) that attribute was None when vLLM traced the model
and the graph never looks again, so a compiled model holds no trace of the analysis and arming it
would record nothing: ``arm`` refuses unless the server runs eagerly (``vllm serve
--enforce-eager``, ``_vllm_compat.eager_only_reason``). Recording costs host syncs and copies per
site and step; it is meant for analysis runs, not serving.

Memory is bounded by the caller: ``tokens`` rows of K activations per site (allocated at the
site's first call, in the activations' dtype) plus two masks [K]; everything else is a few
numbers. Rows of every real token (prefill and decode, padding excluded) are kept in arrival
order until ``tokens`` are held; the effective rank is computed when the results are fetched,
per batch of ``rank_batch`` consecutive rows (a last, shorter batch is dropped), and averaged.

Mask stability assumes **batch-1 decode**: a step whose only real row is a decode token continues
the current sequence (its mask is compared with the previous step's, "consecutive", and with the
sequence's first decode step's, "drift"); any other step (a prefill, several rows) ends it. The
caller must therefore send one request at a time, with distinct prompts (a prompt served whole
from the prefix cache recomputes a single token, which would look like a decode step): the
``vllm-sparsity analyze`` command does (``eval/analyze.py``).

Under tensor parallelism a site split over K (``down_proj``, gate and up) sees a shard of each
row: ``arm`` refuses such servers rather than report per-shard numbers.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from vllm_sparsity.activation_stats import effective_rank, jaccard
from vllm_sparsity.counters import DECODE, PAD

MAX_TOKENS = 65536  # rows per site at most: a bound on a typo, the caller sizes memory below it
# Numbers a worker returns per (layer, site): summed over workers by ``merge``.
SUMS = ("zeroed", "total", "rows", "rank_sum", "rank_batches", "decode_steps",
        "consecutive_sum", "consecutive_pairs", "drift_sum", "drift_pairs")


class SiteRecorder:
    """What one site of one layer records while armed (see module doc).

    Args:
        phase: the state's int64 [max tokens] token phases (``state.RuntimeState.phase``).
        tokens: rows kept for the effective rank (0: none).
    """

    def __init__(self, phase: torch.Tensor, tokens: int) -> None:
        self.phase, self.tokens = phase, tokens
        self.buffer: torch.Tensor | None = None  # [tokens, K], allocated at the first call
        self.dim = 0
        self.counts = dict.fromkeys(SUMS, 0)
        self.counts["consecutive_sum"] = self.counts["drift_sum"] = 0.0
        self.first: torch.Tensor | None = None  # bool [K]: the sequence's first decode mask
        self.prev: torch.Tensor | None = None  # bool [K]: the previous decode step's mask

    def __call__(self, x2: torch.Tensor, mask: torch.Tensor) -> None:
        """One call of the site: x2 [M, K] its input, mask bool [M, K] what the rule keeps."""
        phase = self.phase[: x2.shape[0]]
        real = phase != PAD
        if not bool(real.all()):
            x2, mask, phase = x2[real], mask[real], phase[real]
        m, self.dim = x2.shape[0], x2.shape[1]
        if m == 0:  # a dummy run
            return
        c = self.counts
        c["total"] += mask.numel()
        c["zeroed"] += mask.numel() - int(mask.sum())
        take = min(m, self.tokens - c["rows"])
        if take > 0:
            if self.buffer is None:
                self.buffer = torch.empty(self.tokens, self.dim, dtype=x2.dtype,
                                          device=x2.device)
            self.buffer[c["rows"]:c["rows"] + take].copy_(x2[:take])
            c["rows"] += take
        if m == 1 and int(phase[0]) == DECODE:
            step = mask[0].clone()
            c["decode_steps"] += 1
            if self.first is None:
                self.first = step
            else:
                c["consecutive_sum"] += float(jaccard(step, self.prev))
                c["drift_sum"] += float(jaccard(step, self.first))
                c["consecutive_pairs"] += 1
                c["drift_pairs"] += 1
            self.prev = step
        else:  # a prefill or a batch: the sequence of single decode steps ends here
            self.first = self.prev = None

    def result(self, rank_batch: int) -> dict[str, Any]:
        """The sums of ``SUMS`` (``rank_sum``: the effective ranks of the full batches of
        ``rank_batch`` rows, ``rank_batches`` of them) and ``dim`` (K, 0 if never called)."""
        c = dict(self.counts)
        if self.buffer is not None and rank_batch > 0:
            for start in range(0, c["rows"] - rank_batch + 1, rank_batch):
                c["rank_sum"] += effective_rank(self.buffer[start:start + rank_batch])
                c["rank_batches"] += 1
        return {**c, "dim": self.dim}


def _methods(state) -> list[tuple[str, Any]]:
    """``(name, object carrying observer/layer_index/site/all_reduce)`` of every sparse site of a
    gated MLP. Routed experts' sites are left out: their rows are (token, expert) pairs, whose
    masks across decode steps belong to different experts; their per-expert counters
    (``GET /v1/sparsity``'s ``experts``) give the per-expert analysis."""
    return [(name, getattr(layer, "quant_method", layer)) for name, layer in state.layers
            if not hasattr(layer, "sparsity_expert_stats")]


def check_arm_body(body: Any) -> tuple[int, int]:
    """``(tokens, rank_batch)`` from a ``POST /v1/sparsity/analysis`` body: a JSON object with
    ``tokens`` (rows kept per layer and site for the effective rank, an integer in
    [0, MAX_TOKENS]) and optionally ``rank_batch`` (rows per effective-rank batch, an integer
    in [2, tokens]; default tokens). Raises ValueError naming the field and the allowed range."""
    if not isinstance(body, dict) or "tokens" not in body or set(body) - {"tokens", "rank_batch"}:
        raise ValueError('body must be a JSON object {"tokens": N, "rank_batch": B} (rank_batch '
                         f'optional); got {str(body)[:100]}')
    tokens = body["tokens"]
    if type(tokens) is not int or not 0 <= tokens <= MAX_TOKENS:
        raise ValueError(f"tokens must be an integer in [0, {MAX_TOKENS}], got {tokens!r}")
    rank_batch = body.get("rank_batch", tokens)
    if tokens and (type(rank_batch) is not int or not 2 <= rank_batch <= tokens):
        raise ValueError(f"rank_batch must be an integer in [2, tokens={tokens}], got "
                         f"{rank_batch!r}")
    return tokens, rank_batch if tokens else 0


def arm(state, tokens: int, rank_batch: int, not_eager: str | None) -> dict[str, Any]:
    """Start recording on every sparse site of this worker (dropping any earlier recording).

    Args:
        state: the worker's ``state.RuntimeState``.
        tokens, rank_batch: as ``check_arm_body`` returns them.
        not_eager: why the model is not run eagerly (``_vllm_compat.eager_only_reason``), or None.

    Returns:
        ``{"sites": how many sites record}``, or ``{"error": why}`` when it cannot record (not
        eager; a site split over tensor-parallel ranks).
    """
    if not_eager:
        return {"error": f"analysis needs an eager server: {not_eager}, and a compiled graph "
                "never runs the recording; start vllm serve with --enforce-eager"}
    split = [name for name, method in _methods(state) if method.all_reduce is not None]
    if split:
        return {"error": f"analysis runs without tensor parallelism: {split[0]} and "
                f"{len(split) - 1} more sites hold a shard of each row"}
    state.analysis, state.analysis_job = (tokens, rank_batch), None
    for _, method in _methods(state):
        method.observer = SiteRecorder(state.phase, tokens)
    return {"sites": len(_methods(state))}


# One thread per worker process computes fetched results, off the model's thread (the engine loop
# waits on the worker while an RPC runs).
_COMPUTE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-sparsity-analysis")
PENDING = {"pending": True}  # a worker's fetch reply while it computes


def disarm(state) -> list[tuple[int, str, str, SiteRecorder]] | None:
    """Stop recording: ``[layer, site, name, recorder]`` per site, in model order; None when not
    armed. Forgets any earlier fetch still being computed."""
    state.analysis_job = None
    armed, state.analysis = state.analysis, None
    if armed is None:
        return None
    recorders = []
    for name, method in _methods(state):
        recorders.append((method.layer_index, method.site, name, method.observer))
        method.observer = None
    return recorders


def fetch(state) -> dict[str, Any] | None:
    """Stop recording and return what was recorded, computed in a background thread: the first
    call after recording starts the computation and returns ``PENDING``, as does every call while
    it runs; the call after it finished returns ``tokens``, ``rank_batch`` and ``sites``, rows
    ``[layer, site, name, result]`` (``SiteRecorder.result``) in model order, and forgets them.
    None when neither armed nor computing. Frees the rows once computed."""
    job = state.analysis_job
    if job is None:
        tokens, rank_batch = state.analysis or (0, 0)
        recorders = disarm(state)
        if recorders is None:
            return None
        job = state.analysis_job = _COMPUTE.submit(_results, tokens, rank_batch, recorders)
    if not job.done():
        return PENDING
    state.analysis_job = None
    return job.result()


def _results(tokens: int, rank_batch: int, recorders: list) -> dict[str, Any]:
    return {"tokens": tokens, "rank_batch": rank_batch,
            "sites": [[layer, site, name, recorder.result(rank_batch)]
                      for layer, site, name, recorder in recorders]}


def is_pending(reply: Any) -> bool:
    """Whether a worker's ``fetch`` reply says it is still computing."""
    return reply == PENDING


def merge(per_worker: list[dict | None]) -> dict[str, Any]:
    """One answer from the workers' ``fetch`` replies (pipeline stages hold other layers,
    data-parallel replicas other requests: their sums add up): ``tokens``, ``rank_batch`` and
    ``layers``, per (layer, site) in order: ``layer``, ``site``, ``name``, ``dim`` and the sums
    of ``SUMS``, plus the means ``sparsity`` (zeroed / total of the masks seen),
    ``effective_rank``, ``consecutive_jaccard``, ``drift_jaccard`` (None without data).

    Raises:
        ValueError: no worker was armed.
    """
    replies = [r for r in per_worker if r]
    if not replies:
        raise ValueError("no analysis is armed: POST /v1/sparsity/analysis first")
    rows: dict[tuple[int, str], dict] = {}
    for reply in replies:
        for layer, site, name, result in reply["sites"]:
            entry = rows.setdefault((layer, site), {"layer": layer, "site": site, "name": name,
                                                    "dim": 0, **dict.fromkeys(SUMS, 0)})
            entry["dim"] = max(entry["dim"], result["dim"])
            for key in SUMS:
                entry[key] += result[key]
    out = []
    for key in sorted(rows, key=lambda k: k[0]):  # by layer; sites in model order
        e = rows[key]
        e["sparsity"] = _ratio(e["zeroed"], e["total"])
        e["effective_rank"] = _ratio(e["rank_sum"], e["rank_batches"])
        e["consecutive_jaccard"] = _ratio(e["consecutive_sum"], e["consecutive_pairs"])
        e["drift_jaccard"] = _ratio(e["drift_sum"], e["drift_pairs"])
        out.append(e)
    return {"tokens": replies[0]["tokens"], "rank_batch": replies[0]["rank_batch"],
            "layers": out}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None
