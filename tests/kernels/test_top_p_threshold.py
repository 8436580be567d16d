"""The threshold kernel against the torch rule: equal masks, kept counts and sparsified bits."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_inputs import activations, ptensor, with_edge_rows  # first: interpreter on
from kernel_inputs import launch_config  # noqa: F401  (fixture: both launch configurations)
from reference import loop_top_p_mask, paper_top_p_mask

from vllm_sparsity import rule
from vllm_sparsity.kernels import top_p_threshold as tpt

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
PS = [0.3, 0.5, 0.9, 1.0]
_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def kernel_mask(x: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    code = x.view(_INT[x.dtype]).to(torch.int64) & ((1 << (x.element_size() * 8 - 1)) - 1)
    return code >= thr.to(torch.int64)[:, None]


def assert_same_as_rule(x: torch.Tensor, p: float) -> None:
    """One kernel run (threshold, counts and sparsified x together) against the torch rule."""
    pt = ptensor(p)
    y = torch.empty_like(x)
    thr, kept = tpt.launch(x, pt, y)
    ref_y, ref_kept = rule.top_p_sparsify(x, pt)
    assert thr.dtype == torch.int32 and kept.dtype == torch.int64
    assert torch.equal(kernel_mask(x, thr), rule.top_p_mask(x, pt))
    assert torch.equal(kept, ref_kept)
    iv = _INT[x.dtype]
    assert torch.equal(y.view(iv), ref_y.view(iv))  # bit for bit, NaNs and signed zeros included
    t = rule.top_p_threshold(x, pt)[:, 0]  # the same threshold, as a value (NaN: keep the row)
    assert torch.equal(thr[~t.isnan()].to(iv), t[~t.isnan()].view(iv))
    assert torch.equal(thr[t.isnan()], torch.zeros_like(thr[t.isnan()]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", PS)
def test_mask_equals_torch_rule(dtype, p, launch_config):
    # K = 1100: not a multiple of BLOCK (1024), two chunks per pass (one under the interpreter's
    # launch configuration). 8 rows: all-zero, NaN, outlier and tie rows among ordinary ones.
    assert_same_as_rule(with_edge_rows(activations(8, 1100, dtype, seed=1)), p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 5, 33])
def test_mask_equals_torch_rule_any_batch(dtype, m):
    # One program per row, so M only changes the grid; 33 stands for a prefill batch.
    x = activations(m, 300, dtype, seed=m)
    if m >= 4:
        x = with_edge_rows(x)
    assert_same_as_rule(x, 0.5 if m % 2 else 0.9)


def test_longest_rows():
    # K = 32768 - 7 (32768 is the largest target; Gemma-3-27B's intermediate is 21504): two chunks
    # of INTERP_BLOCK under the interpreter's launch configuration.
    x = activations(2, 32768 - 7, torch.bfloat16, seed=5)
    x[1, 100] = 5e4  # an outlier holding most of the row's mass
    assert_same_as_rule(x, 0.9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_cases_as_documented(dtype):
    """The contract itself (vllm_sparsity/rule.py's module doc), against the paper's sort rule."""
    x = with_edge_rows(activations(5, 300, dtype, seed=2))
    x[4] = 0
    x[4, [3, 7, 9]] = torch.tensor([float("inf"), 1.0, float("-inf")], dtype=dtype)
    thr, kept = tpt.top_p_threshold(x, ptensor(0.9))
    mask = kernel_mask(x, thr)
    assert kept[0] == 0 and not mask[0].any()  # all-zero row keeps nothing
    assert kept[1] == 300 and mask[1].all()  # NaN row kept whole
    assert mask[2, 5]  # the outlier is kept
    assert mask[4].tolist() == [k in (3, 9) for k in range(300)]  # Inf keeps only the infinities
    assert torch.equal(mask[2:4], paper_top_p_mask(x[2:4], 0.9))  # ties kept together
    thr1, kept1 = tpt.top_p_threshold(x, ptensor(1.0))
    assert torch.equal(kernel_mask(x, thr1)[[0, 2, 3]], x[[0, 2, 3]] != 0)  # p = 1: every nonzero


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32),
                       min_size=1, max_size=150),
       p=st.floats(min_value=0.01, max_value=1.0),
       dtype=st.sampled_from(DTYPES))
def test_mask_equals_naive_loop(values, p, dtype):
    x = torch.tensor([values], dtype=torch.float32).to(dtype)
    thr, _ = tpt.top_p_threshold(x, ptensor(p))
    assert torch.equal(kernel_mask(x, thr), loop_top_p_mask(x, p))


def test_strided_rows():
    x = activations(4, 700, torch.bfloat16, seed=3)[:, 100:600]  # row stride 700, K 500
    assert_same_as_rule(x, 0.7)


def test_empty_batch():
    thr, kept = tpt.top_p_threshold(torch.zeros(0, 64, dtype=torch.bfloat16), ptensor(0.5))
    assert thr.shape == (0,) and kept.shape == (0,)


def two_rank_all_reduce(monkeypatch, other_shard):
    """Tensor parallelism, simulated for rank 0: its all-reduce adds rank 1's masses for the same
    (lo, shift) as rank 0's last partial-mass call, which rank 1 would compute as its decisions
    are the same."""
    last_call = {}
    partial = tpt.top_p_partial_mass

    def recording_partial(xs, lo, shift):
        last_call.update(lo=lo, shift=shift)
        return partial(xs, lo, shift)

    def all_reduce(masses):
        masses += partial(other_shard, last_call["lo"], last_call["shift"])

    monkeypatch.setattr(tpt, "top_p_partial_mass", recording_partial)
    return all_reduce


@pytest.mark.parametrize("dtype", DTYPES)
def test_sharded_threshold_equals_unsharded(dtype, monkeypatch, launch_config):
    """Tensor parallelism, simulated: rank 0 holds x[:, :K0]; its all-reduce adds rank 1's masses
    for the same (lo, shift), which rank 1 would compute as its decisions are the same."""
    x = with_edge_rows(activations(5, 900, dtype, seed=4))
    shards = x[:, :350].contiguous(), x[:, 350:].contiguous()
    all_reduce = two_rank_all_reduce(monkeypatch, shards[1])
    for p in (0.5, 0.9, 1.0):
        thr = tpt.top_p_threshold_sharded(shards[0], ptensor(p), all_reduce)
        full, _ = tpt.top_p_threshold(x, ptensor(p))
        assert torch.equal(thr, full)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 3, 4), "x must be a 2-D"),
    (torch.zeros(2, 3, dtype=torch.int32), "x must be one of"),
    (torch.zeros(3, 2, dtype=torch.bfloat16).t(), "unit stride"),
])
def test_bad_x_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        tpt.top_p_threshold(bad, ptensor(0.5))


def test_bad_p_raises():
    x = activations(2, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="p must be"):
        tpt.top_p_threshold(x, torch.tensor([0.5]))  # float32


def test_public_ops_wrap_the_launcher():
    x = with_edge_rows(activations(4, 200, torch.float16))
    thr, kept = tpt.top_p_threshold(x, ptensor(0.6))
    y, kept_y = tpt.top_p_sparsify(x, ptensor(0.6))
    ref_y, ref_kept = rule.top_p_sparsify(x, 0.6)
    assert torch.equal(kernel_mask(x, thr), rule.top_p_mask(x, 0.6))
    assert torch.equal(kept, ref_kept) and torch.equal(kept_y, ref_kept)
    assert torch.equal(y.view(torch.int16), ref_y.view(torch.int16))


def test_custom_ops_registered_with_fake_impls():
    x = activations(3, 40, torch.bfloat16)
    p = ptensor(0.5)
    torch.library.opcheck(torch.ops.vllm_sparsity.top_p_threshold, (x, p))
    torch.library.opcheck(torch.ops.vllm_sparsity.top_p_sparsify, (x, p))
    torch.library.opcheck(torch.ops.vllm_sparsity.top_p_partial_mass,
                          (x, torch.zeros(3, dtype=torch.int64), 12))
    assert math.isfinite(tpt.top_p_partial_mass(x, torch.zeros(3, dtype=torch.int64), 12).sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["m1", "m"])
def test_per_row_p_is_each_rows_sort_rule(dtype, shape, launch_config):
    # Per-request p: one float64 p per row ([M, 1], or [M]); each row is the paper's rule at its p.
    ps = [0.5, 0.9, 1.0, 0.3, 0.7, 0.5, 0.99]
    x = activations(len(ps), 333, dtype, seed=6)
    p = torch.tensor(ps, dtype=torch.float64)
    p = p[:, None] if shape == "m1" else p
    y = torch.empty_like(x)
    thr, kept = tpt.launch(x, p, y)
    rows = torch.stack([paper_top_p_mask(x[i:i + 1], pi)[0] for i, pi in enumerate(ps)])
    assert torch.equal(kernel_mask(x, thr), rows)
    assert torch.equal(kept, rows.sum(-1))
    assert torch.equal(y != 0, rows)


def test_per_row_p_sharded_equals_unsharded(monkeypatch):
    ps = [0.5, 0.9, 1.0, 0.3, 0.7]
    x = with_edge_rows(activations(len(ps), 900, torch.bfloat16, seed=4))
    shards = x[:, :350].contiguous(), x[:, 350:].contiguous()
    all_reduce = two_rank_all_reduce(monkeypatch, shards[1])
    p = torch.tensor(ps, dtype=torch.float64)[:, None]
    thr = tpt.top_p_threshold_sharded(shards[0], p, all_reduce)
    for m, pm in enumerate(ps):
        full, _ = tpt.top_p_threshold(x[m:m + 1], ptensor(pm))
        assert thr[m] == full[0], (m, pm)


def test_per_row_p_of_the_wrong_length_raises():
    x = activations(4, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="one element or be contiguous"):
        tpt.top_p_threshold(x, torch.full((3, 1), 0.5, dtype=torch.float64))
