"""replace_mlp under tensor parallelism, through vLLM's own TP group: two gloo processes set up
vLLM's parallel state, build a gated MLP of vLLM's parallel layers (TP = 2), let ``replace_mlp``
swap it, and run it eager and under torch.compile. The ``intermediate`` site must keep, on each
rank, its slice of the whole rows' top-p set (the paper's rule on the unsharded down_proj input)."""

import os

import torch
from gloo_ranks import run_ranks

from reference import paper_top_p_mask

HIDDEN, INTER, TOKENS, P = 64, 96, 5, 0.6  # INTER is split 48 + 48 over the two ranks


def _weights():
    g = torch.Generator().manual_seed(0)
    return {"gate": torch.randn(INTER, HIDDEN, generator=g) * HIDDEN**-0.5,
            "up": torch.randn(INTER, HIDDEN, generator=g) * HIDDEN**-0.5,
            "down": torch.randn(HIDDEN, INTER, generator=g) * INTER**-0.5,
            "x": torch.randn(TOKENS, HIDDEN, generator=g)
            * torch.rand(TOKENS, 1, generator=g).mul(3).exp()}


def _mlp_on_rank(rank, world_size, ident):
    """One rank: vLLM's TP group over the gloo world, the MLP's output (eager and compiled), the
    down_proj input shard it saw and its counters."""
    os.environ["VLLM_DIST_IDENT"] = ident  # names vLLM's CPU shared-memory group, as its workers do
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    from vllm_sparsity.config import SparsityConfig
    from vllm_sparsity.replace import replace_mlp

    class GatedMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = MergedColumnParallelLinear(HIDDEN, [INTER] * 2, bias=False)
            self.act_fn = SiluAndMul()
            self.down_proj = RowParallelLinear(INTER, HIDDEN, bias=False)

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_up_proj(x)[0]))[0]

    with set_current_vllm_config(VllmConfig()):
        parallel_state.init_distributed_environment(world_size, rank, local_rank=rank,
                                                    backend="gloo")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size,
                                                 backend="gloo")
        try:
            model = torch.nn.Module()
            model.layers = torch.nn.ModuleList([GatedMLP()])
            mlp = model.layers[0]
            w = _weights()
            mlp.gate_up_proj.weight.weight_loader(mlp.gate_up_proj.weight, w["gate"], 0)
            mlp.gate_up_proj.weight.weight_loader(mlp.gate_up_proj.weight, w["up"], 1)
            mlp.down_proj.weight.weight_loader(mlp.down_proj.weight, w["down"])
            replaced = replace_mlp(model, SparsityConfig(p=P, target="all_inputs", backend="torch"))
            for layer in (mlp.gate_up_proj, mlp.down_proj):
                layer.quant_method.process_weights_after_loading(layer)
            seen = []
            hook = mlp.down_proj.register_forward_pre_hook(
                lambda m, args: seen.append(args[0].clone()))
            y = mlp(w["x"])
            hook.remove()
            counts = mlp.down_proj.sparsity_counts.clone()
            y_compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)(w["x"])
            return {"replaced": replaced, "y": y, "y_compiled": y_compiled, "h": seen[0],
                    "counts": counts,
                    "reduces": [mlp.gate_up_proj.quant_method.all_reduce is None,
                                mlp.down_proj.quant_method.all_reduce is not None]}
        finally:
            parallel_state.destroy_model_parallel()


def test_intermediate_site_applies_the_global_rule_over_vllm_tp_group(tmp_path):
    ranks = run_ranks(_mlp_on_rank, 2, tmp_path, f"vllm-sparsity-test-{os.getpid()}")
    w = _weights()
    assert ranks[0]["replaced"] == ["layers.0.gate_up_proj", "layers.0.down_proj"]
    assert all(r["reduces"] == [True, True] for r in ranks)  # only down_proj's input is split
    h = torch.cat([r["h"] for r in ranks], dim=-1)  # the whole down_proj input [TOKENS, INTER]
    full = paper_top_p_mask(h, P)
    for r, cols in zip(ranks, (slice(0, INTER // 2), slice(INTER // 2, INTER))):
        zeroed = int((~full[:, cols]).sum())
        assert r["counts"].tolist() == [zeroed, TOKENS * INTER // 2]
    per_shard = [paper_top_p_mask(r["h"], P) for r in ranks]
    assert not torch.equal(torch.cat(per_shard, dim=-1), full)  # the test can fail
    y_ref = torch.where(full, h, 0).double() @ w["down"].double().t()
    for r in ranks:  # down_proj's output is all-reduced: the same on both ranks
        torch.testing.assert_close(r["y"].double(), y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["y_compiled"], r["y"])
