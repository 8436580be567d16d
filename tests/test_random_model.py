"""The random-weight benchmark checkpoint: config, shapes, weight shares, init, loading.

A tiny variant goes through the same code path as ``llama-3.2-1b`` (``build_random_model`` with
small shapes); transformers loads it as the independent reader. Serving the full model in vLLM is
checked by hand (minutes of start-up), not here.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from vllm_sparsity.tools import random_model

TINY = dict(random_model.LLAMA_3_2_1B, vocab_size=1000, hidden_size=64, intermediate_size=256,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            bos_token_id=998, eos_token_id=999)


def _shares_by_hand(s: dict) -> dict[str, int]:
    """Parameter counts of a tied-embedding Llama, from its config arithmetic."""
    h, i, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    return {"embedding": s["vocab_size"] * h, "attention": L * (2 * h * q + 2 * h * kv),
            "mlp": L * 3 * h * i, "norms": (2 * L + 1) * h}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    random_model.build_random_model(path, TINY, seed=0)
    return path


def _tensors(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in sorted(set(index.values())):
        with safe_open(path / file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return index, out


def test_llama_3_2_1b_shares_match_the_arithmetic():
    counts = _shares_by_hand(random_model.LLAMA_3_2_1B)
    total = sum(counts.values())
    shares = random_model.weight_shares(random_model.LLAMA_3_2_1B)
    assert shares["total"] == total
    for group, n in counts.items():
        assert shares[group] == pytest.approx(n / total)
    # Llama-3.2-1B has 1.24 B parameters (about 2.5 GB in bf16); its MLPs are about 65% of them.
    assert 1.23e9 < total < 1.24e9
    assert 0.64 < shares["mlp"] < 0.66


def test_tiny_checkpoint_has_the_config_and_tensors_of_the_arithmetic(tiny):
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                  "tie_word_embeddings"):
        assert config[field] == TINY[field], field
    rope = config.get("rope_parameters") or config["rope_scaling"]
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0

    index, tensors = _tensors(tiny)
    assert set(index) == set(tensors) and "lm_head.weight" not in tensors  # tied
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    counts = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0}
    for name, t in tensors.items():
        group = ("embedding" if "embed_tokens" in name else "attention" if "self_attn" in name
                 else "mlp" if ".mlp." in name else "norms")
        counts[group] += t.numel()
    assert counts == _shares_by_hand(TINY)
    total = sum(counts.values())
    shares = random_model.weight_shares(TINY)
    assert {g: shares[g] for g in counts} == pytest.approx({g: n / total for g, n in counts.items()})
    # Init as transformers does for a Llama: normal(0, initializer_range), RMSNorm weights 1.
    big = tensors["model.embed_tokens.weight"].float()
    assert big.mean().abs() < 1e-3 and big.std() == pytest.approx(TINY["initializer_range"], rel=0.02)
    assert all((t == 1).all() for n, t in tensors.items() if n.endswith("norm.weight"))


def test_tiny_checkpoint_loads_in_transformers_and_is_seeded(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    _, tensors = _tensors(tiny)
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight,
                       tensors["model.layers.2.mlp.down_proj.weight"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    logits = model(torch.tensor([[998, 5, 17, 400]])).logits
    assert logits.shape == (1, 4, TINY["vocab_size"]) and torch.isfinite(logits).all()

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert len(tokenizer) == TINY["vocab_size"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (998, 999)
    assert tokenizer.decode([5, 17]) == "<t5> <t17>"

    again = tmp_path / "again"
    again.mkdir()
    random_model.build_random_model(again, TINY, seed=0)
    assert torch.equal(_tensors(again)[1]["model.layers.0.mlp.gate_proj.weight"],
                       tensors["model.layers.0.mlp.gate_proj.weight"])


def test_path_is_built_once_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_SPARSITY_CACHE", str(tmp_path))
    monkeypatch.setitem(random_model.MODELS, "tiny", TINY)
    with pytest.raises(FileNotFoundError, match="random-model tiny"):
        random_model.random_model_path("tiny", build=False)
    path = random_model.random_model_path("tiny")
    assert path.parent == tmp_path and (path / "config.json").exists()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert random_model.random_model_path("tiny", build=False) == path
    assert random_model.random_model_path("tiny") == path
    assert (path / "config.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="llama-3.2-1b"):
        random_model.random_model_path("llama-9b")
