"""Turn Triton's interpreter on for the whole test session, before anything imports Triton.

Imported first by tests/conftest.py (and by tests/kernels/kernel_inputs.py), so that the kernel
tests run ``@triton.jit`` kernels on CPU tensors in any order and beside any other test module.

``@triton.jit`` picks interpreter or compiler when it decorates a function (triton 3.9
``runtime/jit.py``: ``if knobs.runtime.interpret`` in ``jit``). That holds for Triton's own
helpers too: ``triton.language.standard`` (``tl.zeros``, ``tl.sum``'s combine functions, ...) is
decorated once, when ``triton`` is first imported. Importing vLLM imports ``torch._dynamo``, whose
``has_triton_package()`` imports ``triton``; if that happens before the interpreter is on, every
interpreted kernel that calls ``tl.zeros`` fails with "Cannot call @triton.jit'd outside of the
scope of a kernel". So the switch must precede the first import of Triton, not only the first
import of the kernels.

The value is pinned in the knob (``triton.knobs.runtime.interpret = True``; an assigned knob wins
over the environment) and TRITON_INTERPRET is removed from the environment again, so that
subprocesses of the session (the vLLM servers, the compile check) do not inherit it. The sm_80/sm_90
compile check needs the compiler: ``test_compile.py`` runs it in a subprocess.
"""

import os
import sys

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
# Triton 3.9 warns once per process unless this is set; 1 keeps its current default (fusion on).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
import triton.language.standard  # noqa: E402

triton.knobs.runtime.interpret = True
os.environ.pop("TRITON_INTERPRET", None)


def check() -> None:
    """Raise when Triton's own @jit helpers were built for the compiler (Triton imported before
    this module), or the kernels were imported before the interpreter was on."""
    helper = type(triton.language.standard.zeros).__name__
    if helper != "InterpretedFunction":
        raise RuntimeError(
            "triton was imported before tests/triton_interpreter.py turned its interpreter on "
            f"(triton.language.standard.zeros is a {helper}): interpreted kernels would fail with "
            "\"Cannot call @triton.jit'd outside of the scope of a kernel\". Import "
            "triton_interpreter before anything that imports triton (torch._dynamo, vllm).")
    kernels = sys.modules.get("vllm_sparsity.kernels.top_p_threshold")
    kernel = type(getattr(kernels, "_top_p_threshold_kernel", None)).__name__
    if kernels is not None and kernel != "InterpretedFunction":
        raise RuntimeError("vllm_sparsity.kernels was imported before tests/triton_interpreter.py "
                           "turned Triton's interpreter on: import it first")


check()
