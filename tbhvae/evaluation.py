"""Hamming-ranking retrieval evaluation, tie-aware (the honest TBH protocol).

Ranking the database by Hamming distance leaves every item at the same
distance tied. Every metric here is the **expectation over uniformly random
orders within each tie group** (McSherry & Najork, ECIR 2008; He et al.,
"Hashing as Tie-Aware Learning to Rank", CVPR 2018), so it depends neither on
the database order nor on any tie-breaking rule, and it is computed exactly
(no sampling). The mean is over **all** queries: a query with no relevant item
in its top K has AP 0 (DeepHash-pytorch, BiHalf, CIBHash do the same).
Relevance: same class id, or (multi-hot labels) at least one shared label; a
multi-hot row without labels is relevant to nothing.

Nothing needs sorting: per query, only the number of database items n_d and of
relevant items r_d at each distance d = 0..M enter the expectations, so the
cost is one XOR/popcount pass plus a histogram (`distance_histograms`).

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

The older convention (ties broken by database index, queries without a hit
left out of the mean) is kept as `mean_average_precision_index_ties` to
compare with published figures; on a class-sorted database it gives a
constant encoder mAP@1000 = 1.0, so nothing selects models with it.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tbhvae.codes import check_bits, hamming_distances, pack_codes, to_words
from tbhvae.index import HammingIndex

PRECISION_AT_N = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000)
_CHUNK_ELEMENTS = 1 << 21  # (query, database item) pairs per histogram chunk
_TOP_K_ELEMENTS = 1 << 22  # ranked (query, item[, label]) entries per chunk of the index-ties path
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


def _check_labels(labels, count: int, name: str) -> np.ndarray:
    """Class ids [count] (non-negative integers) or multi-hot 0/1 [count, C]."""
    labels = np.asarray(labels)
    if labels.ndim not in (1, 2) or labels.shape[0] != count:
        raise ValueError(f"{name}: expected class ids [{count}] or multi-hot [{count}, C], "
                         f"got shape {labels.shape}")
    if labels.dtype.kind not in "biuf":
        raise ValueError(f"{name}: labels must be numeric, got dtype {labels.dtype}")
    if labels.size and labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
        raise ValueError(f"{name}: labels hold NaN or Inf")
    if labels.ndim == 1 and labels.size and (labels.min() < 0 or np.any(labels != np.round(labels))):
        raise ValueError(f"{name}: class ids must be non-negative integers")
    if labels.ndim == 2 and labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name}: multi-hot labels must hold only 0 and 1")
    return labels


def _check_inputs(query_codes, db_codes, query_labels, db_labels):
    query_codes = check_bits(query_codes, "query_codes")
    db_codes = check_bits(db_codes, "db_codes")
    if query_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(f"query codes have {query_codes.shape[1]} bits but database codes "
                         f"have {db_codes.shape[1]}")
    if len(db_codes) == 0 or len(query_codes) == 0:
        raise ValueError("query_codes and db_codes must each hold at least one code")
    query_labels = _check_labels(query_labels, len(query_codes), "query_labels")
    db_labels = _check_labels(db_labels, len(db_codes), "db_labels")
    if query_labels.ndim != db_labels.ndim:
        raise ValueError("query_labels and db_labels must both be class ids or both multi-hot")
    if query_labels.ndim == 2 and query_labels.shape[1] != db_labels.shape[1]:
        raise ValueError(f"multi-hot widths differ: query_labels has {query_labels.shape[1]} classes, "
                         f"db_labels {db_labels.shape[1]}")
    return query_codes, db_codes, query_labels, db_labels


def _check_top_k(top_k) -> None:
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k <= 0:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")


def distance_histograms(query_codes, db_codes, query_labels, db_labels) -> DistanceHistograms:
    """Counts of database items (and relevant ones) at each Hamming distance.

    Args:
      query_codes, db_codes: 0/1 uint8 [q, M] and [n, M].
      query_labels, db_labels: class ids [q] / [n] or multi-hot [q, C] / [n, C].
    Returns:
      DistanceHistograms with int64 [q, M + 1] arrays. Memory is bounded by
      chunking the queries; chunks run on a thread pool.
    """
    query_codes, db_codes, query_labels, db_labels = _check_inputs(
        query_codes, db_codes, query_labels, db_labels)
    bins = query_codes.shape[1] + 1
    query_words, db_words = to_words(pack_codes(query_codes)), to_words(pack_codes(db_codes))
    n, q = len(db_codes), len(query_codes)
    single_label = db_labels.ndim == 1
    if single_label:  # database grouped by class: a query's relevant items are one slice
        classes, dense = np.unique(np.concatenate([db_labels, query_labels]), return_inverse=True)
        order = np.argsort(dense[:n], kind="stable")
        db_words = db_words[order]
        class_start = np.searchsorted(dense[:n][order], np.arange(len(classes) + 1))
        query_dense = dense[n:]
    else:
        db_labels_by_class = db_labels.T.astype(np.float32)  # [C, n], once for every chunk
    rows = max(1, min(1024, _CHUNK_ELEMENTS // n))
    counts = np.empty((q, bins), np.int64)
    relevant = np.empty((q, bins), np.int64)

    def count_range(begin: int, end: int) -> None:
        keys = np.empty(rows * n, np.int64)  # reused: fresh temporaries would page-fault every chunk
        offsets = (np.arange(rows, dtype=np.int64) * bins)[:, None]
        for start in range(begin, end, rows):
            stop = min(start + rows, end)
            size = stop - start
            dist = hamming_distances(query_words[start:stop], db_words)
            key = keys[:size * n].reshape(size, n)
            np.add(dist, offsets[:size], out=key, dtype=np.int64)  # key = (row, distance)
            counts[start:stop] = np.bincount(key.ravel(), minlength=size * bins).reshape(size, bins)
            if single_label:
                for label in np.unique(query_dense[start:stop]):
                    members = np.flatnonzero(query_dense[start:stop] == label)
                    inside = np.add(dist[members, class_start[label]:class_start[label + 1]],
                                    offsets[:len(members)], dtype=np.int64)
                    relevant[start + members] = np.bincount(
                        inside.ravel(), minlength=len(members) * bins).reshape(-1, bins)
            else:  # relevance as weights
                shared = query_labels[start:stop].astype(np.float32) @ db_labels_by_class
                relevant[start:stop] = np.bincount(key.ravel(), weights=(shared > 0).ravel(),
                                                   minlength=size * bins).reshape(size, bins)

    workers = max(1, min(os.cpu_count() or 1, -(-q // rows)))
    bounds = np.linspace(0, q, workers + 1).astype(int)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(count_range, bounds[:-1], bounds[1:]))
    _warn_about_labels(relevant, counts)
    return DistanceHistograms(counts, relevant)


def _warn_about_labels(relevant: np.ndarray, counts: np.ndarray) -> None:
    """Warns when some queries can never score (no relevant database item) or every item is relevant."""
    totals = relevant.sum(axis=1)
    without = int((totals == 0).sum())
    if without:
        warnings.warn(f"{without} of {len(totals)} queries have no relevant item in the database (a class "
                      f"or label set absent there); they score AP 0 and precision 0, and are left out of recall",
                      stacklevel=3)
    if np.all(totals == counts.sum(axis=1)):
        warnings.warn("every database item is relevant to every query (one class?): any codes score mAP 1",
                      stacklevel=3)


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
    _check_top_k(top_k)
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


def mean_average_precision(query_codes, db_codes, query_labels, db_labels, top_k=1000) -> float:
    """Tie-aware mAP@top_k over all queries; `top_k=None` ranks the whole database.

    Args:
      query_codes: 0/1 uint8 [q, M].
      db_codes: 0/1 uint8 [n, M].
      query_labels, db_labels: class ids [q] / [n] or multi-hot [q, C] / [n, C].
      top_k: ranking depth K, or None for the full ranking.
    """
    _check_top_k(top_k)
    histograms = distance_histograms(query_codes, db_codes, query_labels, db_labels)
    return float(tie_aware_average_precision(histograms, top_k).mean())


def _average_precision(relevant_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP of each row of a ranked bool matrix [q, k] -> (ap [q], relevant count [q])."""
    hits = np.cumsum(relevant_sorted, axis=1, dtype=np.int32)
    count = hits[:, -1]
    ranks = np.arange(1, relevant_sorted.shape[1] + 1, dtype=np.float64)
    ap = np.where(relevant_sorted, hits / ranks, 0.0).sum(axis=1) / np.maximum(count, 1)
    return ap, count


