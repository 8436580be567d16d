"""Served (``dense_server`` and ``max_p_server``, see conftest.py): a runtime rollback reaches
the dense model under every rule. Under max-p, p = 1 keeps only each row's largest entries; its
keep-everything p is 0 (``rule.KEEP_ALL_P``), which the route takes under max-p only. After
``POST {"p": 0}`` the greedy text and top logprobs equal the plugin-off server's (torch backend:
the rule keeps every nonzero, then the layer's own GEMM)."""

from __future__ import annotations

import requests

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 16


def test_max_p_rolls_back_to_the_dense_model_at_runtime(max_p_server, dense_server):
    def post(body):
        return requests.post(f"{max_p_server.url}/v1/sparsity", json=body,
                             headers=max_p_server.headers, timeout=120)

    kw = dict(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    sparse = [max_p_server.completion(p, **kw)["choices"][0] for p in PROMPTS]
    dense = [dense_server.completion(p, **kw)["choices"][0] for p in PROMPTS]
    # At p = 0.5 max-p zeroes every |x| under half its row's max: not the dense model.
    assert [c["logprobs"]["top_logprobs"] for c in sparse] != \
        [c["logprobs"]["top_logprobs"] for c in dense]
    r = post({"p": 0})
    assert r.status_code == 200 and r.json()["p"] == 0.0 and r.json()["rule"] == "max-p", r.text
    for prompt, want in zip(PROMPTS, dense):
        got = max_p_server.completion(prompt, **kw)["choices"][0]
        assert got["text"] == want["text"], prompt
        assert got["logprobs"]["top_logprobs"] == want["logprobs"]["top_logprobs"], prompt
    # 0 is max-p's only: a top-p server refuses it (tests/test_control.py); 1.5 stays out here.
    r = post({"p": 1.5})
    assert r.status_code == 400 and "under the max-p rule also 0" in r.json()["error"], r.text
