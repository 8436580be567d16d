"""Random-weight checkpoints with the shapes of real models, for benchmarks only.

``vllm-sparsity random-model llama-3.2-1b`` writes (once) a bf16 safetensors checkpoint with
Llama-3.2-1B's shapes into the plugin's cache (``cache.cache_dir()``) and prints its path.
Its speed in vLLM is that of the real model: every GEMM, the KV cache and the tied 128k-token
output layer have the real shapes, and the MLPs are about 65% of the weights, as in the paper's
target models (the demo model's 262k-token output layer outweighs all its MLPs). Its outputs are
noise, and its sparsity at a given p is not a trained model's: report speed against the sparsity
measured on it, never against p.

Weights are drawn as transformers initialises a Llama (normal, std ``initializer_range`` = 0.02;
RMSNorm weights 1), seeded, tensor by tensor straight into bf16, one shard per decoder layer, so
that the build takes seconds and holds one shard in memory. The tokenizer is a ``tokenizers``
WordLevel vocabulary of placeholder words (``<t123>``) of the full vocabulary size, with Llama 3's
special tokens at their ids: vLLM loads it without the Hub, and benchmarks feed token ids.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

from vllm_sparsity.cache import cache_dir

VERSION = 1  # bump when the checkpoint changes: it is part of the cached directory's name

# Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B), minus the weights.
LLAMA_3_2_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001, initializer_range=0.02,
)
MODELS = {"llama-3.2-1b": LLAMA_3_2_1B}


def random_model_path(name: str = "llama-3.2-1b", build: bool = True) -> Path:
    """Path of the cached random-weight checkpoint ``name``, building it first if missing.

    Args:
        name: one of ``MODELS``.
        build: build when missing; with ``False`` a missing checkpoint raises.

    Raises:
        ValueError: unknown ``name``.
        FileNotFoundError: ``build`` is false and the checkpoint is not cached.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    path = cache_dir() / f"random-{name}-bf16-v{VERSION}"
    if (path / "config.json").exists():
        return path
    if not build:
        raise FileNotFoundError(f"{path} not built yet; run `vllm-sparsity random-model {name}`")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename, so an interrupted build never looks finished.
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".build-"))
    try:
        build_random_model(tmp, MODELS[name])
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def parameter_shapes(shapes: dict) -> dict[str, tuple[int, ...]]:
    """HF Llama parameter name -> shape, for the config fields ``shapes`` (as in ``LLAMA_3_2_1B``);
    the output layer is tied to ``model.embed_tokens`` and has no tensor of its own."""
    h, i, d = shapes["hidden_size"], shapes["intermediate_size"], shapes["head_dim"]
    q, kv = shapes["num_attention_heads"] * d, shapes["num_key_value_heads"] * d
    out = {"model.embed_tokens.weight": (shapes["vocab_size"], h), "model.norm.weight": (h,)}
    for n in range(shapes["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    return out


def weight_shares(shapes: dict) -> dict[str, float]:
    """Share of the parameters in each group (``embedding`` (tied: also the output layer),
    ``attention``, ``mlp``, ``norms``), and ``total`` (a count, not a share)."""
    groups = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0}
    for name, shape in parameter_shapes(shapes).items():
        group = ("embedding" if "embed" in name else "attention" if "self_attn" in name
                 else "mlp" if ".mlp." in name else "norms")
        groups[group] += math.prod(shape)
    total = sum(groups.values())
    return {**{g: n / total for g, n in groups.items()}, "total": total}


def build_random_model(dest: Path, shapes: dict, seed: int = 0) -> None:
    """Write a random-weight ``LlamaForCausalLM`` checkpoint (bf16 safetensors, config, tokenizer)
    into the existing directory ``dest``.

    Args:
        dest: output directory.
        shapes: config fields as in ``LLAMA_3_2_1B`` (smaller values give a tiny model for tests).
        seed: seed of the weights.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(architectures=["LlamaForCausalLM"], dtype="bfloat16", **shapes)
    config.save_pretrained(dest)
    generator = torch.Generator().manual_seed(seed)
    std = shapes["initializer_range"]
    names = parameter_shapes(shapes)
    # One shard per decoder layer, plus one for the embedding and final norm: one shard in memory.
    shards: dict[str, list[str]] = {}
    for name in names:
        key = name.split(".")[2] if name.startswith("model.layers.") else "top"
        shards.setdefault(key, []).append(name)
    index = {}
    for n, (key, members) in enumerate(shards.items()):
        filename = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in members:
            t = torch.empty(names[name], dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, std, generator=generator)
            tensors[name] = t
            index[name] = filename
        save_file(tensors, dest / filename, metadata={"format": "pt"})
    total_bytes = 2 * sum(math.prod(shape) for shape in names.values())
    (dest / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_bytes}, "weight_map": index}, indent=1))
    _tokenizer(shapes).save_pretrained(dest)


def _tokenizer(shapes: dict):
    """A WordLevel tokenizer of ``vocab_size`` placeholder words, Llama 3's special tokens at
    ``bos_token_id`` / ``eos_token_id`` (when inside the vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<t{i}>": i for i in range(shapes["vocab_size"])}
    special = {}
    for field, text in (("bos_token", "<|begin_of_text|>"), ("eos_token", "<|end_of_text|>")):
        token_id = shapes.get(f"{field}_id")
        if token_id is not None and token_id < shapes["vocab_size"]:
            del vocab[f"<t{token_id}>"]
            vocab[text] = token_id
            special[field] = text
    unk = "<t0>" if "<t0>" in vocab else next(iter(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, **special)
