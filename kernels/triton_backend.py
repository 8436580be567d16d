"""The Triton backend of ``InputSparseLinearMethod``: K-major weight at load, then per call either
the input-sparse GEMV (decode) or the top-p mask followed by the dense GEMM (prefill).

Entry ``"triton"`` of ``vllm_sparsity.backends.BACKENDS`` (that module states the interface):

- ``prepare(layer)`` once after the weights are loaded: the layer's [N, K] weight storage is
  replaced by a K-major copy, and ``layer.weight`` becomes its [N, K] transposed *view* (same
  Parameter object, so vLLM's weight loaders and any dense reader still see an [N, K] weight). One
  copy of the weight stays resident; the transpose needs a second copy transiently, one layer at a
  time. Same move as vLLM's own XPU path (``UnquantizedLinearMethod.process_weights_after_loading``:
  ``weight.t().contiguous().t()``).
- ``apply_counted(layer, x2, p, bias, all_reduce, mode)`` on every forward: one custom op,
  ``torch.ops.vllm_sparsity.input_sparse_linear``, so the batch-size branch below is taken at run
  time inside the op. (Written as Python in the traced forward, torch.compile would evaluate
  ``M <= M_MAX`` once, on the size it traces with, and vLLM drops shape guards: every batch size
  would then take that one branch.)

Batch policy. ``M <= M_MAX`` rows take the sparse path: the threshold kernel, then ``sparse_gemv``
with per-row masks (each output row is exactly its own row's masked input times W) loading the
union of the rows' kept weight rows; the bytes read grow with that union, so past a few rows the
sparse path stops saving anything. ``M > M_MAX`` (prefill, large batches): the sparsified input (the
same threshold kernel writing x with dropped entries zeroed) goes to the dense GEMM (cuBLAS through
``F.linear`` on the transposed view); there the rule keeps the paper's semantics, not its speed.
``M_MAX = 8`` is a guess to be tuned on a GPU with ``kernels/bench/bench_sparse_mlp.py``: at s = 0.5
and independent row masks, 8 rows already read ~1 - 0.5^8 of W; real masks overlap more.

Sites: every site runs the same code. ``intermediate`` (``down_proj``) takes the act-and-mul
output as computed by the model (not fused into the threshold kernel). Tensor parallelism: ``down_proj``'s
input is split over K across the TP ranks, and ``sparse_linear`` then passes an ``all_reduce`` over
them. The threshold is the global one, ``top_p_threshold_sharded`` (its 4 passes each all-reduce a
float64 [M, 16] for bf16/fp16; these run in the traced graph, outside any custom op), and
``thresholded_linear`` applies the same batch policy with it: the whole rows' top-p set, each rank
keeping its shard of it. ``gate_up_proj``'s input is replicated on every rank: no all-reduce.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vllm_sparsity.kernels._registry import custom_op
from vllm_sparsity.kernels.common import check_x
from vllm_sparsity.kernels.sparse_gemv import DTYPES, _sparse_gemv
from vllm_sparsity.kernels.top_p_threshold import launch, sparsify, top_p_threshold_sharded

# Largest batch (rows of x) sent to the sparse GEMV; above it, mask + dense GEMM. Untimed guess.
M_MAX = 8


def crossover_of(layer: torch.nn.Module) -> dict:
    """The backend interface's ``crossover``: the fixed ``M_MAX``, not measured (module doc)."""
    return {"m_max": M_MAX, "measured": False,
            "source": "fixed (triton_backend.M_MAX), not yet measured on a GPU"}


def unsupported_reason(layer: torch.nn.Module) -> str | None:
    """Why this backend cannot serve ``layer`` (None when it can): it needs a plain 2-D bf16/fp16
    weight (unquantized), on CUDA or on CPU under TRITON_INTERPRET=1. Checkable before loading."""
    import triton

    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return "layer has no 2-D weight (quantized or packed layers are not supported)"
    if w.dtype not in DTYPES:
        return f"weight dtype {w.dtype} is not bfloat16/float16 (quantized layers are unsupported)"
    if w.device.type != "cuda" and not (w.device.type in ("cpu", "meta")
                                        and triton.knobs.runtime.interpret):
        return f"weight on {w.device}: needs CUDA, or CPU with TRITON_INTERPRET=1"
    return None


