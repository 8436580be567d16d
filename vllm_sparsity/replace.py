"""Find every gated MLP of a loaded vLLM model's language model by its structure and make its
inputs sparse.

A gated MLP is any module with a merged column-parallel ``gate_up_proj``, an act-and-mul ``act_fn``
and a row-parallel ``down_proj`` (vLLM's Gemma 3, Llama 3.x, Mistral, Qwen 2.5/3 MLPs). No model
is named anywhere: new architectures with that structure work as they are. In a multimodal model
only the language model's decoder MLPs are sparsified (vLLM's ``SupportsMultiModal
.get_language_model``): encoder towers (e.g. Qwen2.5-VL's ``Qwen2_5_VisionMLP``, also gated) run
outside the wrapped forward, on tokens the phase buffers do not describe, and their layer indices
would collide with the decoder's.

Routed experts (vLLM's fused-MoE layers, ``RoutedExperts``) are found by type and take the
``input`` and ``intermediate`` sites through their fused-MoE method (``sparse_moe``); gated MLPs
beside them (shared experts, dense layers) are sparsified as above.
"""

from __future__ import annotations

import functools
import logging
import re

import torch

from vllm_sparsity import _vllm_compat, _vllm_moe, backends, sparse_act, sparse_linear, sparse_moe
from vllm_sparsity.clock import CUDA_NOTE, time_mlp
from vllm_sparsity.config import SparsityConfig, describe_p
from vllm_sparsity.sites import ANALYSIS_SITES, SITES
from vllm_sparsity.state import RuntimeState, runtime_state

logger = logging.getLogger("vllm.vllm_sparsity")  # under vLLM's handler and format

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _is_gated_mlp(module: torch.nn.Module, types) -> bool:
    merged, row, act_and_mul = types
    return (isinstance(getattr(module, "gate_up_proj", None), merged)
            and isinstance(getattr(module, "act_fn", None), act_and_mul)
            and isinstance(getattr(module, "down_proj", None), row))


def _in_language_model(name: str, lm: str | None) -> bool:
    return lm is not None and (lm == "" or name == lm or name.startswith(lm + "."))


def find_routed_experts(model: torch.nn.Module
                        ) -> tuple[list[tuple[str, torch.nn.Module]], dict[str, str]]:
    """The language model's fused-MoE experts (vLLM's ``RoutedExperts``).

    Returns:
        ``(found, refused)``: ``(qualified name, module)`` of those the plugin can serve, and
        {qualified name: why not} for the others (``_vllm_moe.moe_refusal``; left dense).
    """
    experts_type = _vllm_moe.routed_experts_type()
    lm = _vllm_compat.language_model_name(model)
    found, refused = [], {}
    for name, module in model.named_modules():
        if isinstance(module, experts_type) and _in_language_model(name, lm):
            reason = _vllm_moe.moe_refusal(module)
            if reason is None:
                found.append((name, module))
            else:
                refused[name] = reason
    return found, refused


def find_gated_mlps(model: torch.nn.Module
                    ) -> tuple[list[tuple[str, torch.nn.Module]], int, int]:
    """The gated MLPs to sparsify.

    Returns:
        ``(found, candidates, outside)``: the language model's gated MLPs as ``(qualified name
        in model, module)``; how many MLP-like modules (any module with ``down_proj``) the
        language model has; how many gated MLPs lie outside it (towers of a multimodal model,
        left dense). The language model is ``model`` itself for a text model. A multimodal model
        whose language model vLLM cannot name yields no MLP at all (``found`` empty).
    """
    types = _vllm_compat.gated_mlp_types()
    lm = _vllm_compat.language_model_name(model)
    found, candidates, outside = [], 0, 0
    for name, module in model.named_modules():
        inside = _in_language_model(name, lm)
        gated = _is_gated_mlp(module, types)
        if not inside:
            outside += gated
            continue
        candidates += hasattr(module, "down_proj")
        if gated:
            found.append((name, module))
    return found, candidates, outside


