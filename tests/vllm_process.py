"""One process holding a real vLLM engine on the demo model (``python vllm_process.py OUT TMP``),
shared by the tests that need vLLM's worker-side state (one vLLM import for all of them; the
``vllm_process`` fixture of ``conftest.py`` runs it once per session and reads ``OUT``):

- ``engine``, for ``test_step.py``: what the plugin counts through warm-up and one request, and one
  decode step run under ``capture_guard.CaptureGuard``;
- ``replace``, for ``test_replace.py``: ``test_replace.replace_cases`` run once the engine is up
  (they need vLLM's parallel state, which the engine set up).

The engine core and its worker run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the V1 CPU
runner, eager), so that the worker's model can be reached. Warm-up is made to do what Model
Runner V2's ``warmup_kernels`` (``vllm/v1/worker/gpu/warmup.py``) does on CUDA: after the CPU
worker's own warm-up, a fake request's prefill and decode steps go through
``Worker.execute_model``. The counters are read right after those steps, then after start-up, then
after one request (``PROMPT``, ``MAX_TOKENS`` tokens generated: one prefill step of
``len(PROMPT)`` tokens, then ``MAX_TOKENS - 1`` decode steps of one token).
"""

from __future__ import annotations

import os
import sys

PROMPT = [2, 818, 5279, 529, 7001, 563, 236764]
MAX_TOKENS = 3
FAKE_PROMPT = list(range(10, 16))


def _fake_request(worker) -> None:
    """A fake request's prefill, one decode step and its cleanup, as V2's warm-up builds them."""
    from vllm import SamplingParams
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    req = "_warmup_0_"
    groups = worker.model_runner.kv_cache_config.kv_cache_groups
    prefill = SchedulerOutput.make_empty()
    prefill.scheduled_new_reqs = [NewRequestData(
        req_id=req, prompt_token_ids=FAKE_PROMPT, mm_features=[],
        sampling_params=SamplingParams(max_tokens=2, temperature=0.0), pooling_params=None,
        block_ids=tuple([1] for _ in groups), num_computed_tokens=0, lora_request=None)]
    prefill.num_scheduled_tokens = {req: len(FAKE_PROMPT)}
    prefill.total_num_scheduled_tokens = len(FAKE_PROMPT)
    worker.execute_model(prefill)
    worker.sample_tokens(None)
    cached = CachedRequestData.make_empty()
    cached.req_ids, cached.num_computed_tokens = [req], [len(FAKE_PROMPT)]
    cached.num_output_tokens, cached.new_block_ids = [1], [None]
    decode = SchedulerOutput.make_empty()
    decode.scheduled_cached_reqs = cached
    decode.num_scheduled_tokens = {req: 1}
    decode.total_num_scheduled_tokens = 1
    worker.execute_model(decode)
    worker.sample_tokens(None)
    cleanup = SchedulerOutput.make_empty()
    cleanup.finished_req_ids = {req}
    worker.execute_model(cleanup)


def _counts(model) -> list[dict]:
    """Per sparse layer: name, K and the activations counted per phase row (TOTAL column)."""
    from vllm_sparsity.counters import TOTAL
    from vllm_sparsity.state import runtime_state

    return [{"name": name, "K": layer.input_size_per_partition,
             "total": layer.sparsity_stats[:, TOTAL].tolist()}
            for name, layer in runtime_state(model).layers]


def engine() -> dict:
    """The engine scenario of the module doc; the engine stays up (its parallel state too)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.v1.worker.cpu_worker import CPUWorker

    from capture_guard import CaptureGuard
    from vllm_sparsity.tools.demo_model import demo_model_path

    result = {}
    warm_up = CPUWorker.compile_or_warm_up_model

    def warm_up_with_fake_requests(self):
        times = warm_up(self)
        _fake_request(self)
        result["after_fake_requests"] = _counts(self.model_runner.get_model())
        return times

    CPUWorker.compile_or_warm_up_model = warm_up_with_fake_requests
    # Small on purpose (start-up time): 64 MiB of KV cache, 64-token forwards at most.
    llm = LLM(str(demo_model_path()), enforce_eager=True, dtype="float32", max_model_len=64,
              max_num_seqs=2, max_num_batched_tokens=64, kv_cache_memory_bytes=64 << 20,
              skip_tokenizer_init=True,
              additional_config={"sparsity": {"p": 0.9, "backend": "torch"},
                                 "sparsity_metrics": True})
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker
    model = worker.worker.model_runner.get_model()
    result["after_start"] = _counts(model)

    forward = model.forward  # the plugin's wrapper: guard the first decode step, all of it

    def guarded_forward(*args, **kwargs):
        if "violations" not in result and kwargs["positions"].shape[-1] == 1:
            with CaptureGuard(strict=False) as guard:  # record, let the step finish
                out = forward(*args, **kwargs)
            result["violations"] = guard.violations
            return out
        return forward(*args, **kwargs)

    model.forward = guarded_forward
    out = llm.generate([{"prompt_token_ids": PROMPT}],
                       SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    result["generated"] = len(out[0].outputs[0].token_ids)
    result["after_request"] = _counts(model)
    result["llm"] = llm  # kept alive by the caller
    return result


def main(out_path: str, tmp: str) -> None:
    import torch

    from test_replace import replace_cases

    results = {"engine": engine()}
    llm = results["engine"].pop("llm")  # kept up (and its parallel state) for the cases below
    results["replace"] = replace_cases(tmp)
    torch.save(results, out_path)
    del llm


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
