"""The retrieval protocol: which test rows are queries and which database items are relevant.

Query sets, one vocabulary for config, CLIs and bench (database = the train split):
  q10k  every test row (CIFAR-10: 10,000 queries)
  q1k   the first 100 test rows of each class (CIFAR-10: 1,000 queries)
Relevance: the same class id or, for multi-hot labels, at least one shared label;
a multi-hot row without labels is relevant to nothing. `tbhvae.evaluation`
counts the same relation per Hamming distance without materialising it.
"""
from __future__ import annotations

import numpy as np

QUERY_SETS = ("q10k", "q1k")
QUERIES_PER_CLASS = 100


def per_class_queries(labels: np.ndarray, per_class: int = QUERIES_PER_CLASS) -> np.ndarray:
    """Sorted indices of the first `per_class` rows of each class; a multi-hot row counts for its first label."""
    ids = labels if labels.ndim == 1 else np.argmax(labels, axis=1)
    picks = [np.flatnonzero(ids == c)[:per_class] for c in np.unique(ids)]
    return np.sort(np.concatenate(picks))


def select_queries(labels: np.ndarray, queries: str) -> np.ndarray:
    """Test-row indices of a query set (see the module docstring)."""
    if queries == "q10k":
        return np.arange(labels.shape[0])
    if queries == "q1k":
        return per_class_queries(labels, QUERIES_PER_CLASS)
    raise ValueError(f"queries must be one of {', '.join(QUERY_SETS)}, got {queries!r}")


def relevant(query_labels: np.ndarray, result_labels: np.ndarray) -> np.ndarray:
    """bool [q, k]: result j of query i is relevant to it.

    query_labels: [q] or [q, C]; result_labels: [q, k] or [q, k, C].
    """
    if query_labels.ndim == 1:
        return result_labels == query_labels[:, None]
    return (result_labels & query_labels[:, None, :]).any(axis=-1)


def periodic_queries(labels: np.ndarray, count: int) -> np.ndarray:
    """About `count` held-out query rows for the evaluations during training.

    Class ids: an equal slice of each class (`per_class_queries`), when that gives at
    least half of `count`; otherwise (multi-hot, or very many classes) the first rows.
    """
    if labels.ndim == 1:
        classes = max(int(labels.max()) + 1, 1)
        picks = per_class_queries(labels, per_class=max(1, count // classes))
        if len(picks) >= min(count, len(labels)) // 2:
            return picks[:count]
    return np.arange(min(count, len(labels)))


def stratified_sample(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `count` rows drawn without replacement, each class in proportion to its size.

    labels: class ids [n] or multi-hot [n, C] (a row counts for its first label). Class
    shares are rounded by largest remainder, so the sample holds exactly min(count, n) rows;
    a class-sorted file gives every class, unlike its first `count` rows.
    """
    ids = labels if labels.ndim == 1 else np.argmax(labels, axis=1)
    count = min(count, len(ids))
    classes, sizes = np.unique(ids, return_counts=True)
    quotas = sizes * count / len(ids)
    takes = np.floor(quotas).astype(np.int64)
    takes[np.argsort(takes - quotas)[:count - takes.sum()]] += 1  # largest remainders first
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(ids == c), size=take, replace=False) for c, take in zip(classes, takes)]
    return np.sort(np.concatenate(picks))
