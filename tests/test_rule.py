"""The rules of ``vllm_sparsity.rule`` (top-p, top-k, max-p, L_q top-p), parametrised over the rule
table ``CASES``, against independent sort-based references (tests/reference.py): whole rows, edge
rows, random rows (hypothesis), K-sharded rows (TP) and torch.compile; then top-p's own entry points
(``top_p_mask``, ``top_p_sparsify``) against the paper's sort rule and a naive loop."""

import functools
import math

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_ranks
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import (loop_top_p_mask, paper_top_p_mask, sort_lq_mask, sort_max_p_mask,
                       sort_top_k_mask)
from vllm_sparsity.rule import (KEEP_ALL_P, RULES, lq_threshold, max_p_threshold, sparsify,
                                threshold_of, top_k_threshold, top_p_mask, top_p_sparsify,
                                top_p_threshold)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
NAN, INF = float("nan"), float("inf")

# Rule name -> (threshold function, reference mask function), both taking (x, p).
CASES = {
    "top-p": (top_p_threshold, paper_top_p_mask),
    "top-k": (top_k_threshold, sort_top_k_mask),
    "max-p": (max_p_threshold, sort_max_p_mask),
    "lq q=2": (functools.partial(lq_threshold, q=2.0), functools.partial(sort_lq_mask, q=2.0)),
    "lq q=0.5": (functools.partial(lq_threshold, q=0.5), functools.partial(sort_lq_mask, q=0.5)),
    "lq q=3.7": (functools.partial(lq_threshold, q=3.7), functools.partial(sort_lq_mask, q=3.7)),
}


def _mask(x, t):
    """The threshold contract: keep |x| >= t, the whole row where t is NaN."""
    return (x.abs() >= t) | t.isnan()


def _activations(m, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Per-row scales spread the magnitudes like real activations do.
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).mul(4).exp()
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 640), (7, 333), (64, 2048)])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("rule", list(CASES))
def test_rule_equals_sort_reference(rule, dtype, shape, p):
    threshold, reference = CASES[rule]
    x = _activations(*shape, dtype)
    t = threshold(x, p)
    assert t.shape == (shape[0], 1) and t.dtype == dtype
    mask = _mask(x, t)
    assert torch.equal(mask, reference(x, p))
    if p < 1.0 or rule == "max-p":
        assert 0 < mask.sum() < x.numel()  # the rule did something


def test_target_underflowing_to_zero_keeps_the_largest_entry():
    # p * total rounds to 0 in float64: the sort rule's first index still keeps the largest entry.
    x = torch.tensor([[1e-40, 3e-40, 0.0]], dtype=torch.float32)
    for rule in ("top-p", "lq q=2"):
        threshold, reference = CASES[rule]
        assert _mask(x, threshold(x, 5e-324)).tolist() == [[False, True, False]], rule
        assert torch.equal(_mask(x, threshold(x, 5e-324)), reference(x, 5e-324)), rule


