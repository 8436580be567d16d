"""Find every gated MLP of a loaded vLLM model by its structure and make its inputs sparse.

A gated MLP is any module with a merged column-parallel ``gate_up_proj``, an act-and-mul ``act_fn``
and a row-parallel ``down_proj`` (vLLM's Gemma 3, Llama 3.x, Mistral, Qwen 2.5/3 MLPs, and the
language model inside multimodal wrappers such as ``Gemma3ForConditionalGeneration``). No model is
named anywhere: new architectures with that structure work as they are.
"""

from __future__ import annotations

import functools
import logging
import re

import torch

from vllm_sparsity import _vllm_compat, metrics, sparse_linear
from vllm_sparsity.config import SparsityConfig

logger = logging.getLogger("vllm.vllm_sparsity")  # under vLLM's handler and format

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def find_gated_mlps(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module]], int]:
    """Gated MLPs of ``model`` as ``(qualified name, module)``, and how many MLP-like modules
    (any module with ``down_proj``) it has in all."""
    merged, row, act_and_mul = _vllm_compat.gated_mlp_types()
    found, candidates = [], 0
    for name, module in model.named_modules():
        if not hasattr(module, "down_proj"):
            continue
        candidates += 1
        if (isinstance(getattr(module, "gate_up_proj", None), merged)
                and isinstance(getattr(module, "act_fn", None), act_and_mul)
                and isinstance(module.down_proj, row)):
            found.append((name, module))
    return found, candidates


class RuntimeState:
    """The plugin's state in one worker process: config, installed sites, their p tensors.

    Each site kind (``input``, ``intermediate``) has one float64 [1] tensor shared by all its
    layers. A site outside the current target holds p = 1, which keeps every nonzero entry, so the
    target can change at runtime among the sites installed at start-up without retracing a graph.

    ``phase`` (int64 [max_num_tokens]) and ``batch_phase`` (int64 [1]) hold the phase of each token
    of the current step and of the step (``metrics.PREFILL``, ``DECODE``, ``PAD``); every sparse
    layer reads them (``mark_phases`` fills them before each forward). ``metrics``: the layers also
    keep the counters of ``vllm_sparsity.metrics``; ``clock``: MLP forwards are timed (CPU only).
    """

    def __init__(self, config: SparsityConfig, device: torch.device, max_num_tokens: int = 8192,
                 metrics_on: bool = False) -> None:
        self.config = config
        self.started_target = config.target
        sites = [s for s, on in (("input", config.sparsify_input),
                                 ("intermediate", config.sparsify_intermediate)) if on]
        # Shape [1], not 0-dim: a 0-dim float tensor in the graph makes torch.compile specialise
        # it as a Python scalar, which vLLM's one-shot graph capture cannot restart from.
        self.p = {s: torch.ones(1, dtype=torch.float64, device=device) for s in sites}
        self.backend = config.backend  # resolved per layer by replace_mlp ("torch", "triton")
        self.phase = torch.full((max_num_tokens,), metrics.PREFILL, dtype=torch.int64,
                                device=device)
        self.batch_phase = torch.full((1,), metrics.PREFILL, dtype=torch.int64, device=device)
        self.metrics = metrics_on
        self.clock = metrics_on and device.type == "cpu"
        self.layers: list[tuple[str, torch.nn.Module]] = []  # filled by replace_mlp
        self.set(p=config.p, target=config.target)

    def mark_phases(self, num_tokens: int, query_start_loc: torch.Tensor | None) -> None:
        """Before a forward of ``num_tokens`` tokens: write each token's phase and the step's into
        the shared buffers (device ops, no host sync; see ``metrics.token_phases``)."""
        phase, batch = metrics.token_phases(query_start_loc, num_tokens, self.phase.device)
        self.phase[:num_tokens].copy_(phase)
        self.batch_phase.copy_(batch)
        if self.clock:  # CPU tensors: reading one is no device sync
            metrics.CLOCK.phase = int(batch)

    def p_by_site(self) -> dict[str, float]:
        """p of each installed site as ``set`` wrote it (1 for a site outside the target)."""
        on = {"input": self.config.sparsify_input,
              "intermediate": self.config.sparsify_intermediate}
        return {site: self.config.p if on[site] else 1.0 for site in self.p}

    @property
    def targets(self) -> list[str]:
        """Targets reachable at runtime: those whose sites are all installed."""
        need = {"input": {"input"}, "intermediate": {"intermediate"},
                "all_inputs": {"input", "intermediate"}}
        return [t for t, sites in need.items() if sites <= set(self.p)]

    def set(self, p: float | None = None, target: str | None = None) -> None:
        """Change p and/or target in place (validated values; see ``control``)."""
        if target is not None and target not in self.targets:
            raise ValueError(f"target {target!r} is not installed; available: {self.targets}")
        self.config = SparsityConfig(p=self.config.p if p is None else p,
                                     target=target or self.config.target,
                                     backend=self.config.backend)
        for site, value in self.p_by_site().items():
            self.p[site].fill_(value)

    def describe(self, model: torch.nn.Module | None = None) -> dict:
        """Settings, plus per-layer counters when ``model`` is given (copies them to the host)."""
        out = {**self.config.to_dict(), "resolved_backend": self.backend,
               "targets": self.targets, "started_target": self.started_target}
        if model is not None:
            out["layers"] = [
                {"layer": m.quant_method.layer_index, "site": m.quant_method.site, "name": name,
                 "zeroed": int(c[0]), "total": int(c[1]),
                 "split": m.quant_method.all_reduce is not None}
                for name, m in sparse_layers(model) for c in [m.sparsity_counts.tolist()]]
        return out


