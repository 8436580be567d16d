"""Mean per-layer sparsity of each target at each p, on a running server, through its
``/v1/sparsity`` route (the served path itself).

``vllm-sparsity bench --sparsity-of URL [--p P ...]`` prints it. The server must run with
``VLLM_PLUGINS=sparsity`` and ``--sparsity-target all_inputs`` (so that every target can be set at
runtime). For each target applied alone and each p, a fixed prompt set is completed greedily and
the per-layer counters' differences give each layer's share of activations zeroed; the table holds
their mean over the layers.
"""

from __future__ import annotations

import requests

from vllm_sparsity.eval.server import Server

PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which plants",
    "def quicksort(items):\n    ",
    "In 1905, Albert Einstein published four papers that",
    "The recipe calls for two cups of flour, one egg and",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
    "The stock market fell sharply on Monday after",
]
TARGETS = ("input", "intermediate")  # each site alone


def sparsity_table(url: str, ps: list[float], api_key: str | None = None,
                   max_tokens: int = 32) -> dict:
    """{target: {p: mean per-layer sparsity}} of ``PROMPTS`` (``max_tokens`` generated each) on
    the server at ``url``. Leaves the server at the last target and p. Raises RuntimeError when
    the route refuses (plugin or route off)."""
    server = Server(url.rstrip("/"), api_key)
    models = requests.get(f"{server.url}/v1/models", headers=server.headers, timeout=30)
    models.raise_for_status()
    model = models.json()["data"][0]["id"]  # one served model: the one the route sparsifies

    def counters():
        return {(r["layer"], r["site"]): (r["zeroed"], r["total"])
                for r in server.state()["layers"]}

    table: dict = {}
    for target in TARGETS:
        for p in ps:
            server.set(p, target)
            before = counters()
            for prompt in PROMPTS:
                requests.post(f"{server.url}/v1/completions", headers=server.headers, json={
                    "model": model, "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0.0, "ignore_eos": True}).raise_for_status()
            after = counters()
            per_layer = [(after[k][0] - before[k][0]) / (after[k][1] - before[k][1])
                         for k in after if k[1] == target]
            table.setdefault(target, {})[p] = sum(per_layer) / len(per_layer)
    return table


def print_table(table: dict, ps: list[float]) -> None:
    print("mean per-layer sparsity, each target applied alone:")
    print(f"{'p':>6} " + " ".join(f"{t:>13}" for t in table))
    for p in ps:
        print(f"{p:>6} " + " ".join(f"{table[t][p]:13.3f}" for t in table))
