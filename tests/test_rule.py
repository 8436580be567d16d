"""The torch top-p rule against the paper's sort rule, a naive loop, and its defining properties."""

import math

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_ranks
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


def test_float_p_just_below_one_is_not_rounded_up():
    # Found by test_properties: 1 - 2^-53 is 1.0 in float32; as p = 1 it would keep every nonzero.
    x = torch.tensor([[1.0, 1.1754943508222875e-38]], dtype=torch.bfloat16)
    assert top_p_mask(x, 0.9999999999999999).tolist() == [[True, False]]
    assert torch.equal(top_p_mask(x, 0.9999999999999999), loop_top_p_mask(x, 0.9999999999999999))


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


# Tensor parallelism: rows of K = 2048 split into uneven shards of 1000 and 1048 columns.
TP_SPLIT, TP_K = 1000, 2048


def _tp_rows(dtype):
    """Rows for the sharded rule: ordinary ones, all-zero, NaN (in rank 1's shard), an outlier
    (rank 0's) holding > 99% of its row's mass, -Inf (rank 1's), and a row whose mass sits mostly
    in rank 0's shard."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, TP_K, generator=g) * torch.rand(8, 1, generator=g).mul(4).exp()
    x[2] = 0.0
    x[3, 1500] = float("nan")
    x[4] = torch.randn(TP_K, generator=g) * 0.01
    x[4, 17] = 3000.0
    x[5, 1200] = float("-inf")
    x[6, :TP_SPLIT] *= 30.0
    return x.to(dtype)


def _sharded_rule_on_rank(rank, world_size, ps):
    """One rank of test_sharded_rule_equals_paper_rule_on_whole_rows: the rule on its shard, with
    the histograms summed over the gloo group."""
    out = {}
    for dtype in DTYPES:
        x = _tp_rows(dtype)
        shard = (x[:, :TP_SPLIT] if rank == 0 else x[:, TP_SPLIT:]).contiguous()
        calls = []

        def all_reduce(t):
            calls.append((str(t.dtype), tuple(t.shape)))
            dist.all_reduce(t)

        for p in ps:
            mask = top_p_mask(shard, p, all_reduce)
            y, kept = top_p_sparsify(shard, p, all_reduce)
            out[f"{dtype}, {p}"] = {"mask": mask, "y": y, "kept": kept}
        out[f"{dtype} calls"] = calls
    return out


def test_sharded_rule_equals_paper_rule_on_whole_rows(tmp_path):
    """Two gloo processes, each holding one K-shard of the same rows (down_proj's input under
    TP = 2): each rank's mask is its slice of the paper's rule on the whole rows."""
    ps = (0.5, 0.9)
    ranks = run_ranks(_sharded_rule_on_rank, 2, tmp_path, ps)
    shards = (slice(0, TP_SPLIT), slice(TP_SPLIT, TP_K))
    for dtype in DTYPES:
        x = _tp_rows(dtype)
        levels = 2 if dtype.itemsize == 2 else 4
        hists = [(8, 256)] * (levels - 1) + [(8, 128)]  # one float64 histogram per radix level
        expected_calls = [("torch.float64", shape) for shape in hists]
        for p in ps:
            full = paper_top_p_mask(x, p)
            for out, cols in zip(ranks, shards):
                got = out[f"{dtype}, {p}"]
                assert torch.equal(got["mask"], full[:, cols]), (dtype, p, cols)
                assert torch.equal(got["kept"], full[:, cols].sum(-1))
                ref_y = torch.where(full[:, cols], x[:, cols], 0.0)
                assert torch.equal(got["y"].view(torch.uint8), ref_y.view(torch.uint8))
            assert full[3].all() and full[4].sum() == 1 and not full[2].any()  # NaN, outlier, zero
            # The test can fail: a per-shard rule (no all-reduce) keeps other entries.
            per_shard = torch.cat([top_p_mask(x[:, cols].contiguous(), p) for cols in shards], 1)
            assert not torch.equal(per_shard, full)
        for out in ranks:
            assert out[f"{dtype} calls"] == expected_calls * 2 * len(ps)


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_row_p_follows_each_rows_own_p(dtype):
    # Per-request p: p [M, 1], one per token row; each row must be the paper's sort rule at its p.
    x = _activations(7, 333, dtype, seed=3)
    ps = [0.5, 0.9, 1.0, 0.3, 0.7, 0.5, 0.99]
    p = torch.tensor(ps, dtype=torch.float64)[:, None]
    mask = top_p_mask(x, p)
    for m, pm in enumerate(ps):
        assert torch.equal(mask[m], paper_top_p_mask(x[m:m + 1], pm)[0]), (m, pm)
    y, kept = top_p_sparsify(x, p)
    assert torch.equal(kept, mask.sum(-1))
