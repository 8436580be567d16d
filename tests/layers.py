"""A linear layer as the seam sees it, without vLLM's model machinery: a module with a [N, K]
``weight`` Parameter and a plain ``quant_method``; the seam installed on it; and the counters it
should then hold, from the paper's sort rule and exact fractions."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.linear import LinearMethodBase

from reference import paper_top_p_mask
from vllm_sparsity import counters, sparse_linear
from vllm_sparsity.config import SparsityConfig
from vllm_sparsity.state import RuntimeState


class PlainLinear(LinearMethodBase):
    """Stand-in for vLLM's unquantized method: F.linear, nothing to do after loading."""

    def create_weights(self, *args, **kwargs):
        raise NotImplementedError

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)


def make_layer(K: int, N: int, dtype=torch.bfloat16, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Module()
    w = torch.randn(N, K, generator=g).mul(K**-0.5).to(dtype)
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    layer.weight.weight_loader = "loader"  # an attribute vLLM attaches; must survive prepare
    layer.quant_method = PlainLinear()
    return layer


def sparse(layer: torch.nn.Module, p: float, backend: str = "torch", metrics: bool = False,
           site: str = "input", max_tokens: int = 64, rule: str = "top-p",
           q: float | None = None, mode: str = "exact") -> RuntimeState:
    """Install the seam on ``layer`` at ``site`` as ``replace_mlp`` does (weights then prepared);
    return the state holding its p and phase buffers (every token prefill until changed)."""
    state = RuntimeState(SparsityConfig(p=p, target=site, backend=backend, rule=rule, q=q,
                                        mode=mode), torch.device("cpu"), max_tokens, metrics)
    sparse_linear.install(layer, "layer", site, 3, state, backend)
    layer.quant_method.process_weights_after_loading(layer)
    return state


def expected_stats(x: torch.Tensor, p: float, phases: list[int], batch_phase: int,
                   columns_read: int) -> torch.Tensor:
    """The seam's [3, WIDTH] counters (metrics on) for one call on x [M, K] whose tokens have
    ``phases``, from the paper's sort rule and exact fractions."""
    K = x.shape[1]
    kept = paper_top_p_mask(x.float(), p).sum(-1).tolist()
    out = torch.zeros(3, counters.WIDTH, dtype=torch.int64)
    nb = counters.SPARSITY_BUCKETS
    for k, phase in zip(kept, phases):
        z = K - k
        out[phase, counters.ZEROED] += z
        out[phase, counters.TOTAL] += K
        # Bucket i holds sparsity in (i/NB, (i+1)/NB], 0 in bucket 0.
        out[phase, counters.HIST + max(0, math.ceil(Fraction(z, K) * nb) - 1)] += 1
    out[batch_phase, counters.COLS_READ] += columns_read
    out[batch_phase, counters.COLS_TOTAL] += K
    return out