def test_registry_names_every_rule():
    assert RULES == {"top-p": top_p_threshold, "top-k": top_k_threshold,
                     "max-p": max_p_threshold, "lq": lq_threshold}
    x = _activations(3, 65, torch.bfloat16)
    assert torch.equal(RULES["lq"](x, 0.7, q=2.0), lq_threshold(x, 0.7, q=2.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [256, 257])
def test_p_as_tensor_equals_p_as_float(dtype, k):
    x = _activations(8, k, dtype)
    p = torch.tensor([0.7], dtype=torch.float64)
    for rule, (threshold, _) in CASES.items():
        assert torch.equal(threshold(x, p), threshold(x, 0.7)), rule


# --- top-k: how k is rounded -------------------------------------------------------------------


@pytest.mark.parametrize(("k_dim", "p", "k"), [
    (100, 0.07, 7),   # 0.07 * 100 is 7.000000000000001 in float64: ceil would give 8
    (100, 0.29, 29),  # 28.999999999999996: floor would give 28
    (10, 0.25, 3),    # 2.5: halves round up
    (10, 0.24, 2),    # 2.4
    (333, 0.001, 1),  # 0.333: at least 1
    (333, 1.0, 333),
])
def test_top_k_keeps_p_times_k_rounded_to_nearest(k_dim, p, k):
    x = torch.randperm(k_dim).add(1).to(torch.float32).unsqueeze(0)  # distinct magnitudes 1..K
    x[0, ::2] *= -1
    mask = _mask(x, top_k_threshold(x, p))
    assert mask.sum().item() == k
    assert torch.equal(mask, x.abs() > k_dim - k)  # the k largest


def test_top_k_ties_zeros_and_p_one():
    x = torch.tensor([[5.0, 3.0, -3.0, 3.0, 1.0, 0.0],    # k = 2: the three 3s tie with the 2nd
                      [0.0, 0.0, -2.0, 0.0, 0.0, 0.0],    # k = 2, one nonzero: kept alone
                      [0.0] * 6],                          # all zero: nothing
                     dtype=torch.bfloat16)
    assert _mask(x, top_k_threshold(x, 2 / 6)).tolist() == [
        [True, True, True, True, False, False], [False, False, True, False, False, False],
        [False] * 6]
    assert _mask(x, top_k_threshold(x, 1.0)).tolist() == (x != 0).tolist()  # every nonzero


# --- max-p -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_p_bound_is_p_times_max_in_float64(dtype):
    # 0.07 * 100 is 7.000000000000001 in float64: an entry equal to 7 falls below the bound, and
    # the next value of the dtype above 7 is kept.
    ints = torch.int16 if dtype.itemsize == 2 else torch.int32
    above = (torch.tensor(7.0, dtype=dtype).view(ints) + 1).view(dtype).item()
    x = torch.tensor([[100.0, 7.0, -above, 2.0, 0.0]], dtype=dtype)
    assert _mask(x, max_p_threshold(x, 0.07)).tolist() == [[True, False, True, False, False]]
    assert _mask(x, max_p_threshold(x, 0.01)).tolist() == [[True, True, True, True, False]]
    assert torch.equal(_mask(x, max_p_threshold(x, 0.07)), sort_max_p_mask(x, 0.07))


def test_max_p_at_one_keeps_only_the_max():
    x = torch.tensor([[2.0, -7.0, 7.0, 6.99], [1e-3, 0.0, 0.0, 0.0]], dtype=torch.float32)
    for p in (1.0, 1.5):  # p is capped at 1
        assert _mask(x, max_p_threshold(x, p)).tolist() == [[False, True, True, False],
                                                             [True, False, False, False]]


# --- lq ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_lq_with_q_one_is_top_p_bit_for_bit(dtype):
    x = _activations(16, 333, dtype, seed=3)
    x[1] = 0.0
    x[2, 7] = NAN
    x[3, 9] = -INF
    x[4, 11] = 1e4
    for p in (0.1, 0.5, 0.9, 0.999, 1.0):
        t_lq, t_top_p = lq_threshold(x, p, q=1.0), top_p_threshold(x, p)
        assert torch.equal(t_lq.view(torch.uint8), t_top_p.view(torch.uint8))  # NaNs included
        assert torch.equal(_mask(x, t_lq), paper_top_p_mask(x, p))


def test_lq_larger_q_keeps_fewer():
    x = _activations(32, 1024, torch.bfloat16, seed=4)
    kept = [_mask(x, lq_threshold(x, 0.8, q=q)).sum().item() for q in (0.5, 1.0, 2.0, 4.0)]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]


def test_lq_float64_range_edges():
    # fp32: 1e38^9 overflows float64 (counts as Inf: only the max kept); 1e-40^9 underflows to 0
    # for every entry (nothing to rank by: every nonzero kept).
    x = torch.tensor([[1e38, -2e37, 1.0], [1e-40, 2e-40, 0.0]], dtype=torch.float32)
    assert _mask(x, lq_threshold(x, 0.5, q=9.0)).tolist() == [[True, False, False],
                                                              [True, True, False]]
    assert _mask(x, lq_threshold(x, 1.0, q=9.0)).tolist() == (x != 0).tolist()
    assert torch.equal(_mask(x, lq_threshold(x, 0.5, q=9.0)), sort_lq_mask(x, 0.5, 9.0))


