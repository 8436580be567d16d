"""The torch top-p rule against the paper's sort rule, a naive loop, and its defining properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import loop_top_p_mask, paper_top_p_mask
from vllm_sparsity.rule import top_p_mask, top_p_sparsify

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _activations(m, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Per-row scales spread the magnitudes like real activations do.
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).mul(4).exp()
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 640), (7, 333), (64, 2048)])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.9, 0.99, 1.0])
def test_mask_equals_paper_sort_rule(dtype, shape, p):
    x = _activations(*shape, dtype)
    mask = top_p_mask(x, p)
    assert torch.equal(mask, paper_top_p_mask(x, p))
    if p < 1.0:
        assert 0 < mask.sum() < x.numel()  # the rule did something


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_equals_naive_loop(dtype):
    x = _activations(5, 97, dtype, seed=1)
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(top_p_mask(x, p), loop_top_p_mask(x, p))


def test_p_as_tensor_equals_p_as_float():
    x = _activations(8, 256, torch.bfloat16)
    p = torch.tensor([0.7], dtype=torch.float64)
    assert torch.equal(top_p_mask(x, p), top_p_mask(x, 0.7))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsify_zeroes_exactly_the_dropped_entries(dtype):
    x = _activations(9, 300, dtype)
    y, kept = top_p_sparsify(x, 0.8)
    mask = paper_top_p_mask(x, 0.8)
    assert y.dtype == x.dtype
    assert torch.equal(y[mask].view(torch.uint8), x[mask].view(torch.uint8))  # bit-identical
    assert torch.all(y[~mask] == 0)
    assert torch.equal(kept, mask.sum(-1))


def test_p_one_keeps_every_nonzero_bit_for_bit():
    # 1e-30 is absorbed by the float64 total of a row holding 1e30: p = 1 must still keep it.
    x = torch.tensor([[1e30, 1e-30, 0.0, -2.0], [0.5, -0.25, 0.0, 0.0]], dtype=torch.float32)
    y, kept = top_p_sparsify(x, 1.0)
    assert torch.equal(y, x)
    assert kept.tolist() == [3, 2]


def test_all_zero_row_keeps_nothing_and_stays_zero():
    x = torch.zeros(2, 16, dtype=torch.bfloat16)
    x[1, 3] = 2.0
    y, kept = top_p_sparsify(x, 0.5)
    assert kept.tolist() == [0, 1]
    assert torch.equal(y, x)


def test_nan_row_is_kept_whole():
    x = _activations(3, 64, torch.bfloat16)
    x[1, 5] = float("nan")
    y, kept = top_p_sparsify(x, 0.5)
    assert kept[1] == 64 and torch.isnan(y[1, 5])
    assert torch.equal(y[1, :5], x[1, :5])
    assert kept[0] < 64 and kept[2] < 64  # the other rows are still sparsified


def test_inf_carries_the_whole_mass():
    x = torch.tensor([[1.0, float("inf"), -3.0, float("-inf"), 2.0]], dtype=torch.float16)
    assert top_p_mask(x, 0.5).tolist() == [[False, True, False, True, False]]
    assert torch.equal(top_p_mask(x, 0.5), paper_top_p_mask(x, 0.5))


def test_massive_outlier_is_kept_alone():
    # Paper App. A.3: one massive activation holds nearly all of the row's L1 mass.
    x = _activations(4, 2048, torch.bfloat16) * 0.01
    x[:, 17] = 3000.0
    mask = top_p_mask(x, 0.9)
    assert mask.sum(-1).tolist() == [1, 1, 1, 1]
    assert mask[:, 17].all()


def test_ties_are_kept_together():
    x = torch.tensor([[4.0, 1.0, 1.0, -1.0, 1.0, 0.5]], dtype=torch.bfloat16)
    # 4 + 1 reaches 0.6 * 8.5; every entry tied at |x| = 1 is kept with the one that reached it.
    assert top_p_mask(x, 0.6).tolist() == [[True, True, True, True, True, False]]
    assert torch.equal(top_p_mask(x, 0.6), paper_top_p_mask(x, 0.6))


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 4), torch.zeros(4, dtype=torch.bfloat16),
                                 torch.zeros(2, 3, dtype=torch.int32)])
def test_bad_input_raises(bad):
    with pytest.raises(ValueError, match="x must be"):
        top_p_mask(bad, 0.5)


_finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_finite, min_size=1, max_size=200),
       p=st.floats(min_value=0.01, max_value=1.0, exclude_min=True),
       dtype=st.sampled_from(DTYPES))
def test_properties(values, p, dtype):
    x = torch.tensor([values], dtype=torch.float32).to(dtype)
    mask = top_p_mask(x, p)[0]
    a = x[0].abs().double()
    total = a.sum().item()
    assert torch.equal(mask, loop_top_p_mask(x, p)[0])
    assert not mask[a == 0].any()  # zeros are never kept
    if p >= 1.0:
        assert torch.equal(mask, a != 0)
        return
    kept_mass = a[mask].sum().item()
    assert kept_mass >= p * total  # coverage
    if mask.any():
        # Minimality: without the smallest kept magnitude (and its ties) the target is missed.
        smallest = a[mask].min()
        assert a[mask & (a > smallest)].sum().item() < p * total
    else:
        assert total == 0 or math.isclose(total, 0.0)
