"""One vLLM engine on a tiny random MoE checkpoint (``python moe_process.py MODEL OUT MODE``), for
test_moe.py. The engine core and its worker run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
the V1 CPU runner), eager, in float32, without prefix caching (a prompt is computed again at each
p), prompts as token ids. What it saves to ``OUT`` (``torch.save``):

- MODE ``off`` (plugin off): ``tokens``: greedy continuations of ``PROMPTS``.
- MODE ``compiled``: vLLM's default torch.compile (Inductor) instead of eager, plugin on at
  p = ``P_LOW``: ``tokens``.
- MODE ``on`` (target all_inputs, p = 1 at start-up): ``tokens`` {p: continuations} at p = 1 and
  ``P_LOW``; ``records``: at ``P_CHECK``, every routed-experts call of one request, per layer
  (the experts' input, the router's weights and experts, the output) with ``expert_stats``
  {site name: int64 [E, 2]} and the route's ``experts`` rows after it; ``report``: the route's
  ``experts`` rows after ``PROMPTS`` at p = ``P_REPORT``.
"""

from __future__ import annotations

import os
import sys

P_LOW, P_CHECK, P_REPORT = 0.5, 0.7, 0.9
PROMPTS = [[510, 17, 42, 99, 256, 3, 77, 401], [510, 300, 12, 12, 480, 65, 9, 150, 222, 31],
           [510, 5, 6, 7, 8, 9], [510, 444, 333, 222, 111]]
MAX_TOKENS = 8


def _generate(llm, prompts, max_tokens=MAX_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


def _route_experts(state) -> list[dict]:
    from vllm_sparsity import counters

    return counters.route_experts(counters.merge([counters.snapshot(state, 0, None)]))


def main(model: str, out_path: str, mode: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM

    from vllm_sparsity.sparse_moe import SparseFusedMoEMethod
    from vllm_sparsity.state import runtime_state

    p = {"on": 1.0, "compiled": P_LOW}.get(mode)
    extra = {"additional_config": {"sparsity": {"p": p}}} if p is not None else {}
    llm = LLM(model, enforce_eager=mode != "compiled", dtype="float32", max_model_len=128,
              max_num_seqs=4, max_num_batched_tokens=128, kv_cache_memory_bytes=32 << 20,
              skip_tokenizer_init=True, enable_prefix_caching=False, **extra)
    if mode in ("off", "compiled"):
        torch.save({"tokens": _generate(llm, PROMPTS)}, out_path)
        return
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker
    model_ = worker.worker.model_runner.get_model()
    state = runtime_state(model_)
    result = {"tokens": {}}
    for p in (1.0, P_LOW):
        state.set(p=p)
        result["tokens"][p] = _generate(llm, PROMPTS)

    # One request at P_CHECK, every routed-experts call recorded.
    state.set(p=P_CHECK)
    state.reset_counters()
    records = []
    # Named after the RoutedExperts module that holds the method, as the state names its sites.
    methods = [(n, m.quant_method) for n, m in model_.named_modules()
               if isinstance(getattr(m, "quant_method", None), SparseFusedMoEMethod)]
    for name, method in methods:
        def recording(layer, x, topk_weights, topk_ids, *args, _apply=method.apply, _name=name,
                      _method=method, **kwargs):
            y = _apply(layer, x, topk_weights, topk_ids, *args, **kwargs)
            records.append({"name": _name,
                            "layer": next(iter(_method.sites.values())).layer_index,
                            "x": x.clone(), "weights": topk_weights.clone(),
                            "ids": topk_ids.clone(), "y": y.clone()})
            return y
        method.apply = recording
    _generate(llm, PROMPTS[:1], max_tokens=4)
    for _, method in methods:
        del method.apply
    result["records"] = records
    result["expert_stats"] = {name: layer.sparsity_expert_stats.clone()
                              for name, layer in state.layers}
    result["route_experts"] = _route_experts(state)

    state.set(p=P_REPORT)
    state.reset_counters()
    _generate(llm, PROMPTS, max_tokens=32)
    result["report"] = _route_experts(state)
    torch.save(result, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