@pytest.mark.parametrize("q", [0, -1.0, INF, NAN, "2", True, None])
def test_lq_bad_q_raises(q):
    with pytest.raises(ValueError, match="q must be a finite number > 0"):
        lq_threshold(torch.ones(1, 4), 0.5, q=q)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 4), torch.zeros(4, dtype=torch.bfloat16),
                                 torch.zeros(2, 3, dtype=torch.int32)])
def test_bad_input_raises(rule, bad):
    with pytest.raises(ValueError, match="x must be"):
        RULES[rule](bad, 0.5, **({"q": 2.0} if rule == "lq" else {}))


# --- Edge rows, every rule ----------------------------------------------------------------------

EDGE_ROWS = [
    [0.0] * 6,                              # all zero: nothing kept
    [1.0, NAN, -3.0, 0.0, 2.0, 5.0],        # NaN: kept whole
    [1.0, INF, -3.0, -INF, 2.0, 0.0],       # +-Inf
    [4.0, 1.0, 1.0, -1.0, 1.0, 0.5],        # ties
    [0.01, -0.02, 3000.0, 0.01, 0.0, 0.03],  # one outlier
]
# Per rule at p = 0.5, the kept set of each edge row, in the order above.
EDGE_KEPT = {
    "top-p": [[0] * 6, [1] * 6, [0, 1, 0, 1, 0, 0],   # Inf carries the whole mass
              [1, 1, 1, 1, 1, 0],                      # 4 + 1 reaches 0.5 * 8.5: ties with 1
              [0, 0, 1, 0, 0, 0]],
    "top-k": [[0] * 6, [1] * 6, [0, 1, 1, 1, 0, 0],   # k = 3: both Infs, then -3
              [1, 1, 1, 1, 1, 0],                      # k = 3: 4, then the four tied 1s
              [0, 1, 1, 0, 0, 1]],                     # k = 3
    "max-p": [[0] * 6, [1] * 6, [0, 1, 0, 1, 0, 0],    # 0.5 * Inf = Inf
              [1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]],
    "lq q=2": [[0] * 6, [1] * 6, [0, 1, 0, 1, 0, 0],   # Inf carries the whole mass
               [1, 0, 0, 0, 0, 0],                      # 16 >= 0.5 * 20.25
               [0, 0, 1, 0, 0, 0]],
    "lq q=0.5": [[0] * 6, [1] * 6, [0, 1, 0, 1, 0, 0],
                 [1, 1, 1, 1, 1, 0],                    # 2 + 1 reaches 0.5 * 6.707: ties with 1
                 [0, 0, 1, 0, 0, 0]],                   # sqrt(3000) = 54.8 of 55.3
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", list(EDGE_KEPT))
def test_edge_rows(rule, dtype):
    threshold, reference = CASES[rule]
    x = torch.tensor(EDGE_ROWS, dtype=dtype)
    mask = _mask(x, threshold(x, 0.5))
    assert mask.int().tolist() == EDGE_KEPT[rule]
    assert torch.equal(mask, reference(x, 0.5))
    t = threshold(x, 0.5)
    assert t[1].isnan() and (t[[0, 2, 3, 4]] > 0).all()  # NaN row whole; zeros never kept


# --- Hypothesis: single rows with ties, zeros, tiny, huge and non-finite values ------------------

_value = st.one_of(
    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32),
    st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0, -2.0]),       # zeros and ties
    st.sampled_from([1e-40, -3e-8, 6e4, 3e38]),              # subnormal, fp16 edge and overflow
    st.sampled_from([INF, -INF, NAN]),
)


@settings(max_examples=400, deadline=None)
@given(values=st.lists(_value, min_size=1, max_size=150),
       p=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
       rule=st.sampled_from(list(CASES)), dtype=st.sampled_from(DTYPES))
def test_rule_equals_reference_on_random_rows(values, p, rule, dtype):
    threshold, reference = CASES[rule]
    x = torch.tensor([values], dtype=torch.float32).to(dtype)
    t = threshold(x, p)
    mask = _mask(x, t)[0]
    assert torch.equal(mask, reference(x, p)[0])
    a = x[0].abs().double()
    if x.isnan().any():
        assert mask.all()
        return
    assert not mask[a == 0].any() and t.item() > 0  # zeros are never kept
    if a.max() > 0:  # the largest magnitude is always kept
        assert mask[a == a.max()].all()


