"""What the kernels of this package share: the magnitude code in Triton, argument checks, and
whether they launch with the interpreter's configuration.

The dtype code tables themselves are ``vllm_sparsity.codes`` (torch only), shared with the torch
rule.
"""

import torch
import triton
import triton.language as tl

from vllm_sparsity.codes import CODE_BITS, INF_CODE  # noqa: F401  (the kernels' tables)

# Tests set this to run the GPU's launch configuration under Triton's interpreter (see
# sparse_gemv's INTERP_TILE and top_p_threshold's INTERP_BLOCK).
GPU_CONFIG_UNDER_INTERPRETER = False


def _fix_triton_36_interpreter_loop_bounds() -> None:
    """Make Triton 3.6's interpreter accept runtime loop bounds under numpy >= 2.4.

    The interpreter holds every runtime scalar (an argument, a program id) as a one-element numpy
    array, and 3.6 turns a ``range`` bound into an int with ``int(array)``, which numpy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"): every launch of a kernel with
    a runtime loop bound fails. No kernel code can avoid it (every scalar is such an array, and a
    constexpr bound would recompile per shape on the GPU). Triton 3.7 squeezes the array first
    (runtime/interpreter.py, ``_patch_lang_tensor``, ``__index__``); this applies the same change
    to 3.6, whose interpreter calls ``_patch_lang_tensor`` at every launch. Compiled kernels never
    use it.
    """
    if not triton.__version__.startswith("3.6."):
        return
    from triton.runtime import interpreter

    patch_lang_tensor = interpreter._patch_lang_tensor

    def patch_with_squeezed_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    if not getattr(patch_lang_tensor, "vllm_sparsity_fix", False):
        patch_with_squeezed_index.vllm_sparsity_fix = True
        interpreter._patch_lang_tensor = patch_with_squeezed_index


_fix_triton_36_interpreter_loop_bounds()


@triton.jit
def magnitude_code(x, CODE_BITS: tl.constexpr):
    """|x| as a non-negative int32 ordered like |x|: the bit pattern with the sign bit cleared."""
    if CODE_BITS == 15:
        # int16 sign-extends into int32; the mask then clears the sign bit and the extension.
        return x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


def interpreter_config() -> bool:
    """Whether the kernels of this package launch with the interpreter's configuration (see
    sparse_gemv's INTERP_TILE): Triton's interpreter is on and GPU_CONFIG_UNDER_INTERPRETER is not
    set."""
    return bool(triton.knobs.runtime.interpret) and not GPU_CONFIG_UNDER_INTERPRETER


def check_x(x: torch.Tensor, name: str = "x", dtypes=tuple(CODE_BITS)) -> None:
    """Raise ValueError unless ``name`` is a 2-D tensor of one of ``dtypes`` with unit stride in its
    last dimension, on CUDA (or on CPU when Triton runs in interpreter mode)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [M, K], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {[str(d) for d in dtypes]}, got {x.dtype}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension, got {x.stride()}")
    if x.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"{name} must be on a CUDA device (or set TRITON_INTERPRET=1 before "
                         f"importing triton to run on CPU), got {x.device}")


def check_p(p: torch.Tensor, x: torch.Tensor) -> int:
    """Raise ValueError unless ``p`` is a float64 tensor on x's device holding one p for every row
    (one element) or one per row of x [M, K] (shape [M] or [M, 1], contiguous, e.g. a slice of the
    per-token p buffer, for requests that carry their own p). Returns the row stride of p for a
    kernel: 0 for one p, 1 for one per row."""
    if not isinstance(p, torch.Tensor) or p.dtype != torch.float64:
        raise ValueError(f"p must be a float64 tensor, got {p!r}")
    if p.device != x.device:
        raise ValueError(f"p must be on x's device {x.device}, got {p.device}")
    if tuple(p.shape) in ((x.shape[0],), (x.shape[0], 1)) and p.is_contiguous():
        return 1  # also for M = 1: served layers always pass one p per row, so one variant compiles
    if p.numel() != 1:
        raise ValueError(f"p must have one element or be contiguous [M] / [M, 1] with M = "
                         f"{x.shape[0]} rows of x, got shape {tuple(p.shape)}")
    return 0
