"""Routed experts at the seam (``vllm_sparsity.sparse_moe``), without a vLLM engine: the torch
experts against a naive loop over tokens and their routed experts; the ``input`` site (one mask per
token) and the ``intermediate`` site (one mask per (token, expert) pair) against the paper's sort
rule (tests/reference.py) applied in that loop, with the per-expert and per-site counters; the
``input`` site alone handing vLLM's kernel the sparsified input; tracing under torch.compile; and
the merge of per-expert counters over TP ranks."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from reference import loop_moe_reference, paper_top_p_mask
from vllm_sparsity import _vllm_compat, _vllm_moe, counters, sparse_moe
from vllm_sparsity.config import SparsityConfig
from vllm_sparsity.counters import DECODE, PAD, PREFILL, TOTAL, ZEROED
from vllm_sparsity.state import RuntimeState

E, H, I, K_TOP, M = 6, 40, 24, 2, 9


def _routing(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, E, generator=g)
    weights, ids = logits.softmax(-1).topk(k)
    return weights, ids.to(torch.int32)


class PlainMoE:
    """Stand-in for vLLM's ``UnquantizedFusedMoEMethod``: records the input its kernel got and
    whether its after-loading step ran; its kernel is the dense torch experts."""

    is_monolithic = False
    supports_pre_processed_weights = True
    skip_forward_padding = False
    has_unpadded_output = False
    moe_kernel = "vLLM's kernel"

    def __init__(self):
        from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

        self.moe = None
        self.moe_quant_config = FusedMoEQuantConfig.make()
        self.inputs, self.processed = [], False

    def process_weights_after_loading(self, layer):
        self.processed = True

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        self.inputs.append(x)
        return sparse_moe.experts_forward(x, layer.w13_weight, layer.w2_weight, topk_weights,
                                          topk_ids, _silu_and_mul)


def _silu_and_mul(h):
    d = h.shape[-1] // 2
    return (F.silu(h[:, :d].float()) * h[:, d:].float()).to(h.dtype)


def _experts(dtype=torch.float32, seed=0, bias=False):
    """A ``RoutedExperts`` as the seam reads it: weights [E, 2I, H] / [E, H, I], SiLU, no TP."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Module()
    layer.w13_weight = torch.nn.Parameter(
        (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dtype), requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(
        (torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype), requires_grad=False)
    if bias:
        layer.w13_bias = torch.nn.Parameter(torch.randn(E, 2 * I, generator=g).to(dtype),
                                            requires_grad=False)
        layer.w2_bias = torch.nn.Parameter(torch.randn(E, H, generator=g).to(dtype),
                                           requires_grad=False)
    layer.activation = MoEActivation.SILU
    layer.apply_router_weight_on_input = False
    layer.local_num_experts = E
    layer.moe_config = SimpleNamespace(
        swiglu_limit=None, swiglu_alpha=None, swiglu_beta=None, activation_situ_beta=None,
        activation_situ_linear_beta=None, moe_parallel_config=SimpleNamespace(tp_size=1))
    layer.quant_method = PlainMoE()
    return layer


def _x(m=M, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, H, generator=g) * torch.rand(m, 1, generator=g).mul(3).exp()).to(dtype)


def _sparse(layer, p, target="all_inputs", phases=None):
    state = RuntimeState(SparsityConfig(p=p, target=target), torch.device("cpu"), 32)
    if phases is not None:
        state.phase[:len(phases)] = torch.tensor(phases)
    sparse_moe.install(layer, "model.layers.3.mlp.experts.routed_experts",
                       tuple(s for s in state.config.sites if s in sparse_moe.EXPERT_SITES), 3,
                       state)
    layer.quant_method.process_weights_after_loading(layer)
    return state


def loop_reference(layer, x, weights, ids, p_input=None, p_inter=None, phases=None):
    """``reference.loop_moe_reference`` on ``layer``'s weights; ``phases``: PAD tokens are not
    counted."""
    return loop_moe_reference(
        layer.w13_weight, layer.w2_weight, x, weights, ids, p_input, p_inter,
        None if phases is None else [ph != PAD for ph in phases],
        getattr(layer, "w13_bias", None), getattr(layer, "w2_bias", None))


# ---------------------------------------------------------------- the torch experts