# --- Tensor parallelism: rows split over K into two shards summed through a gloo all-reduce -------

TP_SPLIT, TP_K = 700, 1500


def _tp_rows(dtype):
    """Ordinary rows, all-zero, NaN (in rank 1's shard), an outlier (rank 0's), -Inf (rank 1's),
    a row whose mass sits in rank 0's shard, and one of ties across both shards."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, TP_K, generator=g) * torch.rand(8, 1, generator=g).mul(4).exp()
    x[2] = 0.0
    x[3, 1200] = NAN
    x[4] = torch.randn(TP_K, generator=g) * 0.01
    x[4, 17] = 3000.0
    x[5, 1100] = -INF
    x[6, :TP_SPLIT] *= 30.0
    x[7] = torch.randint(-3, 4, (TP_K,), generator=g).float()
    return x.to(dtype)


# q=2, 0.5: exact square / sqrt in every shard (q=3.7 is not, so its shards' sums may differ).
TP_RULES = ["top-p", "top-k", "max-p", "lq q=2", "lq q=0.5"]


def _sharded_rules_on_rank(rank, world_size, ps):
    out = {}
    for dtype in DTYPES:
        x = _tp_rows(dtype)
        shard = (x[:, :TP_SPLIT] if rank == 0 else x[:, TP_SPLIT:]).contiguous()
        for rule in TP_RULES:
            calls = []

            def all_reduce(t):
                calls.append((str(t.dtype), tuple(t.shape)))
                dist.all_reduce(t)

            threshold = CASES[rule][0]
            for p in ps:
                out[f"{rule} {dtype} {p}"] = _mask(shard, threshold(shard, p, all_reduce))
                out[f"{rule} {dtype} {p} sparsified"] = sparsify(shard, p, threshold, all_reduce)
            out[f"{rule} {dtype} calls"] = calls
    return out


def test_sharded_rules_equal_reference_on_whole_rows(tmp_path):
    """Two gloo processes, each holding one K-shard of the same rows (down_proj's input under
    TP = 2): each rank's mask is its slice of the rule on the whole rows."""
    ps = (0.3, 0.5, 0.8, 0.9)
    ranks = run_ranks(_sharded_rules_on_rank, 2, tmp_path, ps)
    shards = (slice(0, TP_SPLIT), slice(TP_SPLIT, TP_K))
    for dtype in DTYPES:
        x = _tp_rows(dtype)
        levels = 2 if dtype.itemsize == 2 else 4
        calls = [("torch.float64", (8, 256))] * (levels - 1) + [("torch.float64", (8, 128))]
        for rule in TP_RULES:
            threshold, reference = CASES[rule]
            for p in ps:
                full = reference(x, p)
                assert full[3].all() and not full[2].any()  # NaN row whole, zero row nothing
                if rule == "top-p":
                    assert full[4].sum() == 1  # the outlier alone
                for out, cols in zip(ranks, shards):
                    assert torch.equal(out[f"{rule} {dtype} {p}"], full[:, cols]), (rule, dtype, p)
                    y, kept = out[f"{rule} {dtype} {p} sparsified"]
                    assert torch.equal(kept, full[:, cols].sum(-1)), (rule, dtype, p)
                    ref_y = torch.where(full[:, cols], x[:, cols], 0.0)
                    assert torch.equal(y.view(torch.uint8), ref_y.view(torch.uint8))
                # The test can fail: the rule on each shard alone keeps another set.
                per_shard = torch.cat([_mask(x[:, c], threshold(x[:, c].contiguous(), p))
                                       for c in shards], 1)
                assert not torch.equal(per_shard, full), (rule, dtype, p)
            for out in ranks:
                assert out[f"{rule} {dtype} calls"] == calls * 2 * len(ps)  # mask, sparsify


# --- torch.compile: one graph, dynamic M, p a float64 tensor [1] (as the plugin passes it) --------


