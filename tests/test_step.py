"""The per-step path (token phases before each forward, the sparse layers inside it) as vLLM's
CUDA defaults run it, checked without a GPU.

- Capture safety: under a full CUDA graph the step path runs once inside the capture and is then
  replayed without Python. ``capture_guard.CaptureGuard`` fails on the ops that break or freeze a
  capture, by op (on CPU a host-to-device copy is a CPU copy): first on its own, then on every
  branch of ``RuntimeState.mark_phases``, then over one whole decode step of the demo model in a
  real vLLM engine (the model's forward, wrapper and sparse layers included; ``vllm_process.py``).
- Token phases whatever the attention backend: every backend's metadata class in the installed
  vLLM (FlashInfer's has no ``query_start_loc``), rebuilt from its dataclass fields.
- In the real engine: the counters hold nothing after start-up even when warm-up pushes fake
  requests through ``Worker.execute_model`` (as Model Runner V2's ``warmup_kernels`` does), and a
  request's prefill and decode tokens are counted as such.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from capture_guard import PLUGIN, CaptureGuard, CaptureSafetyError
from test_counters import naive_phases

from vllm_sparsity import _vllm_compat
from vllm_sparsity.config import SparsityConfig
from vllm_sparsity.counters import PAD, PREFILL
from vllm_sparsity.state import RuntimeState

HERE = Path(__file__).resolve()


def test_capture_guard_flags_what_breaks_a_capture():
    x = torch.arange(6)
    unsafe = {
        "torch.tensor(PAD, device=...)": lambda: torch.tensor(PAD, device=x.device),
        ".item()": lambda: x[0].item(),
        "int(t)": lambda: int(x[1]),
        ".tolist()": lambda: x.tolist(),
        "nonzero": lambda: x.nonzero(),
        "boolean mask": lambda: x[x > 2],
    }
    for (what, op), inference in itertools.product(unsafe.items(), (False, True)):
        with (torch.inference_mode(inference), pytest.raises(CaptureSafetyError),
              CaptureGuard(scope=HERE)):
            op()
        with CaptureGuard(scope=PLUGIN) as guard:  # not this file's business: allowed
            op()
        assert guard.violations == [], what
    with CaptureGuard(scope=HERE) as guard:  # device ops on existing tensors are fine
        y = torch.full((3,), PAD).add_(1)
        x[:3].copy_(y)
        torch.searchsorted(x, y, right=True).clamp_(max=4)
    assert guard.violations == []


def _state(max_tokens=16):
    return RuntimeState(SparsityConfig(p=0.9), torch.device("cpu"), max_tokens, metrics_on=True)


# vLLM's runner buffer [max_num_reqs + 1]: a prefill of 5 tokens, two decodes, then padding.
QSL = [0, 5, 6, 7, 7, 7, 7, 7]


def test_mark_phases_is_capture_safe_on_every_branch():
    n = 9  # padded forward: 7 real tokens
    state = _state()
    cases = []
    with CaptureGuard() as guard:
        state.mark_phases(n, _vllm_compat.STEP)  # before binding: a profile run
        cases.append(("unbound", state.phase[:n].tolist(), state.batch_phase.tolist()))
        state.bind_query_start_loc(torch.tensor(QSL, dtype=torch.int32), "Runner")
        state.mark_phases(n, _vllm_compat.STEP)
        cases.append(("step", state.phase[:n].tolist(), state.batch_phase.tolist()))
        state.mark_phases(n, _vllm_compat.NO_REQUESTS)
        cases.append(("no requests", state.phase[:n].tolist(), state.batch_phase.tolist()))
        state.mark_phases(n, _vllm_compat.MICRO_BATCH)
        cases.append(("micro-batch", state.phase[:n].tolist(), state.batch_phase.tolist()))
    assert guard.violations == []
    want, want_batch = naive_phases(QSL, n)
    assert cases == [("unbound", [PAD] * n, [PAD]), ("step", want, [want_batch]),
                     ("no requests", [PAD] * n, [PAD]),
                     ("micro-batch", [PREFILL] * n, [PREFILL])]
    assert state.unknown_phase_tokens.tolist() == [n]


def test_phases_without_a_runner_buffer_count_as_prefill_and_unknown(caplog):
    state = _state()
    state.bind_query_start_loc(None, "SomeRunner")
    assert "SomeRunner has no query_start_loc buffer" in caplog.text
    for n in (3, 4):
        with CaptureGuard():
            state.mark_phases(n, _vllm_compat.STEP)
    assert state.phase[:4].tolist() == [PREFILL] * 4
    assert state.unknown_phase_tokens.tolist() == [7]


def test_bind_step_takes_the_model_runners_buffer():
    """The worker RPC before warm-up binds V2's ``input_buffers.query_start_loc`` or V1's
    ``query_start_loc.gpu`` (the CPU runner's is exercised by the engine below)."""
    from types import SimpleNamespace

    from vllm_sparsity import worker_rpc

    v1 = SimpleNamespace(query_start_loc=SimpleNamespace(gpu=torch.zeros(5, dtype=torch.int32)))
    v2 = SimpleNamespace(input_buffers=SimpleNamespace(
        query_start_loc=torch.zeros(5, dtype=torch.int32)))
    for runner, buffer in ((v1, v1.query_start_loc.gpu), (v2, v2.input_buffers.query_start_loc)):
        model = torch.nn.Module()
        model._vllm_sparsity = _state()
        runner.get_model = lambda model=model: model
        worker_rpc.vllm_sparsity_bind_step(SimpleNamespace(worker=SimpleNamespace(model_runner=runner)))
        assert model._vllm_sparsity.query_start_loc is buffer


def _metadata_classes() -> dict[str, list[str]]:
    """Every attention backend's metadata class in the installed vLLM, as {name: its dataclass
    fields}, read from the sources: the type argument of each ``...MetadataBuilder[...]`` base
    (modules such as FlashInfer's cannot be imported without their CUDA packages)."""
    import vllm

    root = Path(vllm.__file__).parent
    classes, metadata = {}, set()
    for folder in ("v1/attention", "model_executor/layers/attention"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ClassDef):
                    continue
                bases = [b.value if isinstance(b, ast.Subscript) else b for b in node.bases]
                fields = [s.target.id for s in node.body
                          if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
                classes[node.name] = ([ast.unparse(b) for b in bases], fields)
                for b in node.bases:
                    if (isinstance(b, ast.Subscript)
                            and ast.unparse(b.value).endswith("MetadataBuilder")):
                        metadata.add(ast.unparse(b.slice))

    def fields(name):  # a subclass may annotate a base's field again
        bases, own = classes[name]
        return list(dict.fromkeys([f for b in bases if b in classes for f in fields(b)] + own))

    return {name: fields(name) for name in sorted(metadata) if name in classes}


def test_token_phases_do_not_depend_on_the_attention_backend():
    from vllm.config import VllmConfig
    from vllm.forward_context import set_forward_context

    metadata_classes = _metadata_classes()
    assert {"FlashAttentionMetadata", "FlashInferMetadata", "TritonAttentionMetadata",
            "CPUAttentionMetadata", "FlashMLAMetadata"} <= set(metadata_classes)
    assert "query_start_loc" not in metadata_classes["FlashInferMetadata"]  # no per-step boundaries
    n = 9
    want, want_batch = naive_phases(QSL, n)
    qsl = torch.tensor(QSL, dtype=torch.int32)
    vllm_config = VllmConfig()
    got = {}
    for name, fields in metadata_classes.items():
        # The class rebuilt from its fields; tensors where the step's boundaries would be.
        cls = dataclasses.make_dataclass(name, fields)
        metadata = cls(**{f: qsl[:4] if f == "query_start_loc" else None for f in fields})
        state = _state()
        state.bind_query_start_loc(qsl, "GPUModelRunner")
        with set_forward_context({"model.layers.0.self_attn.attn": metadata}, vllm_config,
                                 num_tokens=n):
            state.mark_phases(n, _vllm_compat.step_kind())
        got[name] = (state.phase[:n].tolist(), state.batch_phase.tolist())
    assert got == {name: (want, [want_batch]) for name in metadata_classes}


@pytest.fixture(scope="module")
def engine(vllm_process):
    return vllm_process["engine"]


def test_a_whole_decode_step_is_capture_safe(engine):
    assert engine["violations"] == []  # set only if the guarded decode step ran


def test_warm_up_requests_are_not_counted(engine):
    from vllm_process import FAKE_PROMPT

    # The fake requests went through the sparse layers: prefill and decode tokens counted...
    for layer in engine["after_fake_requests"]:
        assert layer["total"][:PAD] == [len(FAKE_PROMPT) * layer["K"], layer["K"]], layer
    # ...and nothing was left once the engine was up.
    assert all(layer["total"] == [0, 0, 0] for layer in engine["after_start"])


def test_a_request_is_counted_in_its_phases(engine):
    from vllm_process import MAX_TOKENS, PROMPT

    assert engine["generated"] == MAX_TOKENS
    assert len(engine["after_request"]) == 2 * 18  # gate_up_proj and down_proj of 18 layers
    for layer in engine["after_request"]:
        assert layer["total"] == [len(PROMPT) * layer["K"], (MAX_TOKENS - 1) * layer["K"], 0], \
            layer
