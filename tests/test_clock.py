"""The MLP clock: host time of each MLP forward, per batch phase."""

import time

import torch

from vllm_sparsity import clock
from vllm_sparsity.counters import DECODE, PAD, PREFILL


def test_mlp_clock_times_each_forward_in_its_batch_phase():
    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.003)
            return x * 2

    mlp, mlp_clock = Slow(), clock.CLOCK
    clock.time_mlp(mlp)
    before = mlp_clock.snapshot()
    mlp_clock.batch_phase = torch.full((1,), DECODE)  # as RuntimeState.mark_phases writes it
    assert torch.equal(mlp(torch.ones(2)), torch.full((2,), 2.0))
    mlp_clock.batch_phase.fill_(PAD)  # dummy runs are not timed
    mlp(torch.ones(2))
    after = mlp_clock.snapshot()
    assert sum(after["counts"][DECODE]) - sum(before["counts"][DECODE]) == 1
    assert after["counts"][PREFILL] == before["counts"][PREFILL]
    assert after["sums"][DECODE] - before["sums"][DECODE] >= 0.003
