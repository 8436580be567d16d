"""Plain-torch reference of the input-sparse GEMV and its tolerance (tests and benchmark).

No Triton here: the benchmark imports it on a GPU without switching the interpreter on.
"""

import torch

from vllm_sparsity.rule import top_p_mask


def ref_sparse_gemv(x, p, w, bias=None, mask=None):
    """float64 ``where(top_p_mask(x), x, 0) @ w.T + bias`` and the bound of |x|.|w| that scales
    fp32 rounding: ``(|xm| @ |w|.T + |bias|)``. ``mask``: the kept entries, if not x's own top-p
    set (a shard of K keeps its slice of the whole rows' set)."""
    xm = torch.where(top_p_mask(x, p) if mask is None else mask, x, 0).double()
    out, mag = xm @ w.double().t(), xm.abs() @ w.double().abs().t()
    if bias is not None:
        out, mag = out + bias.double(), mag + bias.double().abs()
    return out, mag


# Tolerances. Products of two bf16 (8-bit significands) or fp16 (11-bit) values are exact in fp32,
# so the kernel's only errors are (a) fp32 accumulation in its own order, at most (K + 1) * 2^-24 of
# sum |x w| + |bias| (gamma_K; the +1 is the bias add), and (b) rounding the result to the output
# dtype. (b) is allowed one ulp, 2^-7 relative for bf16 and 2^-10 for fp16 (an ulp is at most that
# share of the value): round-to-nearest on the GPU costs half of it, a dense GEMM that rounds the
# product before adding the bias twice that. (Triton 3.9's interpreter, which these tests run,
# truncates fp32 -> bf16 casts; under it ``sparse_gemv`` rounds its bf16 results on the host, to
# nearest as the GPU does: test_sparse_gemv.py's test_output_rounds_to_nearest_even.) fp16 adds its
# subnormal spacing 2^-24 in absolute terms.
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def assert_close_to_ref(y, ref, mag, k):
    """y (kernel output, bf16/fp16) within the bound above of ``ref_sparse_gemv``'s (ref, mag)."""
    assert y.dtype in ULP
    bound = ULP[y.dtype] * mag + (k + 1) * 2.0**-24 * mag + 2.0**-24
    err = (y.double() - ref).abs()
    finite = ref.isfinite()
    assert torch.equal(y.isnan(), ref.isnan())  # a NaN row stays NaN, nothing else turns NaN
    assert (err[finite] <= bound[finite]).all(), f"max excess {(err - bound)[finite].max():.3g}"