@pytest.mark.parametrize("dtype, atol, rtol", [
    (torch.float32, 1e-5, 1e-5),  # fp32 GEMMs against float64: summation order only
    (torch.bfloat16, 0.02, 0.01),  # the same roundings; one bf16 ulp where a GEMM rounds apart
])
@pytest.mark.parametrize("bias", [False, True])
def test_torch_experts_equal_a_loop_over_tokens_and_routed_experts(dtype, atol, rtol, bias):
    layer = _experts(dtype, bias=bias)
    x = _x(M, dtype)
    weights, ids = _routing(M, K_TOP, seed=2)
    y = sparse_moe.experts_forward(x, layer.w13_weight, layer.w2_weight, weights, ids,
                                   _silu_and_mul, getattr(layer, "w13_bias", None),
                                   getattr(layer, "w2_bias", None))
    ref, _ = loop_reference(layer, x, weights, ids)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)


def test_router_weight_on_input_scales_the_input_not_the_output():
    layer = _experts()
    x = _x(5)
    weights, ids = _routing(5, 1, seed=3)  # vLLM allows it with top-1 only
    y = sparse_moe.experts_forward(x, layer.w13_weight, layer.w2_weight, weights, ids,
                                   _silu_and_mul, weight_on_input=True)
    ref = torch.stack([
        layer.w2_weight[e] @ _silu_and_mul((layer.w13_weight[e] @ (w * xt))[None])[0]
        for xt, w, e in zip(x, weights[:, 0], ids[:, 0].tolist())])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the sites


@pytest.mark.parametrize("target", ["input", "intermediate", "all_inputs"])
@pytest.mark.parametrize("p", [0.5, 0.85])
def test_sites_equal_the_sort_rule_per_token_and_per_pair(target, p):
    layer = _experts()
    phases = [PREFILL] * 5 + [DECODE] * 3 + [PAD]  # the padding token is never counted
    state = _sparse(layer, p, target, phases)
    x = _x()
    weights, ids = _routing(M, K_TOP, seed=4)
    y = layer.quant_method.apply(layer, x, weights, ids)
    sites = state.config.sites
    ref, counts = loop_reference(layer, x, weights, ids,
                                 p if "input" in sites else None,
                                 p if "intermediate" in sites else None, phases)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert [name for name, _ in state.layers] == [
        f"model.layers.3.mlp.experts.routed_experts.{s}" for s in sites]
    for name, site in state.layers:
        expected = counts[site.site]
        assert torch.equal(site.sparsity_expert_stats, expected), name
        # The site's own rows: per token (input) or per pair (intermediate), by phase.
        rows_per_token = 1 if site.site == "input" else K_TOP
        per_row = H if site.site == "input" else I
        assert site.sparsity_stats[PREFILL, TOTAL] == 5 * rows_per_token * per_row
        assert site.sparsity_stats[DECODE, TOTAL] == 3 * rows_per_token * per_row
        # Each token's input is counted once per routed expert in the per-expert counters.
        input_zeroed = site.sparsity_stats[:PAD, ZEROED].sum()
        scale = K_TOP if site.site == "input" else 1
        assert input_zeroed * scale == expected[:, ZEROED].sum()
    assert not layer.quant_method.inner.processed or target == "input"


def test_sites_follow_each_requests_own_p():
    """p per request (``request_p``): the tokens of a request carrying p 0.4 follow the rule at
    0.4 at both sites, the others the server's 0.85; each p's rows go to its per-p counters."""
    layer = _experts()
    state = _sparse(layer, 0.85)
    first = 4  # request 0: tokens 0-3 at p 0.4; request 1: tokens 4-8 without a p
    state.bind_query_start_loc(torch.tensor([0, first, M], dtype=torch.int32), "Runner")
    state.set_request_p([0.4, float("nan")])
    state.mark_phases(M, _vllm_compat.STEP)
    x = _x()
    weights, ids = _routing(M, K_TOP, seed=10)
    y = layer.quant_method.apply(layer, x, weights, ids)
    parts = [loop_reference(layer, x[rows], weights[rows], ids[rows], p, p)
             for rows, p in ((slice(0, first), 0.4), (slice(first, M), 0.85))]
    torch.testing.assert_close(y.double(), torch.cat([ref for ref, _ in parts]),
                               atol=1e-5, rtol=1e-5)
    slot = state.p_slots_by_key()[repr(0.4)]
    for _, site in state.layers:
        expert_counts = [counts[site.site] for _, counts in parts]
        assert torch.equal(site.sparsity_expert_stats, sum(expert_counts))
        # Per-p counters: per row (a token at input, a pair at intermediate), not per expert.
        scale = K_TOP if site.site == "input" else 1
        zeroed = expert_counts[0][:, ZEROED].sum() // scale
        assert site.sparsity_p_stats[slot, ZEROED] == zeroed
        assert site.sparsity_p_stats[slot, TOTAL] == expert_counts[0][:, TOTAL].sum() // scale


