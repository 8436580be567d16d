"""Tiny random-weight MoE checkpoints for the tests: Qwen3-MoE and OLMoE, 2 decoder layers, hidden
128 (2 heads of 64: vLLM's CPU attention takes no head size below 32), 8 experts, top-2, a 512-word
vocabulary.

Built with transformers' own config classes and weight init (seeded; std ``hidden ** -0.5`` so that
the experts' output is not drowned by the residual stream), saved as HF checkpoints (one tensor per
expert and projection, which vLLM's loaders stack into its fused experts), with the placeholder-word
tokenizer of ``vllm_sparsity.tools.random_model`` (prompts are token ids). Their outputs are noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

COMMON = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, num_experts=8, num_experts_per_tok=2,
              max_position_embeddings=256, bos_token_id=510, eos_token_id=511,
              tie_word_embeddings=False, initializer_range=128 ** -0.5)
# name -> (transformers config class, its expert fields). Expert widths are multiples of 32, as
# vLLM's CPU fused-MoE kernel wants (it pads otherwise).
MODELS = {
    "qwen3-moe": ("Qwen3MoeConfig", dict(head_dim=64, moe_intermediate_size=32,
                                         intermediate_size=128, norm_topk_prob=True,
                                         decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=64, norm_topk_prob=False)),
}


def build(dest: Path, name: str, seed: int = 0) -> Path:
    """Write the float32 checkpoint ``name`` (a key of ``MODELS``) into ``dest``; returns it."""
    import transformers
    from transformers import AutoModelForCausalLM

    from vllm_sparsity.tools.random_model import _tokenizer

    config_class, fields = MODELS[name]
    config = getattr(transformers, config_class)(**COMMON, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dest)
    _tokenizer(COMMON).save_pretrained(dest)
    return dest


def expert_weights(path: Path) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, the experts' weights as vLLM holds them: w13 [E, 2I, H] (gate_proj
    rows, then up_proj rows) and w2 [E, H, I], read from the checkpoint's tensors."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    layers = json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]
    out = {}
    for n in range(layers):
        experts = sorted({int(k.split(".")[5]) for k in tensors
                          if k.startswith(f"model.layers.{n}.mlp.experts.")})
        proj = lambda e, p: tensors[f"model.layers.{n}.mlp.experts.{e}.{p}.weight"]  # noqa: E731
        out[n] = (torch.stack([torch.cat([proj(e, "gate_proj"), proj(e, "up_proj")])
                               for e in experts]),
                  torch.stack([proj(e, "down_proj") for e in experts]))
    return out
