"""Metrics of a Hamming ranking from its distance histograms, exact over the orders within ties.

Ranking the database by Hamming distance leaves every item at the same
distance tied. Every ranking metric here is the **expectation over uniformly
random orders within each tie group** (McSherry & Najork, ECIR 2008; He et al.,
"Hashing as Tie-Aware Learning to Rank", CVPR 2018), so it depends neither on
the database order nor on any tie-breaking rule, and it is computed exactly
(no sampling). Per query, only the number of database items n_d and of
relevant items r_d at each distance d = 0..M enter the expectations
(`DistanceHistograms`, counted by `tbhvae.evaluation.distance_histograms`).

AP@K, with the TBH normalisation (divide by R_K, the relevant items within the
top K). Let N_d and R_d count the items and relevant items strictly closer
than d. A tie group entirely inside the top K contributes (McSherry & Najork)

    (r_d / n_d) * sum_{t=N_d+1}^{N_d+n_d} [R_d + 1 + (t - N_d - 1) c_d] / t,
    c_d = (r_d - 1) / (n_d - 1)  (0 when n_d = 1),

which is (r_d / n_d) * [(R_d + 1 - (N_d + 1) c_d) (H(N_d + n_d) - H(N_d)) + c_d n_d]
with H the harmonic numbers. Only the group s that straddles position K makes
R_K random: k = K - N_s of its n_s items fall inside the cut and the number X
of relevant ones among them is hypergeometric(n_s, r_s, k). Given X = x those x
relevant items sit uniformly among the k positions, so the group adds
(x / k) [(R_s + 1) H1 + (x - 1) / (k - 1) * H2] with H1 = H(N_s + k) - H(N_s)
and H2 = k - (N_s + 1) H1, and

    E[AP@K] = sum_x P(X = x) * (S + group(x)) / (R_s + x)   (0 where R_s + x = 0),

S being the sum of the complete groups' contributions: O(min(r_s, k)) terms
per query. Precision@N is linear in the hits, so its expectation takes the
straddling group's r_s / n_s share. Precision and recall within a Hamming
radius are tie-free.
"""
from __future__ import annotations

import dataclasses

import numpy as np

_HYPERGEOMETRIC_ENTRIES = 1 << 22  # (query, x) terms per block of the straddling-group sum


@dataclasses.dataclass
class DistanceHistograms:
    """Per-query counts by Hamming distance: all the tie-aware metrics need.

    counts: int64 [q, M + 1], database items at distance d from query i.
    relevant: int64 [q, M + 1], the relevant ones among them.
    """

    counts: np.ndarray
    relevant: np.ndarray

    @property
    def database_size(self) -> int:
        return int(self.counts[0].sum())

def check_top_k(top_k) -> None:
    """Raises ValueError unless `top_k` is a positive integer or None (the full ranking)."""
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k <= 0:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")

def _harmonic(n: int) -> np.ndarray:
    """H(t) = sum_{i<=t} 1/i for t = 0..n: float64 [n + 1]."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])


def _log_factorial(n: int) -> np.ndarray:
    """log t! for t = 0..n: float64 [n + 1]."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def _complete_group_sums(counts, relevant, closer, relevant_closer, harmonic):
    """Expected sum of rel_t * precision@t over each whole tie group: float64 [q, M + 1]."""
    spread = np.where(counts > 1, (relevant - 1) / np.maximum(counts - 1, 1), 0.0)
    delta_h = harmonic[closer + counts] - harmonic[closer]
    inner = (relevant_closer + 1 - (closer + 1) * spread) * delta_h + spread * counts
    return np.where(counts > 0, relevant / np.maximum(counts, 1), 0.0) * inner


def tie_aware_average_precision(histograms: DistanceHistograms, top_k: int | None = 1000) -> np.ndarray:
    """Expected AP@top_k of every query over random orders within ties: float64 [q].

    `top_k=None` (or >= the database size) is the full ranking. See the module
    docstring for the derivation.
    """
    check_top_k(top_k)
    counts, relevant = histograms.counts, histograms.relevant
    n = histograms.database_size
    cut = n if top_k is None else min(int(top_k), n)
    harmonic = _harmonic(n)
    cumulative = np.cumsum(counts, axis=1)
    closer = cumulative - counts
    relevant_closer = np.cumsum(relevant, axis=1) - relevant
    inside = cumulative <= cut  # tie groups entirely within the top K (a prefix of the bins)
    group_sums = _complete_group_sums(counts, relevant, closer, relevant_closer, harmonic)
    full_sum = np.where(inside, group_sums, 0.0).sum(axis=1)
    full_relevant = np.where(inside, relevant, 0).sum(axis=1)
    ap = np.where(full_relevant > 0, full_sum / np.maximum(full_relevant, 1), 0.0)
    group = np.minimum(inside.sum(axis=1), counts.shape[1] - 1)  # the first group not entirely inside
    rows = np.arange(len(counts))
    straddle = np.flatnonzero(~inside[:, -1] & (closer[rows, group] < cut))  # the cut splits a group
    if straddle.size:
        group = group[straddle]
        ap[straddle] = _straddling_expectation(
            full_sum[straddle], full_relevant[straddle], closer[straddle, group],
            counts[straddle, group], relevant[straddle, group], cut, harmonic, _log_factorial(n))
    return ap


