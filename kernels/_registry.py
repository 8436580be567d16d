"""The one way ops of vllm-sparsity are registered under the ``vllm_sparsity`` namespace.

- ``custom_op(name, fake)``: a Python launcher as a ``torch.library.custom_op`` with its fake impl
  (the Triton launchers, ``grouped_linear``). The default.
- ``dispatcher_op(name, schema, fn, fake, dispatch_key)``: a Python function as a plain dispatcher
  kernel (``torch.library.Library``), for ops a decode step calls several times per MLP
  (``mlp_clock``, ``cpu_input_sparse_linear``): ``custom_op``'s wrapper costs several times a plain
  kernel per call 
  (``kernels/bench/results/cpu-avx2-2026-12-01/measurements.md``).
- ``register_fake(name, fake)``: the fake impl of an op defined elsewhere (the C++ ops of
  ``kernels/cpu/``, which register their kernels with ``TORCH_LIBRARY_FRAGMENT``).

A custom op is opaque to torch.compile (Dynamo traces the fake impl for shapes only) and records
into CUDA graphs like any kernel launch, so the launchers must not sync the host; they only read
tensor metadata. Every registration is guarded: when the op already exists (a module imported
twice, e.g. under two names, or reloaded) the existing one stays, since torch refuses a second.
"""

from collections.abc import Callable

import torch

NAMESPACE = "vllm_sparsity"
# The Library objects of ``dispatcher_op``: a Library owns its registrations while it lives.
_LIBRARIES: list[torch.library.Library] = []


def _existing(name: str):
    return getattr(getattr(torch.ops, NAMESPACE), name, None)


def custom_op(name: str, fake: Callable):
    """Register ``fn`` as ``torch.ops.vllm_sparsity.<name>`` with fake impl ``fake`` (a
    decorator; ``fn``'s annotations give the schema). Returns the op."""

    def wrap(fn):
        existing = _existing(name)
        if existing is not None:
            return existing
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
        op.register_fake(fake)
        return op

    return wrap


def dispatcher_op(name: str, schema: str, fn: Callable, fake: Callable,
                  dispatch_key: str) -> None:
    """Define ``torch.ops.vllm_sparsity.<name>`` with ``schema`` (the part after the name, e.g.
    ``"(Tensor x, bool start) -> Tensor"``) and register ``fn`` as its kernel for
    ``dispatch_key`` (``"CPU"``, ``"CompositeExplicitAutograd"``, ...) and ``fake`` as its fake
    impl."""
    if _existing(name) is not None:
        return
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    lib.define(name + schema)
    lib.impl(name, fn, dispatch_key)
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake)
    _LIBRARIES.append(lib)


def register_fake(name: str, fake: Callable) -> None:
    """Register ``fake`` as the fake impl of ``torch.ops.vllm_sparsity.<name>``, an op defined
    elsewhere (C++)."""
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake)