def prepare(layer: torch.nn.Module) -> None:
    """Store ``layer.weight`` K-major: storage [K, N] contiguous, ``layer.weight`` its [N, K]
    transposed view. Idempotent.

    Raises:
        ValueError: ``unsupported_reason(layer)`` is not None.
    """
    reason = unsupported_reason(layer)
    if reason is not None:
        raise ValueError(f"triton sparsity backend: {reason}")
    w = layer.weight
    N, K = w.shape
    if N > 1 and K > 1 and w.stride() == (1, N):
        return  # already K-major
    # Replace .data, not the Parameter: its attributes (weight_loader, ...) stay attached.
    w.data = w.data.t().contiguous().t()


def kmajor_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The K-major weight ``Wt [K, N]`` (a view: ``layer.weight.t()``) of a prepared layer."""
    return layer.weight.t()


def column_bytes(layer: torch.nn.Module) -> int:
    """Bytes of one row of ``Wt [K, N]`` (one input feature's weights), what the sparse GEMV skips
    per dropped input."""
    w = layer.weight
    return w.shape[0] * w.element_size()


def _input_sparse_linear_fake(x, p, wt, bias=None, m_max=M_MAX, skip_rule=False):
    return (x.new_empty(x.shape[0], wt.shape[1]), x.new_empty(x.shape[0], dtype=torch.int64),
            x.new_empty(1, dtype=torch.int64))


def _keep(x: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """bool [M, K]: the entries of x [M, K] (bf16/fp16) that thr int32 [M] keeps, code >= thr."""
    code = x.view(torch.int16).to(torch.int32) & 0x7FFF  # common.magnitude_code
    return code >= thr[:, None]


def _columns_read(keep: torch.Tensor) -> torch.Tensor:
    """int64 [1]: rows of Wt that ``_sparse_gemv_kernel`` loads for the mask keep bool [M, K]
    (``_keep``): those some row keeps (one M tile, as M <= M_MAX <= BLOCK_M)."""
    return keep.any(dim=0).sum().view(1)


def _batch_policy(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, m_max: int,
                  threshold: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                  masked: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                  skip_rule: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch policy of the module doc, for both ops: up to ``m_max`` rows, ``threshold()``
    (thr int32 [M], kept) feeds the sparse GEMV; above, ``masked()`` (sparsified x, kept) feeds the
    dense GEMM, or with ``skip_rule`` (speed mode) x itself (kept = K, every column read).
    Returns ``(y, kept, columns_read)``."""
    if x.shape[0] <= m_max:
        thr, kept = threshold()
        return _sparse_gemv(x, thr, wt, bias), kept, _columns_read(_keep(x, thr))
    if skip_rule:
        full = torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)
        return F.linear(x, wt.t(), bias), full, full[:1].clone()
    xs, kept = masked()
    return F.linear(xs, wt.t(), bias), kept, kept.new_full((1,), x.shape[1])


