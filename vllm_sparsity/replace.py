"""Find every gated MLP of a loaded vLLM model by its structure and make its inputs sparse.

A gated MLP is any module with a merged column-parallel ``gate_up_proj``, an act-and-mul ``act_fn``
and a row-parallel ``down_proj`` (vLLM's Gemma 3, Llama 3.x, Mistral, Qwen 2.5/3 MLPs, and the
language model inside multimodal wrappers such as ``Gemma3ForConditionalGeneration``). No model is
named anywhere: new architectures with that structure work as they are.
"""

from __future__ import annotations

import logging
import re

import torch

from vllm_sparsity import _vllm_compat, sparse_linear
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
    """

    def __init__(self, config: SparsityConfig, device: torch.device) -> None:
        self.config = config
        self.started_target = config.target
        sites = [s for s, on in (("input", config.sparsify_input),
                                 ("intermediate", config.sparsify_intermediate)) if on]
        # Shape [1], not 0-dim: a 0-dim float tensor in the graph makes torch.compile specialise
        # it as a Python scalar, which vLLM's one-shot graph capture cannot restart from.
        self.p = {s: torch.ones(1, dtype=torch.float64, device=device) for s in sites}
        self.set(p=config.p, target=config.target)

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
        on = {"input": self.config.sparsify_input, "intermediate": self.config.sparsify_intermediate}
        for site, tensor in self.p.items():
            tensor.fill_(self.config.p if on[site] else 1.0)

    def describe(self, model: torch.nn.Module | None = None) -> dict:
        """Settings, plus per-layer counters when ``model`` is given (copies them to the host)."""
        out = {**self.config.to_dict(), "targets": self.targets,
               "started_target": self.started_target}
        if model is not None:
            out["layers"] = [
                {"layer": m.quant_method.layer_index, "site": m.quant_method.site, "name": name,
                 "zeroed": int(c[0]), "total": int(c[1])}
                for name, m in sparse_layers(model) for c in [m.sparsity_counts.tolist()]]
        return out


def runtime_state(model: torch.nn.Module) -> RuntimeState | None:
    """The ``RuntimeState`` that ``replace_mlp`` attached to ``model``, or None."""
    return getattr(model, "_vllm_sparsity", None)


def replace_mlp(model: torch.nn.Module, config: SparsityConfig) -> list[str]:
    """Install the top-p rule on the target inputs of every gated MLP of ``model``.

    Idempotent: a model already converted is left alone. Logs one INFO line (model class, MLPs
    sparsified of all, target, p), or a warning when the model has no gated MLP (it is then served
    dense).

    Args:
        model: a vLLM model, built (its linear layers have their ``quant_method``); weights may
            be loaded or not.
        config: the resolved sparsity config.

    Returns:
        Qualified names of the linear layers that now apply the rule.

    Raises:
        NotImplementedError: tensor parallelism with target ``intermediate``/``all_inputs`` (each
            rank only sees a shard of the ``down_proj`` input; the global rule is not wired yet).
    """
    mlps, candidates = find_gated_mlps(model)
    if not mlps:
        logger.warning(
            "vllm-sparsity: %s has no gated MLP (gate_up_proj -> act-and-mul -> down_proj); "
            "serving it dense", type(model).__name__)
        return []
    if config.sparsify_intermediate and _vllm_compat.tp_world_size() > 1:
        raise NotImplementedError(
            "--sparsity-target intermediate/all_inputs with tensor parallelism is not supported "
            "yet: each TP rank only holds a shard of the down_proj input. Use --sparsity-target input.")
    if runtime_state(model) is not None:
        return []
    state = RuntimeState(config, next(model.parameters()).device)
    model._vllm_sparsity = state
    replaced = []
    for name, mlp in mlps:
        index = int(m.group(1)) if (m := _LAYER_INDEX.search(name + ".")) else len(replaced)
        for site, layer_name, on in (("input", "gate_up_proj", config.sparsify_input),
                                     ("intermediate", "down_proj", config.sparsify_intermediate)):
            layer = getattr(mlp, layer_name)
            if on:
                sparse_linear.install(layer, site, index, state.p[site])
                replaced.append(f"{name}.{layer_name}")
    logger.info(
        "vllm-sparsity: %s: sparsified %d of %d MLPs (target=%s, p=%g, backend=%s)",
        type(model).__name__, len(mlps), candidates, config.target, config.p, config.backend)
    return replaced


def sparse_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, layer)`` of every linear layer of ``model`` that applies the rule, in model order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "quant_method", None), sparse_linear.InputSparseLinearMethod)]