def runtime_state(model: torch.nn.Module) -> RuntimeState | None:
    """The ``RuntimeState`` that ``replace_mlp`` attached to ``model``, or None."""
    return getattr(model, "_vllm_sparsity", None)


def replace_mlp(model: torch.nn.Module, config: SparsityConfig, max_num_tokens: int = 8192,
                metrics_on: bool = False) -> list[str]:
    """Install the top-p rule on the target inputs of every gated MLP of ``model``.

    Idempotent: a model already converted is left alone. Logs one INFO line (model class, MLPs
    sparsified of all, target, p), or a warning when the model has no gated MLP (it is then served
    dense). Also wraps ``model.forward`` (the eager top level, outside vLLM's compiled graph) to
    mark each token's phase before the forward.

    Args:
        model: a vLLM model, built (its linear layers have their ``quant_method``); weights may
            be loaded or not.
        config: the resolved sparsity config.
        max_num_tokens: most tokens in one forward (vLLM's ``max_num_batched_tokens``).
        metrics_on: keep the counters of ``vllm_sparsity.metrics`` (changes the graph).

    Returns:
        Qualified names of the linear layers that now apply the rule.

    Tensor parallelism: each rank's ``down_proj`` sees a shard of K, so the intermediate site
    applies the global rule (each level's histogram all-reduced over the TP group, see
    ``rule.top_p_threshold``; logged once at INFO); the input site's rows are replicated.

    Raises:
        ValueError: ``backend="triton"`` for a layer the kernels cannot serve (the reason says why).
    """
    mlps, candidates = find_gated_mlps(model)
    if not mlps:
        logger.warning(
            "vllm-sparsity: %s has no gated MLP (gate_up_proj -> act-and-mul -> down_proj); "
            "serving it dense", type(model).__name__)
        return []
    if runtime_state(model) is not None:
        return []
    state = RuntimeState(config, next(model.parameters()).device, max_num_tokens, metrics_on)
    model._vllm_sparsity = state
    replaced, backends, fallbacks, shards = [], set(), {}, set()
    for name, mlp in mlps:
        index = int(m.group(1)) if (m := _LAYER_INDEX.search(name + ".")) else len(replaced)
        for site, layer_name, on in (("input", "gate_up_proj", config.sparsify_input),
                                     ("intermediate", "down_proj", config.sparsify_intermediate)):
            layer = getattr(mlp, layer_name)
            if on:
                backend, reason = _backend_for(layer, config.backend)
                if reason:
                    fallbacks[f"{name}.{layer_name}"] = reason
                # down_proj under TP holds a shard of K: the global rule needs the whole rows' mass.
                k_shards = _vllm_compat.k_shards(layer)
                all_reduce = _vllm_compat.tp_all_reduce if k_shards > 1 else None
                if all_reduce is not None:
                    shards.add((site, k_shards))
                sparse_linear.install(layer, site, index, state.p[site], backend, state.phase,
                                      state.batch_phase, stats=metrics_on, all_reduce=all_reduce)
                replaced.append(f"{name}.{layer_name}")
                state.layers.append((f"{name}.{layer_name}", layer))
                backends.add(backend)
        # One MLP per step is timed (the first): every MLP of a model has the same shapes, and
        # clock marks around all of them would add two opaque ops per layer to each decode step.
        if state.clock and mlp is mlps[0][1]:
            metrics.time_mlp(mlp)
    _mark_phases_before_forward(model, state)
    if metrics_on and not state.clock:
        logger.info("vllm-sparsity: %s", metrics.CUDA_NOTE)
    for site, k_shards in sorted(shards):
        logger.info("vllm-sparsity: the %s site's input is split over %d TP ranks: it applies the "
                    "global top-p rule (per-row histograms all-reduced across the ranks)",
                    site, k_shards)
    if fallbacks:
        logger.warning("vllm-sparsity: %d layers use the torch backend instead of triton: %s",
                       len(fallbacks), sorted(set(fallbacks.values())))
    state.backend = "+".join(sorted(backends))
    logger.info(
        "vllm-sparsity: %s: sparsified %d of %d MLPs (target=%s, p=%g, backend=%s -> %s)",
        type(model).__name__, len(mlps), candidates, config.target, config.p, config.backend,
        state.backend)
    return replaced


