"""Shared by the kernel tests: importing this module turns Triton's interpreter on, then inputs.

Import it before ``vllm_sparsity.kernels`` in every test module that runs kernels (tests/kernels is
on pytest's ``pythonpath``, so ``import kernel_inputs`` works). The kernels run on CPU tensors
through Triton's interpreter. ``@triton.jit`` picks interpreter or compiler when it decorates a kernel (triton 3.9
``runtime/jit.py``: ``if knobs.runtime.interpret`` in ``jit``), and the launchers read the same knob
at launch, so it must be on before the kernel modules are imported.

Not a conftest.py: tests/test_serve.py does ``from conftest import ...``, which resolves to the
last conftest pytest loaded, and one here would shadow tests/conftest.py.

The value is pinned in the knob (``triton.knobs.runtime.interpret = True``; an assigned knob wins
over the environment) and TRITON_INTERPRET is removed from the environment again, so that
subprocesses of the session (the vLLM servers of tests/test_serve.py, the compile check) do not
inherit it. The sm_80/sm_90 compile check needs the compiler: ``test_compile.py`` runs it in a
subprocess.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
# Triton 3.9 warns once per process unless this is set; 1 keeps its current default (fusion on).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402

triton.knobs.runtime.interpret = True
del os.environ["TRITON_INTERPRET"]

_kernels = sys.modules.get("vllm_sparsity.kernels.top_p_threshold")
_interpreted = type(getattr(_kernels, "_top_p_threshold_kernel", None)).__name__
if _kernels is not None and _interpreted != "InterpretedFunction":
    raise RuntimeError("vllm_sparsity.kernels was imported before tests/kernels/kernel_inputs.py "
                       "turned Triton's interpreter on: import kernel_inputs first")

import pytest  # noqa: E402
import torch  # noqa: E402


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
