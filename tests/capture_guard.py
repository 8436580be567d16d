"""A guard for CUDA-graph capture safety that works without a GPU.

Under a full CUDA graph (vLLM's default on CUDA) the plugin's per-step code runs once inside
``torch.cuda.graph`` and is replayed without Python. There a host-to-device copy, a host sync or a
data-dependent shape either fails the capture or is frozen at its capture-time value. On CPU such
copies are CPU to CPU and nothing fails, so ``CaptureGuard`` looks at the ops themselves: it fails
on every op that builds a tensor from Python data (``aten.lift_fresh``: ``torch.tensor(...)``),
reads a tensor on the host (``aten._local_scalar_dense`` or ``aten.item``: ``.item()``,
``int(t)``; ``Tensor.tolist``, ``Tensor.numpy``, which dispatch nothing), has a data-dependent
output shape (``nonzero``, boolean indexing, ``masked_select``, ``unique``...) or copies from the
CPU to another device, when the code that called it belongs to ``scope`` (the innermost frame
outside torch).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import vllm_sparsity

# The plugin's code: vllm_sparsity/ and kernels/ (installed as vllm_sparsity.kernels).
PLUGIN = (Path(vllm_sparsity.__file__).resolve().parent,
          Path(importlib.util.find_spec("vllm_sparsity.kernels").origin).resolve().parent)
_TORCH = Path(torch.__file__).resolve().parent
_HERE = Path(__file__).resolve()

# Under torch.inference_mode (vLLM's workers), int(t) / t.item() dispatch aten::item.
_HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}
_FROM_PYTHON = {"aten::lift_fresh", "aten::lift_fresh_copy", "aten::lift"}
_DATA_DEPENDENT = {"aten::nonzero", "aten::masked_select", "aten::_unique", "aten::_unique2",
                   "aten::unique_dim", "aten::unique_consecutive", "aten::repeat_interleave",
                   "aten::argwhere"}
_COPIES = {"aten::_to_copy", "aten::copy_", "aten::to"}


class CaptureSafetyError(AssertionError):
    pass


def _caller() -> tuple[Path, int] | None:
    """The innermost frame outside torch and this module."""
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if not (path == _HERE or path.is_relative_to(_TORCH)):
            return path, frame.f_lineno
        frame = frame.f_back
    return None


class CaptureGuard:
    """Context manager: raise ``CaptureSafetyError`` at the first capture-unsafe op whose caller
    lies under ``scope`` (directories or files); with ``strict=False`` only record it.
    ``violations`` lists ``(op, file:line)``."""

    def __init__(self, scope: Path | tuple[Path, ...] = PLUGIN, strict: bool = True) -> None:
        self.strict = strict
        scopes = scope if isinstance(scope, tuple) else (scope,)
        self.scope = tuple(Path(s).resolve() for s in scopes)
        self.violations: list[tuple[str, str]] = []
        guard = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                guard._check_op(func._schema.name, args, kwargs)
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.item):
                    guard._flag(f"Tensor.{func.__name__}")
                return func(*args, **(kwargs or {}))

        self._modes = (_Function(), _Dispatch())

    def _flag(self, what: str) -> None:
        caller = _caller()
        if caller is not None and any(caller[0].is_relative_to(s) for s in self.scope):
            where = f"{caller[0]}:{caller[1]}"
            self.violations.append((what, where))
            if self.strict:
                raise CaptureSafetyError(f"capture-unsafe {what} at {where}")

    def _check_op(self, name: str, args, kwargs) -> None:
        if name in _HOST_READS:
            self._flag(f"{name} (host read of a tensor)")
        elif name in _FROM_PYTHON:
            self._flag(f"{name} (tensor built from Python data)")
        elif name in _DATA_DEPENDENT:
            self._flag(f"{name} (data-dependent shape)")
        elif name == "aten::index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i
                is not None):
            self._flag(f"{name} with a boolean mask (data-dependent shape)")
        elif name in _COPIES:
            src = args[1] if name == "aten::copy_" else args[0]
            dst = args[0].device if name == "aten::copy_" else kwargs.get("device")
            if (isinstance(src, torch.Tensor) and src.device.type == "cpu"
                    and dst is not None and torch.device(dst).type != "cpu"):
                self._flag(f"{name} (host-to-device copy)")

    def __enter__(self) -> CaptureGuard:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