def _mark_phases_before_forward(model: torch.nn.Module, state: RuntimeState) -> None:
    """Wrap the eager top-level ``model.forward`` (an instance attribute: the class stays
    untouched) to fill the phase buffers before each forward, from vLLM's forward context."""
    if _vllm_compat.is_compiled(model):  # its forward is traced: no eager point before the graph
        logger.warning("vllm-sparsity: %s is compiled as a whole; every token counts as prefill "
                       "(padding and warm-up runs included)", type(model).__name__)
        return
    forward = model.forward

    @functools.wraps(forward)
    def forward_marking_phases(*args, **kwargs):
        # Outside a vLLM step (a model run by hand) the buffers keep "every token is prefill".
        num_tokens = _vllm_compat.forward_num_tokens(args, kwargs)
        if num_tokens is not None and _vllm_compat.in_forward_context():
            state.mark_phases(num_tokens,
                              _vllm_compat.query_start_loc(num_tokens, state.phase.device))
        return forward(*args, **kwargs)

    model.forward = forward_marking_phases


def _backend_for(layer: torch.nn.Module, requested: str) -> tuple[str, str | None]:
    """(backend, why triton was not used) for one layer. ``auto`` takes triton on CUDA when the
    layer allows it, else torch (with the reason, logged); an explicit ``triton`` that the layer
    cannot use stops start-up."""
    if requested == "torch" or (requested == "auto" and layer.weight.device.type != "cuda"):
        return "torch", None
    from vllm_sparsity.kernels.backend import unsupported_reason

    reason = unsupported_reason(layer)
    if reason is None:
        return "triton", None
    if requested == "triton":
        raise ValueError(f"--sparsity-backend triton cannot serve this model: {reason}")
    return "torch", reason


def sparse_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, layer)`` of every linear layer of ``model`` that applies the rule, in model order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "quant_method", None), sparse_linear.InputSparseLinearMethod)]
