"""Registration of the kernels' launchers as torch custom ops under the ``vllm_sparsity`` namespace.

A custom op is opaque to torch.compile (Dynamo traces the fake impl for shapes only) and records
into CUDA graphs like any kernel launch, so the launchers must not sync the host; they only read
tensor metadata.
"""

import torch

NAMESPACE = "vllm_sparsity"


def custom_op(name: str, fake):
    """Register ``fn`` as ``torch.ops.vllm_sparsity.<name>`` with fake impl ``fake``.

    Guarded: when the op already exists (a module imported twice, e.g. under two names, or
    reloaded), the existing op is returned instead of registering again, which torch refuses.
    """

    def wrap(fn):
        existing = getattr(getattr(torch.ops, NAMESPACE), name, None)
        if existing is not None:
            return existing
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
        op.register_fake(fake)
        return op

    return wrap
