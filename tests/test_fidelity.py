"""Fidelity on the real Gemma 3 270M: the plugin inside vLLM against HF transformers running the
paper's rule through forward hooks on the same weights, and p = 1 against the plugin off."""

import pytest
import requests

from reference import HFTopP

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def hf(demo_model):
    return HFTopP(demo_model)


def _set(server, **body):
    r = requests.post(f"{server.url}/v1/sparsity", json=body, headers=server.headers)
    assert r.status_code == 200, r.text


def _layers(server):
    state = requests.get(f"{server.url}/v1/sparsity", headers=server.headers).json()
    return {(r["layer"], r["site"]): (r["zeroed"], r["total"]) for r in state["layers"]}


def _greedy_ids(server, prompt):
    out = server.completion(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, return_token_ids=True)
    return out["choices"][0]["token_ids"]


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_vllm_matches_hf_hooks(sparse_server, hf, p):
    _set(sparse_server, p=p, target="all_inputs")
    try:
        before = _layers(sparse_server)
        vllm_tokens = [_greedy_ids(sparse_server, prompt) for prompt in PROMPTS]
        after = _layers(sparse_server)
    finally:
        _set(sparse_server, p=0.9)
    hf.p, hf.target, hf.counts = p, "all_inputs", {}
    hf_tokens = [hf.greedy(prompt, MAX_TOKENS) for prompt in PROMPTS]

    assert vllm_tokens == hf_tokens
    assert set(hf.counts) == set(after)
    for key, (hf_zeroed, hf_total) in hf.counts.items():
        zeroed = after[key][0] - before[key][0]
        total = after[key][1] - before[key][1]
        assert total == hf_total, key  # the same tokens went through the same layers
        assert abs(zeroed / total - hf_zeroed / hf_total) < 0.005, key
    mean = sum(z / t for z, t in ((after[k][0] - before[k][0], after[k][1] - before[k][1])
                                  for k in after)) / len(after)
    assert mean > (0.4 if p == 0.5 else 0.1)  # the rule really zeroed activations


def test_p_one_equals_plugin_off(sparse_server, dense_server):
    _set(sparse_server, p=1.0)
    try:
        for prompt in PROMPTS:
            kw = dict(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
            sparse = sparse_server.completion(prompt, **kw)["choices"][0]
            dense = dense_server.completion(prompt, **kw)["choices"][0]
            assert sparse["text"] == dense["text"]
            assert sparse["logprobs"]["top_logprobs"] == dense["logprobs"]["top_logprobs"]
    finally:
        _set(sparse_server, p=0.9)
