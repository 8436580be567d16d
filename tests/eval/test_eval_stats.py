"""Critical sparsity and the paired bootstrap against naive restatements (plain Python loops)."""

import math
import random

import numpy as np
import pytest

from vllm_sparsity.eval import stats


def naive_critical(sparsity, normalized, threshold=0.99):
    """The definition read literally: the highest sparsity among the points that keep
    >= threshold of dense; None when no point does."""
    passing = [s for s, n in zip(sparsity, normalized) if n >= threshold]
    return max(passing) if passing else None


def naive_average_normalized(correct, dense, docs=None):
    """correct: task -> list of P lists of 0/1; docs: task -> list of drawn document indices."""
    per_task = []
    for task, rows in correct.items():
        idx = docs[task] if docs else range(len(rows[0]))
        accs = [sum(row[i] for i in idx) / len(idx) for row in rows]
        per_task.append([a / accs[dense] if accs[dense] > 0 else 1.0 for a in accs])
    return [sum(col) / len(col) for col in zip(*per_task)], per_task


def synthetic(seed, n_points=7, sizes=(37, 50)):
    """Per-document correctness that degrades with p, and sparsity rising as p falls."""
    rng = random.Random(seed)
    sparsity = sorted(rng.uniform(0, 0.9) for _ in range(n_points - 1))
    sparsity = [0.001] + sparsity
    correct = {}
    for k, n in enumerate(sizes):
        dense_row = [int(rng.random() < 0.6) for _ in range(n)]
        rows = [dense_row]
        for i in range(1, n_points):  # flip a share of documents that grows with sparsity
            flip = 0.25 * sparsity[i] ** 2
            rows.append([1 - c if rng.random() < flip else c for c in dense_row])
        correct[f"task{k}"] = rows
    order = list(range(n_points))
    rng.shuffle(order)  # points need not come in sparsity order, only the dense index matters
    return ([sparsity[i] for i in order], {t: [rows[i] for i in order] for t, rows in
                                           correct.items()}, order.index(0))


@pytest.mark.parametrize("seed", range(20))
def test_critical_sparsity_matches_the_naive_definition(seed):
    sparsity, correct, dense = synthetic(seed)
    got = stats.critical({t: np.array(r) for t, r in correct.items()}, np.array(sparsity), dense)
    average, per_task = naive_average_normalized(correct, dense)
    want = naive_critical(sparsity, average)
    assert got["average"] == pytest.approx(want) if want is not None else math.isnan(
        got["average"])
    for (task, value), norm in zip(got["tasks"].items(), per_task):
        assert value == pytest.approx(naive_critical(sparsity, norm))


def test_critical_takes_the_most_sparse_passing_point():
    # The point at 0.4 fails (in a small sample: a flipped near-tie document) but 0.6 passes:
    # each point counts on its own.
    sparsity = np.array([0.0, 0.2, 0.4, 0.6, 0.8])
    norm = np.array([1.0, 0.995, 0.9, 0.992, 0.5])
    assert stats.critical_index(sparsity, norm) == 3
    assert stats.critical_index(sparsity, np.array([0.5, 0.9, 0.9, 0.9, 0.9])) == -1
    per_resample = np.stack([norm, [1.0, 0.5, 0.5, 0.5, 0.5]], axis=1)  # [P, B]
    assert list(stats.critical_index(sparsity, per_resample)) == [3, 0]


def test_normalize_counts_a_zero_dense_accuracy_as_kept():
    assert list(stats.normalize([0.0, 0.5], [0.0, 0.25])) == [1.0, 2.0]


@pytest.mark.parametrize("seed", range(5))
def test_paired_bootstrap_matches_a_naive_loop_over_the_same_draws(seed):
    sparsity, correct, dense = synthetic(seed)
    arrays = {t: np.array(r) for t, r in correct.items()}
    n_boot = 300
    weights = stats.draw_weights({t: a.shape[1] for t, a in arrays.items()}, n_boot, seed)
    got = stats.critical(arrays, np.array(sparsity), dense, weights)
    naive, naive_averages = [], []
    for b in range(n_boot):
        # The same draw (document indices, repeated as often as drawn) at every point: paired.
        docs = {t: [i for i, k in enumerate(w[b]) for _ in range(k)] for t, w in weights.items()}
        average, per_task = naive_average_normalized(correct, dense, docs)
        naive.append(naive_critical(sparsity, average))
        naive_averages.append(average)
        assert got["average"][b] == pytest.approx(naive[-1]), b
        for (task, values), norm in zip(got["tasks"].items(), per_task):
            assert values[b] == pytest.approx(naive_critical(sparsity, norm)), (task, b)
    assert len(set(naive)) > 1  # the synthetic data do exercise the interval
    # The interval is the 95% percentile interval of those same resamples.
    result = stats.paired_bootstrap(arrays, np.array(sparsity), dense, n_boot=n_boot, seed=seed)
    assert result["average"]["interval"] == pytest.approx(list(np.percentile(naive, [2.5, 97.5])))
    for i, interval in enumerate(result["normalized_average_intervals"]):
        column = [averages[i] for averages in naive_averages]
        assert interval == pytest.approx(list(np.percentile(column, [2.5, 97.5])))
    assert result["average"]["sparsity"] == pytest.approx(
        naive_critical(sparsity, naive_average_normalized(correct, dense)[0]))


def test_draws_are_with_replacement_and_complete():
    weights = stats.draw_weights({"a": 10, "b": 3}, 500, seed=1)
    assert weights["a"].shape == (500, 10) and (weights["a"].sum(axis=1) == 10).all()
    assert (weights["b"].sum(axis=1) == 3).all() and (weights["a"] > 1).any()


def test_pairing_makes_an_unchanged_point_pass_in_every_resample():
    # A point that answers every document as dense does keeps 100% in every paired resample,
    # however noisy the accuracy itself is; a point that is always wrong never passes.
    rng = np.random.default_rng(0)
    dense_row = (rng.random(40) < 0.5).astype(float)
    correct = {"t": np.stack([dense_row, dense_row, np.zeros(40)])}
    result = stats.paired_bootstrap(correct, np.array([0.0, 0.3, 0.6]), dense=0, n_boot=500)
    assert result["average"]["sparsity"] == 0.3
    assert result["average"]["interval"] == [0.3, 0.3]


def test_mean_shift_matches_a_naive_loop_over_the_same_draws():
    rng = random.Random(3)
    diff = {"a": [rng.gauss(-0.1, 0.5) for _ in range(30)], "b": [rng.gauss(0.0, 2.0)
                                                                 for _ in range(12)]}
    n_boot = 400
    weights = stats.draw_weights({t: len(d) for t, d in diff.items()}, n_boot, seed=5)
    boot = []
    for b in range(n_boot):  # each task: the mean over its drawn documents; tasks weigh equally
        means = [math.fsum(d[i] * k for i, k in enumerate(weights[t][b])) / sum(weights[t][b])
                 for t, d in diff.items()]
        boot.append(sum(means) / len(means))
    got = stats.mean_shift({t: np.array(d) for t, d in diff.items()}, n_boot, level=0.9, seed=5)
    assert got["interval"] == pytest.approx(list(np.percentile(boot, [5, 95])))
    assert got["shift"] == pytest.approx((math.fsum(diff["a"]) / 30 + math.fsum(diff["b"]) / 12)
                                         / 2)
    assert got["tasks"] == pytest.approx({t: math.fsum(d) / len(d) for t, d in diff.items()})