def test_rules_compile_fullgraph_with_dynamic_rows():
    torch._dynamo.reset()
    p = torch.tensor([0.6], dtype=torch.float64)
    for rule in ("top-k", "max-p", "lq q=2"):
        threshold, reference = CASES[rule]
        compiled = torch.compile(threshold, fullgraph=True, dynamic=True)
        for m in (3, 17):
            x = _activations(m, 333, torch.bfloat16, seed=m)
            x[1, 4] = NAN
            t = compiled(x, p)
            assert torch.equal(t.view(torch.int16), threshold(x, p).view(torch.int16)), rule
            assert torch.equal(_mask(x, t), reference(x, 0.6)), rule


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_all_p_keeps_every_nonzero(name, dtype):
    """A site outside the target runs at KEEP_ALL_P[rule]: the output must be the input."""
    x = _activations(6, 97, dtype, seed=3)
    x[1, ::3] = 0
    x[2] = 0
    y, kept = sparsify(x, KEEP_ALL_P[name], threshold_of(name, q=2.0))
    assert torch.equal(y, x)
    assert kept.tolist() == (x != 0).sum(-1).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_sparsify_with_each_rule_equals_its_reference(name, dtype):
    """``sparsify`` zeroes exactly the entries the reference drops and leaves the kept ones
    bit-identical; for top-p, ``top_p_sparsify`` gives the same."""
    threshold, reference = CASES[name]
    for shape, p in (((5, 130), 0.6), ((9, 300), 0.8)):
        x = _activations(*shape, dtype, seed=4)
        y, kept = sparsify(x, p, threshold)
        want = reference(x.float(), p)
        assert y.dtype == x.dtype
        assert torch.equal(y, torch.where(want, x, torch.zeros((), dtype=x.dtype)))
        assert torch.equal(y[want].view(torch.uint8), x[want].view(torch.uint8))  # bit-identical
        assert torch.all(y[~want] == 0)
        assert torch.equal(kept, want.sum(-1))
        if name == "top-p":
            y_top_p, kept_top_p = top_p_sparsify(x, p)
            assert torch.equal(y_top_p.view(torch.uint8), y.view(torch.uint8))
            assert torch.equal(kept_top_p, kept)


def test_threshold_of_binds_q_and_refuses_lq_without_it():
    x = _activations(3, 64, torch.float32)
    assert torch.equal(threshold_of("lq", 2.0)(x, 0.7), lq_threshold(x, 0.7, q=2.0))
    assert threshold_of("top-k") is top_k_threshold
    with pytest.raises(ValueError, match="lq rule needs q"):
        threshold_of("lq")
    with pytest.raises(ValueError, match="rule must be one of top-p, top-k, max-p, lq"):
        threshold_of("top-q")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", list(CASES))
def test_per_row_p_follows_each_rows_own_p(rule, dtype):
    """p per request: p [M, 1], one per token row (every rule broadcasts it); each row must be the
    sort reference at its own p, and ``sparsify`` counts what the mask keeps."""
    threshold, reference = CASES[rule]
    for (m_rows, seed), ps in (((6, 5), [0.3, 0.9, 1.0, 0.05, 0.7, 0.5]),
                               ((7, 3), [0.5, 0.9, 1.0, 0.3, 0.7, 0.5, 0.99])):
        x = _activations(m_rows, 333, dtype, seed=seed)
        p = torch.tensor(ps, dtype=torch.float64)[:, None]
        mask = _mask(x, threshold(x, p))
        for m, pm in enumerate(ps):
            assert torch.equal(mask[m], reference(x[m:m + 1], pm)[0]), (rule, m, pm)
        assert torch.equal(sparsify(x, p, threshold)[1], mask.sum(-1))
        if rule == "top-p":
            assert torch.equal(top_p_mask(x, p), mask)
            assert torch.equal(top_p_sparsify(x, p)[1], mask.sum(-1))


# --- top-p's own entry points: top_p_mask and top_p_sparsify ----------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_p_mask_equals_naive_loop(dtype):
    x = _activations(5, 97, dtype, seed=1)
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(top_p_mask(x, p), loop_top_p_mask(x, p))


def test_float_p_just_below_one_is_not_rounded_up():
    # Found by test_top_p_properties: 1 - 2^-53 is 1.0 in float32; as p = 1 it would keep every
    # nonzero.
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


_finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_finite, min_size=1, max_size=200),
       p=st.floats(min_value=0.01, max_value=1.0, exclude_min=True),
       dtype=st.sampled_from(DTYPES))
def test_top_p_properties(values, p, dtype):
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
