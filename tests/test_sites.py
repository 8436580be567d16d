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

