"""Host-time histogram of MLP forwards per batch phase (CPU only), for
``vllm_sparsity_mlp_latency_seconds``.

Opaque ``mlp_clock`` ops around one MLP's forward feed ``CLOCK`` in the worker; the counts reach
the API server in the worker's snapshot (``counters.snapshot``). Valid on CPU only, where the
compiled graph runs its kernels synchronously on the calling thread: on CUDA kernels run
asynchronously and CUDA graphs replay no host code (``CUDA_NOTE``).
"""

from __future__ import annotations

import bisect
import functools
import time

import torch

from vllm_sparsity.counters import PAD, PHASES
from vllm_sparsity.kernels._registry import dispatcher_op

# MLP forward latency buckets (s): from a decode MLP of a small model to a long prefill of a
# large one.
LATENCY_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                     0.1, 0.25, 0.5, 1.0, 2.5)

CUDA_NOTE = ("vllm_sparsity_mlp_latency_seconds is not published on CUDA: kernels run "
             "asynchronously and CUDA graphs replay no host code, so host clocks around the MLP "
             "would time kernel launches, not the MLP; use vllm:inter_token_latency_seconds")


class MlpClock:
    """Host-time histogram of MLP forwards per batch phase, fed by the ``mlp_clock`` op."""

    def __init__(self) -> None:
        # The step's batch phase: RuntimeState's int64 [1] CPU buffer, written by mark_phases
        # and read here, inside the op, so that the step path itself never reads a tensor on the
        # host. None (nothing timed) until a RuntimeState with the clock on sets it.
        self.batch_phase: torch.Tensor | None = None
        self.start = 0.0
        self.reset()

    def reset(self) -> None:
        self.counts = [[0] * (len(LATENCY_BUCKETS_S) + 1) for _ in PHASES]  # last: +Inf
        self.sums = [0.0 for _ in PHASES]

    def tick(self, start: bool) -> None:
        now = time.perf_counter()
        if start:
            self.start = now
            return
        phase = PAD if self.batch_phase is None else int(self.batch_phase[0])
        if phase != PAD:
            dt = now - self.start
            self.counts[phase][bisect.bisect_left(LATENCY_BUCKETS_S, dt)] += 1  # dt <= le
            self.sums[phase] += dt

    def snapshot(self) -> dict:
        return {"counts": [list(c) for c in self.counts], "sums": list(self.sums)}


CLOCK = MlpClock()  # one model per worker process


def _mlp_clock(x: torch.Tensor, start: bool) -> torch.Tensor:
    CLOCK.tick(start)
    return x.clone()


# A plain dispatcher kernel (kernels/_registry.py): a decode step calls it twice per MLP.
dispatcher_op("mlp_clock", "(Tensor x, bool start) -> Tensor", _mlp_clock,
              lambda x, start: torch.empty_like(x), "CompositeExplicitAutograd")


def mlp_clock(x: torch.Tensor, start: bool) -> torch.Tensor:
    """Record the host time into ``CLOCK`` and return a copy of x
    (``torch.ops.vllm_sparsity.mlp_clock``). Opaque to torch.compile; the copy is the data
    dependency that keeps the MLP's first kernels after the start mark and its consumers after
    the end mark."""
    return torch.ops.vllm_sparsity.mlp_clock(x, start)


def time_mlp(mlp: torch.nn.Module) -> None:
    """Put ``mlp_clock`` marks around ``mlp``'s forward (an instance attribute: the class and the
    model code stay untouched; torch.compile traces through it)."""
    forward = mlp.forward

    @functools.wraps(forward)
    def timed_forward(x, *args, **kwargs):
        y = forward(mlp_clock(x, True), *args, **kwargs)
        return mlp_clock(y, False) if isinstance(y, torch.Tensor) else y

    mlp.forward = timed_forward
