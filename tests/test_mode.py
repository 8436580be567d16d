"""``--sparsity-mode`` on a layer the seam replaced (cpu backend, its crossover fixed at M_MAX):
past the crossover, ``speed`` is the plugin-off layer bit for bit and counts nothing zeroed, while
``exact`` is vLLM's dense GEMM on the rule's output; up to it both run the rule's sparse GEMV. And
the crossover of each layer as the snapshot and ``GET /v1/sparsity`` report it.

References: the plugin-off layer is the same weights under vLLM's own ``UnquantizedLinearMethod``
(the dense GEMM the cpu backend calls past the crossover, so equality is exact); the rule's kept
set is the paper's sort rule (``reference.paper_top_p_mask``)."""

import dataclasses

import pytest
import torch
from layers import expected_stats, make_layer, sparse

from reference import paper_top_p_mask
from vllm_sparsity import counters
from vllm_sparsity.counters import COLS_READ, COLS_TOTAL, PREFILL, TOTAL, ZEROED
from vllm_sparsity.kernels import cpu_backend, crossover

ISA, NO_ISA = cpu_backend.select_isa()
if NO_ISA is not None:  # a machine without the instruction set: the cpu backend cannot run
    pytest.skip(f"cpu kernels unavailable here: {NO_ISA}", allow_module_level=True)
BUILD_FAILED = cpu_backend._load()

K, N, P = 301, 137, 0.5  # odd shape: no multiple of the vector width or the group of 4 rows
M_MAX = 2


@pytest.fixture(autouse=True)
def fixed_crossover(monkeypatch):
    if BUILD_FAILED is not None:
        pytest.fail(f"the {ISA} build failed on a CPU that has its instruction set: "
                    f"{BUILD_FAILED}", pytrace=False)
    monkeypatch.setenv(crossover.ENV, str(M_MAX))


def vllm_layer(seed=0):
    """The plugin-off layer: ``make_layer``'s weights under vLLM's unquantized method."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    layer = make_layer(K, N, seed=seed)
    layer.quant_method = UnquantizedLinearMethod()
    return layer


def replaced(mode, backend="cpu"):
    layer = vllm_layer()
    state = sparse(layer, P, backend=backend, metrics=True, mode=mode)
    return layer, state


def dense_layer():
    layer = vllm_layer()
    layer.quant_method.process_weights_after_loading(layer)
    return lambda x: layer.quant_method.apply(layer, x)


def inputs(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(m, 1, generator=g).mul(3).exp()  # rows of different magnitudes
    return (torch.randn(m, K, generator=g) * scale).to(torch.bfloat16)


def test_speed_mode_past_the_crossover_is_the_plugin_off_layer():
    layer, _ = replaced("speed")
    dense = dense_layer()
    x = inputs(M_MAX + 3)
    y = layer.quant_method.apply(layer, x)
    assert torch.equal(y, dense(x))
    assert not torch.equal(y, dense(torch.where(paper_top_p_mask(x.float(), P), x, 0)))
    stats = layer.sparsity_stats
    assert stats[PREFILL, ZEROED] == 0 and stats[PREFILL, TOTAL] == x.numel()
    assert stats[PREFILL, COLS_READ] == K and stats[PREFILL, COLS_TOTAL] == K
    # The branch is taken inside the op at run time: one traced graph serves both sides of it.
    compiled = torch.compile(lambda x: layer.quant_method.apply(layer, x), backend="aot_eager",
                             fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), dense(x))
    exact = dense(torch.where(paper_top_p_mask(x[:1].float(), P), x[:1], 0))
    torch.testing.assert_close(compiled(x[:1]), exact, rtol=2**-7, atol=1e-2)


def test_exact_mode_past_the_crossover_is_the_rule():
    layer, _ = replaced("exact")
    dense = dense_layer()
    x = inputs(M_MAX + 3)
    y = layer.quant_method.apply(layer, x)
    assert torch.equal(y, dense(torch.where(paper_top_p_mask(x.float(), P), x, 0)))
    want = expected_stats(x, P, [PREFILL] * len(x), PREFILL, K)
    assert torch.equal(layer.sparsity_stats, want)


@pytest.mark.parametrize("mode", ["exact", "speed"])
def test_both_modes_run_the_rule_up_to_the_crossover(mode):
    layer, _ = replaced(mode)
    x = inputs(M_MAX, seed=2)
    y = layer.quant_method.apply(layer, x)
    mask = paper_top_p_mask(x.float(), P)
    ref = torch.where(mask, x, 0).double() @ layer.sparsity_wt.double()
    torch.testing.assert_close(y.double(), ref, rtol=2**-7, atol=1e-2)  # bf16 output rounding
    want = expected_stats(x, P, [PREFILL] * len(x), PREFILL, int(mask.any(0).sum()))
    assert int(mask.any(0).sum()) < K
    assert torch.equal(layer.sparsity_stats, want)


def test_crossover_of_each_layer_in_the_snapshot_and_the_route():
    layer, state = replaced("exact")
    torch_layer, torch_state = replaced("exact", backend="torch")
    state.layers += torch_state.layers  # one worker with both kinds of layer
    torch_layer.sparsity_site = dataclasses.replace(torch_layer.sparsity_site, layer_index=4)
    snap = counters.snapshot(state, 0, None)
    fixed = {"m_max": M_MAX, "measured": False, "source": crossover.ENV}
    assert snap["crossover"] == [fixed, None]
    rows = counters.route_layers(counters.merge([snap, {**snap, "tp_rank": 1}]))
    assert [(r["layer"], r["crossover"]) for r in rows] == [(3, fixed), (4, None)]