def test_p_1_equals_the_dense_torch_experts_bit_for_bit():
    layer = _experts(torch.bfloat16)
    _sparse(layer, 1.0)
    x = _x(dtype=torch.bfloat16)
    weights, ids = _routing(M, K_TOP, seed=5)
    act = _vllm_moe.moe_act_and_mul(layer, layer.quant_method.inner)  # the method's own
    dense = sparse_moe.experts_forward(x, layer.w13_weight, layer.w2_weight, weights, ids, act)
    assert torch.equal(layer.quant_method.apply(layer, x, weights, ids), dense)


def test_input_alone_runs_vllms_kernel_on_the_sparsified_input():
    layer = _experts()
    inner = layer.quant_method
    _sparse(layer, 0.6, "input")
    method = layer.quant_method
    assert inner.processed and method.moe_kernel == "vLLM's kernel"  # vLLM's step and kernel
    x = _x()
    weights, ids = _routing(M, K_TOP, seed=6)
    method.apply(layer, x, weights, ids)
    expected = torch.where(paper_top_p_mask(x, 0.6), x, 0)
    assert len(inner.inputs) == 1 and torch.equal(inner.inputs[0], expected)


def test_intermediate_site_keeps_the_checkpoint_weights_for_the_torch_experts():
    layer = _experts()
    inner = layer.quant_method
    _sparse(layer, 0.6, "intermediate")
    # vLLM's step would repack the weights for its kernel, which the torch experts bypass.
    assert not inner.processed and layer.quant_method.moe_kernel is None


def test_sites_refuse_what_routed_experts_do_not_take():
    layer = _experts()
    state = RuntimeState(SparsityConfig(p=0.5, target="gate"), torch.device("cpu"), 8)
    with pytest.raises(ValueError, match=r"sites must be a non-empty subset of \('input', "
                       r"'intermediate'\), got \('gate',\)"):
        sparse_moe.SparseFusedMoEMethod(layer.quant_method, ("gate",), 0, E, state)


def test_the_sites_trace_as_one_graph_under_torch_compile():
    layer = _experts()
    _sparse(layer, 0.7)
    x = _x()
    weights, ids = _routing(M, K_TOP, seed=7)
    eager = layer.quant_method.apply(layer, x, weights, ids)
    compiled = torch.compile(layer.quant_method.apply, fullgraph=True, dynamic=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(layer, x, weights, ids), eager, atol=0, rtol=0)


def test_reset_zeroes_the_per_expert_counters():
    layer = _experts()
    state = _sparse(layer, 0.7)
    weights, ids = _routing(M, K_TOP, seed=8)
    layer.quant_method.apply(layer, _x(), weights, ids)
    assert all(site.sparsity_expert_stats.sum() > 0 for _, site in state.layers)
    state.reset_counters()
    assert all(site.sparsity_expert_stats.sum() == 0 for _, site in state.layers)


# ---------------------------------------------------------------- analysis output


def test_snapshot_and_merge_give_per_expert_counters_under_tp():
    layer = _experts()
    state = _sparse(layer, 0.7)
    weights, ids = _routing(M, K_TOP, seed=9)
    layer.quant_method.apply(layer, _x(), weights, ids)
    snap = counters.snapshot(state, 0, None)
    by_site = {row[1]: row for row in snap["experts"]}
    for _, site in state.layers:
        zeroed, total = site.sparsity_expert_stats.t().tolist()
        assert by_site[site.site] == [3, site.site, f"model.layers.3.mlp.experts."
                                      f"routed_experts.{site.site}", False, zeroed, total]
    # Two TP ranks: the intermediate site split over them (each counts its shard), the input
    # replicated (rank 0 speaks for it).
    rank0 = {**snap, "experts": [[3, "input", "n.input", False, [1, 2], [10, 10]],
                                 [3, "intermediate", "n.intermediate", True, [3, 0], [6, 6]]]}
    rank1 = {**snap, "tp_rank": 1,
             "experts": [[3, "input", "n.input", False, [1, 2], [10, 10]],
                         [3, "intermediate", "n.intermediate", True, [1, 5], [6, 6]]]}
    rows = counters.route_experts(counters.merge([rank0, rank1]))
    assert rows == [
        {"layer": 3, "site": "input", "name": "n.input", "zeroed": [1, 2], "total": [10, 10],
         "split": False},
        {"layer": 3, "site": "intermediate", "name": "n.intermediate", "zeroed": [4, 5],
         "total": [12, 12], "split": True}]
