"""Magnitude codes: a non-negative float's bit pattern, read as an integer, orders like its value.

The top-p rule (``rule.py``) and the Triton kernels (``kernels/``) both search a row's threshold
over these codes instead of sorting; this is their one table. Imports torch only, so the kernels
stay importable without vLLM.
"""

import torch

# dtype -> (integer view, code bits (the sign bit excluded), radix digit widths from the top (the
# torch rule's levels), code of +Inf).
CODE = {
    torch.bfloat16: (torch.int16, 15, (8, 7), 0x7F80),
    torch.float16: (torch.int16, 15, (8, 7), 0x7C00),
    torch.float32: (torch.int32, 31, (8, 8, 8, 7), 0x7F800000),
}
CODE_BITS = {dtype: bits for dtype, (_, bits, _, _) in CODE.items()}
INF_CODE = {dtype: inf for dtype, (_, _, _, inf) in CODE.items()}
# Short names, as Triton spells pointer types (``*bf16``) and the compile check labels its builds.
SHORT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
