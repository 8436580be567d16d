"""``vllm-sparsity analyze`` on the demo model in vLLM: the session's eager server with every site
(``conftest.sites_server``).

The per-layer sparsity of ``analysis.json`` comes from the route's counters; the workers' recorder
counts the masks it was handed on its own, and the test's own ``GET /v1/sparsity`` before and after
the run sees all of its traffic: the three must agree exactly. Rank and Jaccard are checked for
range, counts and variation (their maths against naive loops is tests/test_analysis.py's).
"""

from __future__ import annotations

import json

import requests

from conftest import API_KEY, SITES
from vllm_sparsity.eval.analyze import AnalyzeConfig, analyze
from vllm_sparsity.eval.grid import layer_deltas

LAYERS = 18  # Gemma 3 270M
CFG = AnalyzeConfig(model="", tasks=["piqa", "arc_easy"], grid=[0.5, 0.9],
                    target=",".join(SITES), joint=True, requests=2, decode_steps=8,
                    rank_tokens=48, rank_batch=16)


def test_analysis_routes_refuse_bad_use(sites_server):
    url, headers = f"{sites_server.url}/v1/sparsity/analysis", sites_server.headers
    r = requests.get(url, headers=headers, timeout=60)
    assert r.status_code == 409 and "POST /v1/sparsity/analysis first" in r.json()["error"]
    r = requests.post(url, json={"tokens": 8, "rank_batch": 9}, headers=headers, timeout=60)
    assert r.status_code == 400 and "rank_batch must be an integer in [2, tokens=8]" in \
        r.json()["error"]


def test_analysis_json_agrees_with_the_counters(sites_server, demo_model, tmp_path):
    def state():
        return requests.get(f"{sites_server.url}/v1/sparsity", headers=sites_server.headers,
                            timeout=60).json()

    cfg = AnalyzeConfig(**{**CFG.__dict__, "model": str(demo_model)})
    before = state()
    result = analyze(cfg, tmp_path, sites_server.url, API_KEY)
    everything = layer_deltas(before, state())
    assert json.loads((tmp_path / "analysis.json").read_text()) == result
    assert result["moe_experts"] is None
    for name in [f"sparsity_{s}.png" for s in SITES] + ["effective_rank.png", "stability.png"]:
        assert (tmp_path / name).stat().st_size > 1000, name

    summed: dict[tuple[int, str], list[int]] = {}
    for site in SITES:
        points = result["sites"][site]["points"]
        assert [pt["p"] for pt in points] == cfg.grid
        for pt in points:
            rows = pt["layers"]
            assert [r["layer"] for r in rows] == list(range(LAYERS))
            for r in rows:
                # The recorder's masks are the masks the rule applied and the counters counted.
                assert (r["mask_zeroed"], r["mask_total"]) == (r["zeroed"], r["total"]), r
                z, t = summed.setdefault((r["layer"], site), [0, 0])
                summed[r["layer"], site] = [z + r["zeroed"], t + r["total"]]
                # Batch-1 decode: every decode step of every request, one sequence per request.
                assert r["decode_steps"] == cfg.requests * cfg.decode_steps
                assert r["consecutive_pairs"] == r["drift_pairs"] == \
                    cfg.requests * (cfg.decode_steps - 1)
                assert 0 <= r["drift_jaccard"] <= 1 and 0 <= r["consecutive_jaccard"] <= 1
                assert r["rank_rows"] == cfg.rank_tokens
                assert r["rank_batches"] == cfg.rank_tokens // cfg.rank_batch
                assert 0 < r["effective_rank"] <= min(cfg.rank_batch, r["dim"]) / r["dim"]
            for key in ("sparsity", "effective_rank", "consecutive_jaccard", "drift_jaccard"):
                values = {round(r[key], 9) for r in rows}
                assert len(values) > 1, f"{site} p={pt['p']}: {key} is the same in every layer"
        low, high = points
        assert low["mean"]["sparsity"] > high["mean"]["sparsity"]  # p = 0.5 zeroes more
        assert low["mean"]["consecutive_jaccard"] < 1
    # All of the server's traffic in that time was the analysis's, and all of it is in the file.
    assert {k: list(v) for k, v in everything.items()} == summed
