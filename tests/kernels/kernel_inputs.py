"""Shared by the kernel tests: Triton's interpreter on (``triton_interpreter``), then inputs.

The kernels run on CPU tensors through Triton's interpreter, which must be on before Triton is
first imported (see tests/triton_interpreter.py): tests/conftest.py turns it on for the whole
session; importing this module checks that it is (and turns it on when this module is imported
outside pytest, before anything else imported Triton).

Not a conftest.py: tests/test_serve.py does ``from conftest import ...``, which resolves to the
last conftest pytest loaded, and one here would shadow tests/conftest.py.
"""

import triton_interpreter  # noqa: I001  (first: before anything imports triton)
import pytest
import torch

triton_interpreter.check()


@pytest.fixture(params=["interpreter", "gpu"])
def launch_config(request, monkeypatch):
    """Run the test under both launch configurations of the kernels (import this fixture into the
    test module): the interpreter's (what CPU runs use: few programs, no split-K) and the GPU's
    (BLOCK_N = 64, the threshold's BLOCK = 1024, split-K by default: what the GPU runs), see
    ``sparse_gemv.INTERP_TILE``. Same kernels, so both must pass the same tests."""
    from vllm_sparsity.kernels import common

    monkeypatch.setattr(common, "GPU_CONFIG_UNDER_INTERPRETER", request.param == "gpu")
    return request.param


def activations(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[m, k] of ``dtype``: normal entries with a per-row scale spread over e^0..e^4, like real
    activations (the generator of tests/test_rule.py)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).mul(4).exp()
    return x.to(dtype)


def with_edge_rows(x: torch.Tensor) -> torch.Tensor:
    """x (at least 4 rows) with row 0 all zero, row 1 holding a NaN, row 2 a massive outlier (3000
    among entries of order 1-50: paper App. A.3), row 3 a tie at its largest magnitude."""
    x = x.clone()
    x[0] = 0
    x[1, x.shape[1] // 3] = float("nan")
    x[2, 5] = 3000.0
    top = int(x[3].abs().argmax())
    x[3, (top + 1) % x.shape[1]] = -x[3, top]
    return x


def ptensor(p: float) -> torch.Tensor:
    """p as the float64 [1] tensor the kernels read (like ``layer.sparsity_p``)."""
    return torch.tensor([p], dtype=torch.float64)