@custom_op("input_sparse_linear", _input_sparse_linear_fake)
def input_sparse_linear(x: torch.Tensor, p: torch.Tensor, wt: torch.Tensor,
                        bias: torch.Tensor | None = None,
                        m_max: int = M_MAX, skip_rule: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = top_p(x) @ wt (+ bias)``, kept counts and weight rows read
    (``torch.ops.vllm_sparsity.input_sparse_linear``).

    Args:
        x: activations [M, K], bf16/fp16, unit stride along K.
        p: float64 on x's device, share of each row's L1 mass kept, in (0, 1]: one element, or one
            per row ([M] / [M, 1], contiguous: per-request p).
        wt: K-major weight [K, N], x's dtype, contiguous (``kmajor_weight(layer)``).
        bias: optional [N], x's dtype.
        m_max: rows up to which the sparse GEMV runs; above it, mask then dense GEMM.
        skip_rule: above ``m_max``, no mask (speed mode): the dense GEMM on x, kept = K.

    Returns:
        ``(y, kept, columns_read)``: y [M, N] in x's dtype; kept int64 [M], inputs kept per row
        (the torch rule's count); columns_read int64 [1], rows of wt loaded (the union of the
        rows' kept inputs on the sparse path, all K on the dense one).

    Raises:
        ValueError: as ``top_p_threshold`` and ``sparse_gemv``.
    """
    return _batch_policy(x, wt, bias, m_max, lambda: launch(x, p), lambda: sparsify(x, p),
                         skip_rule)


def _thresholded_linear_fake(x, thr, wt, bias=None, m_max=M_MAX, skip_rule=False):
    return _input_sparse_linear_fake(x, None, wt, bias, m_max)


@custom_op("thresholded_linear", _thresholded_linear_fake)
def thresholded_linear(x: torch.Tensor, thr: torch.Tensor, wt: torch.Tensor,
                       bias: torch.Tensor | None = None,
                       m_max: int = M_MAX, skip_rule: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_sparse_linear`` with the threshold given instead of p
    (``torch.ops.vllm_sparsity.thresholded_linear``): for a threshold found across shards of K
    (``top_p_threshold_sharded``). Same batch policy, same outputs.

    Args:
        x: activations [M, K] (this rank's shard of K), bf16/fp16, unit stride along K.
        thr: int32 [M] on x's device: x[m, k] is kept iff ``code(x[m, k]) >= thr[m]`` (0 keeps
            the row whole).
        wt, bias, m_max, skip_rule: as ``input_sparse_linear``.

    Returns:
        ``(y, kept, columns_read)`` as ``input_sparse_linear`` (kept: of this shard).

    Raises:
        ValueError: as ``sparse_gemv``.
    """
    check_x(x, "x", DTYPES)
    keep = _keep(x, thr)
    kept = keep.sum(dim=-1)
    return _batch_policy(
        x, wt, bias, m_max, lambda: (thr, kept),
        lambda: (torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)), kept),
        skip_rule)


def apply_counted(layer: torch.nn.Module, x2: torch.Tensor, p: torch.Tensor,
                  bias: torch.Tensor | None = None,
                  all_reduce: Callable[[torch.Tensor], None] | None = None,
                  mode: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's output for input x2 under the top-p rule, through the Triton kernels.

    Args:
        layer: a linear layer that went through ``prepare``.
        x2: input [M, K] in the weight's dtype.
        p: float64 [1] (``layer.sparsity_p``) or [M, 1] (the step's per-token p, see
            ``state.RuntimeState.token_p``).
        bias: the bias vLLM passes to ``quant_method.apply`` (None when it adds it itself).
        all_reduce: None when x2 holds whole rows; for x2 a shard of K across TP ranks, the
            in-place sum over them (see ``top_p_threshold_sharded``): the rule is then the global
            one, and every rank must call this together.
        mode: ``"speed"``: no rule past ``M_MAX`` rows (the dense GEMM on x2, kept = K). Under TP
            the sharded threshold still runs there (it is traced outside the op, and its
            all-reduces must match on every rank); only its result is unused.

    Returns:
        ``(y2, kept_per_row, columns_read)``: y2 [M, N] in x2's dtype (this shard's partial
        product under TP); kept_per_row int64 [M]; columns_read int64 [1], weight columns loaded
        (see ``input_sparse_linear``).

    Raises:
        ValueError: shapes/dtypes the kernels refuse.
    """
    skip_rule = mode == "speed"
    if all_reduce is None:
        return input_sparse_linear(x2, p, kmajor_weight(layer), bias, M_MAX, skip_rule)
    thr = top_p_threshold_sharded(x2, p, all_reduce)
    return thresholded_linear(x2, thr, kmajor_weight(layer), bias, M_MAX, skip_rule)
