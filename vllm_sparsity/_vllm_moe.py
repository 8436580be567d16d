"""Every place where the plugin reaches into vLLM's fused-MoE layers (tested against vLLM 0.32):
plain adapters for ``replace`` and ``sparse_moe``, as ``_vllm_compat`` is for the rest of vLLM.
Imports nothing of vllm_sparsity."""

from __future__ import annotations


def routed_experts_type():
    """vLLM's ``RoutedExperts``: the module of a fused-MoE layer that holds the experts' weights
    and calls ``quant_method.apply`` (``vllm/model_executor/layers/fused_moe/routed_experts.py``)."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    return RoutedExperts


def moe_refusal(experts) -> str | None:
    """Why the plugin cannot serve this ``RoutedExperts`` (None: it can). It needs vLLM's plain
    method (``UnquantizedFusedMoEMethod``: weights [E, N1, H] and [E, H, I] in the model's dtype)
    and every step's tokens on this rank, each routed to experts of this rank."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod)

    method, parallel = experts.quant_method, experts.moe_config.moe_parallel_config
    if not isinstance(method, UnquantizedFusedMoEMethod):
        return f"quantized experts ({type(method).__name__})"
    if parallel.use_ep:
        return "expert parallelism"
    if parallel.dp_size > 1 or parallel.is_sequence_parallel or parallel.pcp_size > 1:
        return "data, sequence or context parallel MoE"
    return None


def moe_k_shards(experts) -> int:
    """Over how many tensor-parallel ranks the experts' intermediate dimension is split."""
    return experts.moe_config.moe_parallel_config.tp_size


def moe_num_experts(experts) -> int:
    return experts.local_num_experts


def moe_act_and_mul(experts, method):
    """The experts' activation as a function h [P, N1] -> [P, I] (``N1 = 2I`` when gated), by
    vLLM's own ``apply_moe_activation`` with the layer's activation settings (SwiGLU limits,
    ...) (``vllm/model_executor/layers/fused_moe/activation.py``)."""
    from vllm.model_executor.layers.fused_moe.activation import (ApplyMoEActivationConfig,
                                                                 apply_moe_activation)

    activation = experts.activation
    quant_config = method.moe_quant_config or method.get_fused_moe_quant_config(experts)
    config = ApplyMoEActivationConfig.from_configs(experts.moe_config, quant_config)

    def act_and_mul(h):
        width = h.shape[-1] // 2 if activation.is_gated else h.shape[-1]
        return apply_moe_activation(activation, h.new_empty(h.shape[0], width), h,
                                    activation_config=config)

    return act_and_mul