def replace_mlp(model: torch.nn.Module, config: SparsityConfig, max_num_tokens: int,
                metrics_on: bool = False) -> list[str]:
    """Install the rule on the target sites of every gated MLP of ``model``'s language model
    (``find_gated_mlps``).

    Idempotent: a model already converted is left alone. Logs one INFO line (model class, MLPs
    sparsified of all, for a multimodal model the language model's class and the tower MLPs left
    dense, target, p), or a warning when there is no gated MLP to sparsify (the model is then
    served dense). Also wraps ``model.forward`` (the eager top level, outside vLLM's compiled
    graph) to mark each token's phase before the forward.

    Args:
        model: a vLLM model, built (its linear layers have their ``quant_method``); weights may
            be loaded or not.
        config: the resolved sparsity config.
        max_num_tokens: most tokens in one forward (vLLM's ``max_num_batched_tokens``).
        metrics_on: keep the detailed counters and clock of ``vllm_sparsity.metrics`` (changes
            the graph).

    Returns:
        Qualified names of the sites that now apply the rule: linear layers, analysis sites,
        routed experts' sites (``<experts>.input``, ``<experts>.intermediate``).

    Tensor parallelism: each rank's ``down_proj`` sees a shard of K, so the intermediate site
    applies the global rule (each level's histogram all-reduced over the TP group, see
    ``rule.top_p_threshold``; logged once at INFO); the input site's rows are replicated.

    Raises:
        ValueError: an explicit backend that cannot serve a layer (the reason says why).
    """
    if runtime_state(model) is not None:
        return []
    mlps, candidates, outside = find_gated_mlps(model)
    moes, refused_moes = find_routed_experts(model)
    expert_sites = tuple(s for s in config.sites if s in sparse_moe.EXPERT_SITES)
    if refused_moes:
        logger.warning("vllm-sparsity: %d fused-MoE layers left dense (routed experts): %s",
                       len(refused_moes), sorted(set(refused_moes.values())))
    if moes and not expert_sites:
        logger.warning("vllm-sparsity: routed experts take the sites %s only; target %s leaves "
                       "its %d fused-MoE layers dense", ", ".join(sparse_moe.EXPERT_SITES),
                       config.target, len(moes))
        moes = []
    if not mlps and not moes:
        if _vllm_compat.language_model_name(model) is None:
            logger.warning("vllm-sparsity: %s is multimodal and vLLM names no language model in "
                           "it (get_language_model); serving it dense", type(model).__name__)
        else:
            logger.warning(
                "vllm-sparsity: %s has no gated MLP (gate_up_proj -> act-and-mul -> down_proj)"
                " nor routed experts to sparsify%s; serving it dense", type(model).__name__,
                " in its language model" if outside else "")
        return []
    state = RuntimeState(config, next(model.parameters()).device, max_num_tokens, metrics_on)
    model._vllm_sparsity = state
    chosen, refusals, shards = set(), {}, set()
    for name, mlp in mlps:
        index = int(m.group(1)) if (m := _LAYER_INDEX.search(name + ".")) else len(state.layers)
        analysis = tuple(site for site in config.sites if site in ANALYSIS_SITES)
        if analysis:  # gate/up: the torch rule inside act-and-mul (sparse_act), any backend
            # down_proj's input shards are act-and-mul's: the same split over TP ranks.
            k_shards = _vllm_compat.k_shards(mlp.down_proj)
            sparse_act.install(mlp, name, analysis, index, state,
                               _vllm_compat.tp_all_reduce if k_shards > 1 else None)
            shards.update((site, k_shards) for site in analysis if k_shards > 1)
            chosen.add("torch")
        for site in config.sites:
            if site in ANALYSIS_SITES:
                continue
            layer_name = f"{name}.{SITES[site]}"
            layer = getattr(mlp, SITES[site])
            backend, refused = backends.choose(layer, config.backend, config.rule)
            for other, reason in refused.items():
                refusals.setdefault((backend, other), {})[layer_name] = reason
            # down_proj under TP holds a shard of K: the global rule needs the whole rows' mass.
            k_shards = _vllm_compat.k_shards(layer)
            all_reduce = _vllm_compat.tp_all_reduce if k_shards > 1 else None
            if all_reduce is not None:
                shards.add((site, k_shards))
            sparse_linear.install(layer, layer_name, site, index, state, backend, all_reduce)
            chosen.add(backend)
        # One MLP per step is timed (the first): every MLP of a model has the same shapes, and
        # clock marks around all of them would add two opaque ops per layer to each decode step.
        if state.clock and mlp is mlps[0][1]:
            time_mlp(mlp)
    for name, experts in moes:
        index = int(m.group(1)) if (m := _LAYER_INDEX.search(name + ".")) else len(state.layers)
        sparse_moe.install(experts, name, expert_sites, index, state)
    _mark_phases_before_forward(model, state)
    if metrics_on and not state.clock:
        logger.info("vllm-sparsity: %s", CUDA_NOTE)
    for site, k_shards in sorted(shards):
        logger.info("vllm-sparsity: the %s site's input is split over %d TP ranks: it applies the "
                    "global top-p rule (per-row histograms all-reduced across the ranks)",
                    site, k_shards)
    for (backend, other), reasons in sorted(refusals.items()):
        logger.warning("vllm-sparsity: %d layers use the %s backend instead of %s: %s",
                       len(reasons), backend, other, sorted(set(reasons.values())))
    state.backend = "+".join(sorted(chosen)) or "torch"  # a model of routed experts only
    lm = _vllm_compat.language_model_name(model)
    scope = (f" of its language model ({type(model.get_submodule(lm)).__name__}); {outside} gated "
             "MLPs outside it (vision/audio towers) left dense") if lm else ""
    if moes:
        # The torch experts are the only expert path with the intermediate site (no kernel).
        how = ("torch experts, no speed-up" if "intermediate" in expert_sites
               else "vLLM's fused kernel on the sparsified input")
        scope += (f"; {len(moes)} of {len(moes) + len(refused_moes)} fused-MoE layers' routed "
                  f"experts at {', '.join(expert_sites)} ({how})")
    logger.info(
        "vllm-sparsity: %s: sparsified %d of %d MLPs%s (target=%s, rule=%s, p=%s, backend=%s -> "
        "%s)", type(model).__name__, len(mlps), candidates, scope, config.target,
        config.rule + (f" q={config.q:g}" if config.q is not None else ""),
        describe_p(config.p), config.backend, state.backend)
    return [name for name, _ in state.layers]


def _mark_phases_before_forward(model: torch.nn.Module, state: RuntimeState) -> None:
    """Wrap the eager top-level ``model.forward`` (an instance attribute: the class stays
    untouched) to fill the phase buffers before each forward, from vLLM's forward context.

    Under a full CUDA graph (vLLM's default ``FULL_AND_PIECEWISE`` for decode batches) this
    wrapper runs once, inside the capture, and only the device ops it issued are replayed: what
    it does must be capture-safe (``RuntimeState.mark_phases``)."""
    if _vllm_compat.is_compiled(model):  # its forward is traced: no eager point before the graph
        logger.warning("vllm-sparsity: %s is compiled as a whole; every token counts as prefill "
                       "(padding and warm-up runs included)", type(model).__name__)
        return
    forward = model.forward

    @functools.wraps(forward)
    def forward_marking_phases(*args, **kwargs):
        # Outside a vLLM step (a model run by hand) the buffers keep "every token is prefill".
        num_tokens = _vllm_compat.forward_num_tokens(args, kwargs)
        step = _vllm_compat.step_kind()
        if num_tokens is not None and step is not None:
            state.mark_phases(num_tokens, step)
        return forward(*args, **kwargs)

    model.forward = forward_marking_phases