def _relevance_at(query_labels: np.ndarray, db_labels: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """bool [q, k]: query i shares a class with database item positions[i, j]."""
    if query_labels.ndim == 1:
        return query_labels[:, None] == db_labels[positions]
    shared = np.einsum("qc,qkc->qk", query_labels.astype(np.float32), db_labels[positions].astype(np.float32))
    return shared > 0


def mean_average_precision_index_ties(query_codes, db_codes, query_labels, db_labels, top_k=1000) -> float:
    """The older protocol: ties broken by database index, queries without a hit in the top K skipped.

    Kept only to compare with published figures (the TBH reference code ranks
    this way). It depends on the database order: on a class-sorted database a
    constant encoder scores 1.0. Never use it to compare or select models.
    """
    _check_top_k(top_k)
    query_codes, db_codes, query_labels, db_labels = _check_inputs(
        query_codes, db_codes, query_labels, db_labels)
    top_k = len(db_codes) if top_k is None else min(int(top_k), len(db_codes))
    index = HammingIndex(db_codes, backend="numpy")
    width = 1 if query_labels.ndim == 1 else query_labels.shape[1]
    rows = max(1, _TOP_K_ELEMENTS // (top_k * width))
    total, counted = 0.0, 0
    for start in range(0, len(query_codes), rows):
        stop = min(start + rows, len(query_codes))
        _, positions = index.search(query_codes[start:stop], top_k)
        ap, count = _average_precision(_relevance_at(query_labels[start:stop], db_labels, positions))
        total += float(ap[count > 0].sum())
        counted += int((count > 0).sum())
    return total / counted if counted else 0.0


def code_statistics(codes) -> dict:
    """Health of a code set, 0/1 uint8 [n, M] -> bit balance (mean and worst bit) and distinct codes.

    Balance of bit k is 1 - 2 |P(b_k = 1) - 1/2|: 1 when the bit splits the
    set in half, 0 when it is constant. "bit_balance" is its mean over bits,
    "min_bit_balance" its minimum.
    """
    codes = check_bits(codes)
    balance = 1.0 - 2.0 * np.abs(codes.mean(axis=0) - 0.5)
    return {"bit_balance": float(balance.mean()), "min_bit_balance": float(balance.min()),
            "distinct_codes": int(len(np.unique(pack_codes(codes), axis=0)))}


def evaluate_codes(query_codes, db_codes, query_labels, db_labels, top_k=1000,
                   curves=False, index_ties=False) -> dict:
    """All retrieval metrics of one query set against one database, tie-aware.

    Returns a dict with "map@{top_k}", "map" (full ranking) and "precision@r2"
    (mean precision of the items within Hamming radius 2, 0 for queries that
    retrieve nothing), and "chance_map@{top_k}", what a constant encoder scores
    on the same queries (about the class prior). With `curves=True` it also
    holds "pr_curve" (see `radius_curves`) and "precision_at_n" ({N: expected precision of the top
    N}). With `index_ties=True` it adds "map@{top_k}_index_ties", the older
    protocol (`mean_average_precision_index_ties`).
    """
    _check_top_k(top_k)
    histograms = distance_histograms(query_codes, db_codes, query_labels, db_labels)
    bits = histograms.counts.shape[1] - 1
    radius = radius_curves(histograms)
    metrics = {
        f"map@{top_k}": float(tie_aware_average_precision(histograms, top_k).mean()),
        "map": float(tie_aware_average_precision(histograms, None).mean()),
        "precision@r2": float(radius["precision"][min(2, bits)]),
    }
    metrics[f"chance_map@{top_k}"] = float(tie_aware_average_precision(_collapsed(histograms), top_k).mean())
    if index_ties:
        metrics[f"map@{top_k}_index_ties"] = mean_average_precision_index_ties(
            query_codes, db_codes, query_labels, db_labels, top_k)
    if curves:
        ns = [v for v in PRECISION_AT_N if v <= histograms.database_size]
        metrics["pr_curve"] = radius
        metrics["precision_at_n"] = dict(zip(ns, tie_aware_precision_at(histograms, ns).mean(axis=0).tolist()))
    return metrics


def _collapsed(histograms: DistanceHistograms) -> DistanceHistograms:
    """The histograms a constant encoder gives the same queries: every item at distance 0."""
    return DistanceHistograms(histograms.counts.sum(axis=1, keepdims=True),
                              histograms.relevant.sum(axis=1, keepdims=True))


def health_warnings(metrics: dict, chance: float, database: int) -> list[str]:
    """One-line warnings about codes that are collapsed or retrieve at chance.

    metrics: holds "map@1000" and the keys of `code_statistics`; chance: the
    "chance_map@1000" of `evaluate_codes` for the same queries; database: the
    number of database codes.
    """
    warnings = []
    if metrics["map@1000"] < chance + 0.02:  # random codes of unrelated data land within ~0.01 of chance
        warnings.append(f"mAP@1000 {metrics['map@1000']:.3f} is at chance (a constant code scores {chance:.3f})")
    if metrics["bit_balance"] < 0.5:
        warnings.append(f"collapsed codes: mean bit balance {metrics['bit_balance']:.2f} (1 = every bit splits "
                        f"the database in half)")
    if metrics["min_bit_balance"] < 0.01:
        warnings.append("at least one bit is constant over the database (it carries no information)")
    if metrics["distinct_codes"] < min(database, 1024) // 4:  # fewer than 256: most queries tie with thousands
        warnings.append(f"only {metrics['distinct_codes']} distinct codes in {database} database items")
    return warnings
