"""Critical sparsity and its paired bootstrap interval (pure numpy, no I/O).

Critical sparsity (Szatkowski et al.): the highest measured sparsity at which the model keeps at
least ``threshold`` (99%) of its dense accuracy. Accuracy is normalized per task (accuracy at p /
dense accuracy) and averaged over tasks. A point counts on its own: a less sparse point that fails
(in a small sample, often one flipped near-tie document) does not disqualify a more sparse point
that passes; the bootstrap interval shows how much such flips move the answer.

Paired bootstrap: every p point scores the same documents, so a resample draws documents (with
replacement, per task) once and applies the same draw to every point. Per-document differences
against the dense run are far less noisy than two independent accuracies, which is what makes a
1% criterion measurable with hundreds rather than tens of thousands of documents.
"""

from __future__ import annotations

import numpy as np

THRESHOLD = 0.99


def normalize(acc: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """acc / dense, elementwise; where dense accuracy is 0 a point counts as fully kept (1.0)."""
    acc, dense = np.asarray(acc, float), np.asarray(dense, float)
    return np.divide(acc, dense, out=np.ones(np.broadcast(acc, dense).shape), where=dense > 0)


def critical_index(sparsity: np.ndarray, normalized: np.ndarray, threshold: float = THRESHOLD):
    """Index of the critical point.

    Args:
        sparsity: [P] measured sparsity of each point (share of activations zeroed, 0..1).
        normalized: [P, ...] normalized accuracy of each point (trailing axes: e.g. resamples).
        threshold: share of dense accuracy to keep.

    Returns:
        int array [...]: per trailing index, the index (into P) of the most sparse point with
        normalized accuracy >= ``threshold``; -1 where no point passes.
    """
    sparsity = np.asarray(sparsity, float)
    ok = np.asarray(normalized) >= threshold  # [P, ...]
    ranked = np.where(ok, sparsity.reshape(-1, *[1] * (ok.ndim - 1)), -np.inf)
    return np.where(ok.any(axis=0), ranked.argmax(axis=0), -1)


def accuracies(correct: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Mean correctness per point: correct [P, N] (0/1 per document), weights [B, N] (times each
    document is drawn, or None for the plain mean) -> [P] or [P, B]."""
    correct = np.asarray(correct, float)
    if weights is None:
        return correct.mean(axis=1)
    return correct @ weights.T / weights.sum(axis=1)


def normalized(correct: dict[str, np.ndarray], dense: int,
               weights: dict[str, np.ndarray] | None = None):
    """Per task and averaged over tasks, accuracy / dense accuracy of each point.

    Args:
        correct: task -> [P, N_task] 0/1 correctness of each document at each point (the same
            documents in the same order at every point).
        dense: index of the dense reference (the rule's dense point: p = 1.0, or for max-p the
            run without the plugin; ``grid.dense_p``).
        weights: task -> [B, N_task] document draw counts of B resamples; None: the data itself.

    Returns:
        (per_task, average): task -> [P] (or [P, B]) and the [P] (or [P, B]) average.
    """
    per_task = {}
    for task, c in correct.items():
        acc = accuracies(c, None if weights is None else weights[task])
        per_task[task] = normalize(acc, acc[dense])
    return per_task, np.mean(list(per_task.values()), axis=0)


def critical(correct: dict[str, np.ndarray], sparsity: np.ndarray, dense: int,
             weights: dict[str, np.ndarray] | None = None, threshold: float = THRESHOLD) -> dict:
    """Critical sparsity of the average and of each task, for the data as given or per resample
    (arguments as for ``normalized``; sparsity: [P] measured sparsity per point).

    Returns:
        ``{"average": s, "tasks": {task: s}}`` with s the critical sparsity (float, or [B] array
        with weights); NaN where no point passes (never with the dense point among them).
    """
    sparsity = np.asarray(sparsity, float)
    per_task, average = normalized(correct, dense, weights)

    def pick(norm):
        idx = critical_index(sparsity, norm, threshold)
        return np.where(idx >= 0, sparsity[idx], np.nan)

    return {"average": pick(average), "tasks": {t: pick(n) for t, n in per_task.items()}}


def draw_weights(sizes: dict[str, int], n_boot: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per task, [n_boot, N] counts of how often each document is drawn (N draws with
    replacement): one draw per task per resample, shared by every point (paired)."""
    rng = np.random.default_rng(seed)
    return {t: rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) for t, n in sizes.items()}


def paired_bootstrap(correct: dict[str, np.ndarray], sparsity: np.ndarray, dense: int,
                     n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                     threshold: float = THRESHOLD) -> dict:
    """Critical sparsity with a percentile interval from a paired bootstrap over documents.

    Returns:
        ``{"average": {...}, "tasks": {task: {...}}}``, each ``{"sparsity", "interval": [lo, hi],
        "fail_share"}``: the point estimate, the ``level`` percentile interval of the resampled
        critical sparsities, and the share of resamples in which no point passes (counted as
        sparsity 0 in the interval); and ``"normalized_average_intervals"``:
        per point, the interval of its normalized average accuracy from the same resamples.
    """
    point = critical(correct, sparsity, dense, threshold=threshold)
    weights = draw_weights({t: c.shape[1] for t, c in correct.items()}, n_boot, seed)
    boot = critical(correct, sparsity, dense, weights, threshold)
    tail = (1 - level) / 2 * 100
    norm = np.percentile(normalized(correct, dense, weights)[1], [tail, 100 - tail], axis=1)

    def summary(value, samples):
        failed = np.isnan(samples)
        lo, hi = np.percentile(np.where(failed, 0.0, samples), [tail, 100 - tail])
        return {"sparsity": None if np.isnan(value) else float(value),
                "interval": [float(lo), float(hi)], "fail_share": float(failed.mean())}

    return {"average": summary(point["average"], boot["average"]),
            "tasks": {t: summary(point["tasks"][t], boot["tasks"][t]) for t in correct},
            "normalized_average_intervals": norm.T.tolist(),
            "n_boot": n_boot, "level": level, "threshold": threshold}


def mean_shift(diff: dict[str, np.ndarray], n_boot: int = 2000, level: float = 0.99,
               seed: int = 0) -> dict:
    """The average over tasks of the per-document mean of paired differences, with a percentile
    bootstrap interval (documents resampled per task, as in ``paired_bootstrap``).

    Args:
        diff: task -> [N_task] per-document differences (e.g. log-likelihood, nats, of the same
            document in two runs). Tasks weigh equally, as in the normalized average accuracy.

    Returns:
        ``{"shift", "interval": [lo, hi], "tasks": {task: mean}, "level", "n_boot"}``.
    """
    weights = draw_weights({t: len(d) for t, d in diff.items()}, n_boot, seed)
    boot = np.mean([weights[t] @ d / weights[t].sum(axis=1) for t, d in diff.items()], axis=0)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    means = {t: float(np.mean(d)) for t, d in diff.items()}
    return {"shift": float(np.mean(list(means.values()))), "interval": [float(lo), float(hi)],
            "tasks": means, "level": level, "n_boot": n_boot}
