"""replace_mlp on models built from vLLM's own layer classes, in processes that set up vLLM's
parallel state (no server). At TP = 1, in the session's shared vLLM process (``replace_cases``,
run by ``vllm_process.py``): discovery by structure, limited to a multimodal model's language model
(a tiny Qwen2.5-VL built by vLLM from its config: its gated vision MLPs stay dense), idempotence,
the dense fallback, a real quantized linear method (compressed-tensors W8A8 int8, vLLM's CPU
kernel) under the torch backend with a Llama MLP whose down_proj advertises a pre-quantized input,
and the refusal of a model that a loader built without ``create_model``. Under tensor parallelism
(TP = 2, two gloo processes), the ``intermediate`` site must keep, on each rank, its slice of the
whole rows' top-p set (the paper's rule on the unsharded down_proj input), eager and under
torch.compile."""

import logging
import os
import platform
import shutil
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


def replace_cases(tmp: str) -> dict:
    """Run in ``vllm_process.py`` once its engine is up (vLLM's parallel state set, TP = 1):
    replace_mlp on (a) a multimodal-like model whose language model holds two gated MLPs and an
    MLP-like module whose down_proj is a plain torch Linear, beside a vision-tower-like gated MLP,
    converted twice; (b) a model without any gated MLP; then the cases below. Returns what each
    call returned and logged."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from vllm_sparsity.config import SparsityConfig
    from vllm_sparsity.replace import replace_mlp
    from vllm_sparsity.sparse_linear import InputSparseLinearMethod
    from vllm_sparsity.state import runtime_state

    records = _Records()
    logger = logging.getLogger("vllm.vllm_sparsity")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    with set_current_vllm_config(VllmConfig()):
        GatedMLP = _gated_mlp_class()

        class PlainMLP(torch.nn.Module):  # has down_proj, but no gate_up_proj / act-and-mul
            def __init__(self):
                super().__init__()
                self.up_proj = torch.nn.Linear(HIDDEN, INTER)
                self.down_proj = torch.nn.Linear(INTER, HIDDEN)

        class LanguageModel(torch.nn.Module):
            pass

        class Multimodal(torch.nn.Module):  # vLLM's SupportsMultiModal, as the plugin reads it
            supports_multimodal = True

            def get_language_model(self):
                return self.language_model

        model = Multimodal()
        model.language_model = LanguageModel()
        model.language_model.layers = torch.nn.ModuleList([GatedMLP(), GatedMLP()])
        model.language_model.projector = PlainMLP()
        model.tower = torch.nn.Module()
        model.tower.blocks = torch.nn.ModuleList([torch.nn.Module()])
        model.tower.blocks[0].mlp = GatedMLP()
        config = SparsityConfig(p=P, target="intermediate", backend="auto")
        first = replace_mlp(model, config, max_num_tokens=64)
        methods = {n: type(m.quant_method).__name__ for n, m in model.named_modules()
                   if hasattr(m, "quant_method")}
        before = {n: m.quant_method for n, m in model.named_modules()
                  if hasattr(m, "quant_method")}
        first_log = list(records.lines)
        second = replace_mlp(model, SparsityConfig(p=0.5), max_num_tokens=64)
        after = {n: m.quant_method for n, m in model.named_modules()
                 if hasattr(m, "quant_method")}
        state = runtime_state(model)
        layer_indices = [m.quant_method.layer_index for _, m in state.layers]
        wrapped = sum(isinstance(m.quant_method, InputSparseLinearMethod)
                      and isinstance(m.quant_method.inner, InputSparseLinearMethod)
                      for m in model.modules() if hasattr(m, "quant_method"))
        pre_processed = {m.quant_method.backend: m.quant_method.supports_pre_processed_weights
                         for _, m in state.layers}
        records.lines.clear()

        dense = torch.nn.Module()
        dense.projector = PlainMLP()
        x = torch.randn(3, HIDDEN)
        y_before = dense.projector.down_proj(dense.projector.up_proj(x))
        dense_replaced = replace_mlp(dense, config, max_num_tokens=64)
        y_after = dense.projector.down_proj(dense.projector.up_proj(x))
        dense_log = list(records.lines)
        records.lines.clear()
        return {"first": first, "methods": methods, "first_log": first_log,
                "second": second, "unchanged": all(before[n] is after[n] for n in before),
                "p": float(state.p["intermediate"]), "target": state.config.target,
                "layer_indices": layer_indices, "wrapped_twice": wrapped,
                "pre_processed": pre_processed,
                "dense": dense_replaced, "dense_log": dense_log,
                "dense_state": runtime_state(dense) is None,
                "dense_same": torch.equal(y_before, y_after),
                "qwen2_5_vl": _qwen2_5_vl_case(records, tmp),
                "quantized": _quantized_case(records),
                "bypass": _loader_bypass_case(GatedMLP)}


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


def _quantized_case(records):
    """vLLM's Llama MLP with a real quantized linear method (W8A8 int8, CPU kernel), sparsified
    with backend auto (the kernel backends refuse quantized weights: the torch backend serves
    them). Its down_proj advertises a pre-quantized input, as fp8/nvfp4 methods do on CUDA
    (``expose_input_quant_key``); the fused act-and-mul producer is a CUDA kernel, so a torch
    one with the same contract stands in for it."""
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.fusion import fused_act_quant
    from vllm.model_executor.layers.fusion.quant_activation import QuantizedActivation
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig)
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticTensorSym
    from vllm.model_executor.models.llama import LlamaMLP

    from vllm_sparsity import backends
    from vllm_sparsity.config import SparsityConfig
    from vllm_sparsity.replace import replace_mlp

    quant_config = CompressedTensorsConfig.from_config(W8A8_INT8)
    w = _weights()
    produced = []

    def silu_and_mul_fp8_static(x, linear):  # the CUDA producer's contract, in torch
        produced.append(linear)
        h = SiluAndMul().forward_native(x)
        data = (h / linear.input_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        return QuantizedActivation(data, linear.input_scale, h.dtype, h.shape,
                                   kFp8StaticTensorSym)

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
    for layer in (sparse.gate_up_proj, sparse.down_proj):
        layer.quant_method.process_weights_after_loading(layer)  # vLLM's pass after loading
    plain = mlp()  # the same MLP without the plugin
    for layer in (plain.gate_up_proj, plain.down_proj):
        layer.quant_method.process_weights_after_loading(layer)
    for m in (sparse, plain):
        m.down_proj._input_quant_key = kFp8StaticTensorSym  # as expose_input_quant_key sets it
        m.down_proj.input_scale = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    x = w["x"]
    y = sparse(x)
    plain_input = fused_act_quant.maybe_fused_act_quant(plain.act_fn, plain.gate_up_proj(x)[0],
                                                         plain.down_proj)
    inner = {name: getattr(sparse, name).quant_method.inner
             for name in ("gate_up_proj", "down_proj")}
    return {"refused": refused, "replaced": replaced, "log": log, "y": y,
            "produced_for_sparse": any(layer is sparse.down_proj for layer in produced),
            "plain_input": type(plain_input).__name__,
            "inner": {k: type(v).__name__ for k, v in inner.items()},
            "pre_processed": [sparse.down_proj.quant_method.supports_pre_processed_weights,
                              inner["down_proj"].supports_pre_processed_weights],
            # The reference: the paper's rule, then the same quantized methods (unswapped).
            "y_ref": _paper_mlp_through(inner, sparse, x)}


def _paper_mlp_through(inner, mlp, x):
    """The MLP with the paper's sort rule on both inputs, through the layers' own quantized
    methods: y [T, HIDDEN]."""
    from vllm.model_executor.layers.activation import SiluAndMul

    xs = torch.where(paper_top_p_mask(x, P), x, 0)
    h = SiluAndMul().forward_native(inner["gate_up_proj"].apply(mlp.gate_up_proj, xs))
    hs = torch.where(paper_top_p_mask(h, P), h, 0)
    return inner["down_proj"].apply(mlp.down_proj, hs)


def _loader_bypass_case(GatedMLP):
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
    vl = one_rank["qwen2_5_vl"]
    assert vl["gated_in_vision"] == ["visual.blocks.0.mlp", "visual.blocks.1.mlp"]
    assert vl["replaced"] == [f"language_model.model.layers.{i}.mlp.{proj}"
                              for i in (0, 1) for proj in ("gate_up_proj", "down_proj")]
    assert vl["vision_methods"] == ["UnquantizedLinearMethod"]
    assert ("INFO", "vllm-sparsity: Qwen2_5_VLForConditionalGeneration: sparsified 2 of 2 MLPs "
            "of its language model (Qwen2ForCausalLM); 2 gated MLPs outside it (vision/audio "
            "towers) left dense (target=all_inputs, rule=top-p, p=0.6, backend=torch -> torch)"
            ) in vl["log"]


def test_quantized_method_runs_under_the_torch_backend(one_rank):
    q = one_rank["quantized"]
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
    # The paper's rule on both inputs, then the same int8 methods: the same output. (Against a
    # float GEMM on the dequantized weights no tight bound holds: vLLM-CPU's int8 GEMM deviates by
    # about 8% in norm on this AVX2 machine, sparsity or not.)
    assert q["y"].abs().max() > 0
    torch.testing.assert_close(q["y"], q["y_ref"], rtol=1e-6, atol=1e-6)


def test_model_built_without_create_model_is_refused(one_rank):
    message = one_rank["bypass"]
    assert message is not None and "--load-format tensorizer built Module without " \
        "BaseModelLoader.create_model" in message, message


def test_replace_is_idempotent(one_rank):
    assert one_rank["second"] == [] and one_rank["unchanged"]
    assert one_rank["wrapped_twice"] == 0
    assert (one_rank["p"], one_rank["target"]) == (P, "intermediate")  # the first config stays


def test_model_without_gated_mlp_is_served_dense(one_rank):
    assert one_rank["dense"] == [] and one_rank["dense_state"] and one_rank["dense_same"]
    assert one_rank["dense_log"] == [
        ("WARNING", "vllm-sparsity: Module has no gated MLP (gate_up_proj -> act-and-mul -> "
         "down_proj) nor routed experts to sparsify; serving it dense")]


def _mlp_on_rank(rank, world_size, ident):
    """One rank: vLLM's TP group over the gloo world, the MLP's output (eager and compiled), the
    down_proj input shard it saw and its counters."""
    os.environ["VLLM_DIST_IDENT"] = ident  # names vLLM's CPU shared-memory group, as its workers do
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
            replaced = replace_mlp(model, SparsityConfig(p=P, target="all_inputs", backend="torch"),
                                   max_num_tokens=64)
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
                    "counts": counts,
                    "reduces": [mlp.gate_up_proj.quant_method.all_reduce is None,
                                mlp.down_proj.quant_method.all_reduce is not None]}
        finally:
            parallel_state.destroy_model_parallel()


def test_intermediate_site_applies_the_global_rule_over_vllm_tp_group(tmp_path):
    ranks = run_ranks(_mlp_on_rank, 2, tmp_path, f"vllm-sparsity-test-{os.getpid()}")
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