def _straddling_expectation(full_sum, full_relevant, closer, size, hits, cut, harmonic, log_factorial):
    """E[AP@K] over the hypergeometric count of relevant items the cut takes from the straddling group.

    All arguments [s] per query except cut (K), harmonic and log_factorial.
    """
    taken = cut - closer  # k items of the group inside the top K, 1 <= k < size
    low = np.maximum(0, taken - (size - hits))
    high = np.minimum(hits, taken)
    h1 = harmonic[closer + taken] - harmonic[closer]
    h2 = taken - (closer + 1) * h1
    spread_scale = np.where(taken > 1, 1.0 / np.maximum(taken - 1, 1), 0.0)

    def log_choose(a, b):
        return log_factorial[a] - log_factorial[b] - log_factorial[a - b]

    result = np.empty(len(full_sum))
    order = np.argsort(high - low, kind="stable")  # blocks of similar width waste little padding
    widths = (high - low + 1)[order]
    start = 0
    while start < len(order):
        # the longest block from `start` whose padded [rows, width] fits (rows * width ascends)
        fits = np.arange(1, len(order) - start + 1) * widths[start:] <= _HYPERGEOMETRIC_ENTRIES
        stop = start + max(1, int(fits.sum()))
        block = order[start:stop]
        width = int(widths[stop - 1])
        x = low[block, None] + np.arange(width)[None, :]
        valid = x <= high[block, None]
        x = np.where(valid, x, low[block, None])
        log_pmf = (log_choose(hits[block, None], x) + log_choose(size[block, None] - hits[block, None],
                                                                   taken[block, None] - x)
                   - log_choose(size[block], taken[block])[:, None])
        group = (x / taken[block, None]) * ((full_relevant[block, None] + 1) * h1[block, None]
                                            + (x - 1) * spread_scale[block, None] * h2[block, None])
        retrieved = full_relevant[block, None] + x
        ap = np.where(retrieved > 0, (full_sum[block, None] + group) / np.maximum(retrieved, 1), 0.0)
        result[block] = np.where(valid, np.exp(log_pmf) * ap, 0.0).sum(axis=1)
        start = stop
    return result


def tie_aware_precision_at(histograms: DistanceHistograms, ns) -> np.ndarray:
    """Expected precision of the top N for each N in `ns` (<= database size): float64 [q, len(ns)]."""
    counts, relevant = histograms.counts, histograms.relevant
    cumulative = np.cumsum(counts, axis=1)
    cumulative_relevant = np.cumsum(relevant, axis=1)
    result = np.empty((len(counts), len(ns)))
    rows = np.arange(len(counts))
    for column, top in enumerate(ns):
        group = (cumulative < top).sum(axis=1)  # the bin holding position N
        before = cumulative[rows, group] - counts[rows, group]
        hits_before = cumulative_relevant[rows, group] - relevant[rows, group]
        share = relevant[rows, group] / np.maximum(counts[rows, group], 1)
        result[:, column] = (hits_before + (top - before) * share) / top
    return result


def radius_curves(histograms: DistanceHistograms) -> dict:
    """Precision and recall of retrieving everything within radius r = 0..M (query means).

    Precision is 0 for a query that retrieves nothing; recall averages over
    queries with at least one relevant item in the database. Also the
    confusion counts per radius summed over queries (true/false positives and
    negatives), for TensorBoard's PR-curve summary.
    """
    retrieved = np.cumsum(histograms.counts, axis=1)
    hits = np.cumsum(histograms.relevant, axis=1)
    precision = np.where(retrieved > 0, hits / np.maximum(retrieved, 1), 0.0).mean(axis=0)
    has_relevant = hits[:, -1] > 0
    recall = (hits[has_relevant] / hits[has_relevant, -1:]).sum(axis=0) / max(int(has_relevant.sum()), 1)
    # counts summed over queries, as TensorBoard's PR-curve plugin takes them
    true_positives = hits.sum(axis=0)
    false_positives = retrieved.sum(axis=0) - true_positives
    relevant_total = int(hits[:, -1].sum())
    return {"radius": list(range(retrieved.shape[1])), "precision": precision.tolist(),
            "recall": recall.tolist(), "true_positives": true_positives.tolist(),
            "false_positives": false_positives.tolist(),
            "false_negatives": (relevant_total - true_positives).tolist(),
            "true_negatives": (int(retrieved[:, -1].sum()) - relevant_total - false_positives).tolist()}
