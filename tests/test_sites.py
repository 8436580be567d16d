"""Rules and sites at the seam: which backend serves a rule, every rule through the torch
backend of a linear layer, and the analysis sites gate and up on a small gated MLP, each against
the sort references of tests/reference.py applied by hand."""

import functools

import pytest
import torch
import torch.nn.functional as F
from layers import make_layer, sparse

from reference import paper_top_p_mask, sort_lq_mask, sort_max_p_mask, sort_top_k_mask
from vllm_sparsity import backends
from vllm_sparsity.counters import PREFILL, TOTAL, ZEROED

REFERENCES = {  # rule name -> (q, reference mask of (x, p))
    "top-p": (None, paper_top_p_mask),
    "top-k": (None, sort_top_k_mask),
    "max-p": (None, sort_max_p_mask),
    "lq": (2.5, functools.partial(sort_lq_mask, q=2.5)),
}


def _activations(m, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).mul(3).exp()).to(
        torch.bfloat16)


@pytest.mark.parametrize("rule", ["top-k", "max-p", "lq"])
def test_auto_picks_torch_for_rules_the_kernels_do_not_run(rule):
    layer = make_layer(64, 32)
    assert backends.choose(layer, "auto", rule) == ("torch", {})  # no kernel tried, no warning
    for kernel in backends.TOP_P_ONLY:
        with pytest.raises(ValueError, match=f"--sparsity-backend {kernel} cannot serve this "
                           f"model: its kernels implement the top-p rule only, not {rule}"):
            backends.choose(layer, kernel, rule)


@pytest.mark.parametrize("rule", sorted(REFERENCES))
@pytest.mark.parametrize("p", [0.3, 0.8])
def test_every_rule_through_the_torch_backend_equals_its_reference(rule, p):
    q, reference = REFERENCES[rule]
    layer = make_layer(96, 40)
    sparse(layer, p, backend="torch", rule=rule, q=q)
    x = _activations(7, 96, seed=1)
    y = layer.quant_method.apply(layer, x)
    mask = reference(x.float(), p)
    assert torch.equal(y, F.linear(torch.where(mask, x, 0), layer.weight))
    stats = layer.sparsity_stats[PREFILL]
    assert (stats[ZEROED].item(), stats[TOTAL].item()) == ((~mask).sum().item(), x.numel())


# ---------------------------------------------------------------- the analysis sites gate and up

D, HIDDEN, TOKENS = 48, 32, 6


def _act_and_mul(kind):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul

    with set_current_vllm_config(VllmConfig()):
        return SiluAndMul() if kind == "silu" else GeluAndMul(approximate="tanh")


def _act(kind, g):
    """act(gate) by hand: the activation in float32, rounded once to g's dtype."""
    f = F.silu(g.float()) if kind == "silu" else F.gelu(g.float(), approximate="tanh")
    return f.to(g.dtype)


def _mlp_with_sites(kind, target, p, rule="top-p", q=None):
    """A gated MLP's act-and-mul with ``sparse_act`` installed at the target's analysis sites."""
    from vllm_sparsity import sparse_act
    from vllm_sparsity.config import SparsityConfig
    from vllm_sparsity.state import RuntimeState

    config = SparsityConfig(p=p, target=target, rule=rule, q=q)
    state = RuntimeState(config, torch.device("cpu"), 64, metrics_on=True)
    mlp = torch.nn.Module()
    mlp.act_fn = _act_and_mul(kind)
    inner = mlp.act_fn
    sparse_act.install(mlp, "mlp", config.sites, 2, state)
    return mlp, inner, state


def _h(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, HIDDEN, generator=g) * torch.rand(TOKENS, 1, generator=g).mul(2).exp()
    w = torch.randn(2 * D, HIDDEN, generator=g) * HIDDEN**-0.5
    return F.linear(x, w).to(torch.bfloat16)  # gate_up_proj's output [T, 2D]


@pytest.mark.parametrize("kind", ["silu", "gelu"])
@pytest.mark.parametrize("target", ["gate", "up", "gate,up"])
@pytest.mark.parametrize("rule", sorted(REFERENCES))
def test_gate_and_up_sites_equal_the_sort_reference_by_hand(kind, target, rule):
    q, reference = REFERENCES[rule]
    p = 0.6
    mlp, inner, state = _mlp_with_sites(kind, target, p, rule, q)
    h = _h(seed=len(target))
    y = mlp.act_fn(h)

    g, u = h[:, :D], h[:, D:]
    keep_u = reference(u.float(), p) if "up" in target else torch.ones_like(u, dtype=torch.bool)
    keep_a = reference(_act(kind, g).float(), p) if "gate" in target else torch.ones_like(keep_u)
    u_sparse = torch.where(keep_u, u, 0)
    # The product of the kept entries, in float32 by hand (the op may round differently).
    want = torch.where(keep_a, _act(kind, g).float() * u_sparse.float(), 0)
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)
    assert torch.equal(y == 0, (want == 0) | (y == 0) & (want.abs() < 1e-2))  # zeros where cut
    assert torch.equal(y, torch.where(keep_a, inner(torch.cat([g, u_sparse], -1)), 0))

    counted = {name.rsplit(".", 1)[1]: layer.sparsity_stats[PREFILL] for name, layer in
               state.layers}
    assert sorted(counted) == sorted(target.split(","))
    for site, keep in (("gate", keep_a), ("up", keep_u)):
        if site in counted:
            assert (counted[site][ZEROED].item(), counted[site][TOTAL].item()) == (
                (~keep).sum().item(), keep.numel())


@pytest.mark.parametrize("kind", ["silu", "gelu"])
def test_gate_and_up_at_p_one_are_the_dense_op_bit_for_bit(kind):
    mlp, inner, _ = _mlp_with_sites(kind, "gate,up", 1.0)
    h = _h(seed=5)
    assert torch.equal(mlp.act_fn(h), inner(h))
    assert torch.equal(mlp.act_fn(h[None]), inner(h)[None])  # leading dims kept


def test_counters_snapshot_reads_the_analysis_sites():
    from vllm_sparsity import counters

    mlp, _, state = _mlp_with_sites("silu", "gate,up", 0.5)
    mlp.act_fn(_h())
    snap = counters.snapshot(state, 0, None)
    assert [row[:3] for row in snap["sites"]] == [[2, "gate", "mlp.act_fn.gate"],
                                                  [2, "up", "mlp.act_fn.up"]]
    assert [row[3] for row in snap["sites"]] == [0, 0]  # no weight: no bytes skipped
    assert snap["p_by_site"] == {"gate": 0.5, "up": 0.5}


def test_up_site_follows_each_requests_own_p():
    """p per request at an analysis site: the rows of a request carrying p 0.3 follow the rule at
    0.3, the others the server's 0.9 (its layers read the per-token p, as the linear sites)."""
    from vllm_sparsity import _vllm_compat

    mlp, inner, state = _mlp_with_sites("silu", "up", 0.9)
    state.bind_query_start_loc(torch.tensor([0, 3, TOKENS], dtype=torch.int32), "Runner")
    state.set_request_p([0.3, float("nan")])
    state.mark_phases(TOKENS, _vllm_compat.STEP)
    h = _h(seed=9)
    y = mlp.act_fn(h)
    g, u = h[:, :D], h[:, D:]
    keep = torch.cat([paper_top_p_mask(u[:3].float(), 0.3),
                      paper_top_p_mask(u[3:].float(), 0.9)])
    assert torch.equal(y, inner(torch.cat([g, torch.where(keep, u, 0)], -1)))
