"""Hamming-ranking retrieval evaluation, tie-aware (the honest TBH protocol).

Every ranking metric is the exact expectation over random orders within each
group of items tied at one Hamming distance (`tbhvae.tie_aware` has the
derivation), so it depends neither on the database order nor on any
tie-breaking rule. The mean is over **all** queries: a query with no relevant
item in its top K has AP 0 (DeepHash-pytorch, BiHalf, CIBHash do the same).
Relevance is `tbhvae.protocol.relevant`'s: same class id, or (multi-hot labels)
at least one shared label; a multi-hot row without labels is relevant to nothing.

Nothing needs sorting: per query, only the number of database items and of
relevant items at each distance d = 0..M enter the expectations, so the cost
is one XOR/popcount pass plus a histogram (`distance_histograms`).

The older convention (ties broken by database index, queries without a hit
left out of the mean) is kept as `mean_average_precision_index_ties` to
compare with published figures; on a class-sorted database it gives a
constant encoder mAP@1000 = 1.0, so nothing selects models with it.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tbhvae import protocol
from tbhvae.checks import check_labels
from tbhvae.codes import check_bits, database_words, hamming_distances, pack_codes, to_words
from tbhvae.index import HammingIndex
from tbhvae.tie_aware import (
    DistanceHistograms,
    check_top_k,
    radius_curves,
    tie_aware_average_precision,
    tie_aware_precision_at,
)

PRECISION_AT_N = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000)
_CHUNK_ELEMENTS = 1 << 21  # (query, database item) pairs per histogram chunk
_TOP_K_ELEMENTS = 1 << 22  # ranked (query, item[, label]) entries per chunk of the index-ties path


def _check_inputs(query_codes, db_codes, query_labels, db_labels):
    query_codes = check_bits(query_codes, "query_codes")
    db_codes = check_bits(db_codes, "db_codes")
    if query_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(f"query codes have {query_codes.shape[1]} bits but database codes "
                         f"have {db_codes.shape[1]}")
    if len(db_codes) == 0 or len(query_codes) == 0:
        raise ValueError("query_codes and db_codes must each hold at least one code")
    query_labels = check_labels(query_labels, len(query_codes), "query_labels")
    db_labels = check_labels(db_labels, len(db_codes), "db_labels")
    if query_labels.ndim != db_labels.ndim:
        raise ValueError("query_labels and db_labels must both be class ids or both multi-hot")
    if query_labels.ndim == 2 and query_labels.shape[1] != db_labels.shape[1]:
        raise ValueError(f"multi-hot widths differ: query_labels has {query_labels.shape[1]} classes, "
                         f"db_labels {db_labels.shape[1]}")
    return query_codes, db_codes, query_labels, db_labels


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
    query_words, db_packed = to_words(pack_codes(query_codes)), pack_codes(db_codes)
    n, q = len(db_codes), len(query_codes)
    single_label = db_labels.ndim == 1
    if single_label:  # database grouped by class: a query's relevant items are one slice
        classes, dense = np.unique(np.concatenate([db_labels, query_labels]), return_inverse=True)
        order = np.argsort(dense[:n], kind="stable")
        db_packed = db_packed[order]
        class_start = np.searchsorted(dense[:n][order], np.arange(len(classes) + 1))
        query_dense = dense[n:]
    else:
        db_labels_by_class = db_labels.T.astype(np.float32)  # [C, n], once for every chunk
    db_words = database_words(db_packed)
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


def mean_average_precision(query_codes, db_codes, query_labels, db_labels, top_k=1000) -> float:
    """Tie-aware mAP@top_k over all queries; `top_k=None` ranks the whole database.

    Args:
      query_codes: 0/1 uint8 [q, M].
      db_codes: 0/1 uint8 [n, M].
      query_labels, db_labels: class ids [q] / [n] or multi-hot [q, C] / [n, C].
      top_k: ranking depth K, or None for the full ranking.
    """
    check_top_k(top_k)
    histograms = distance_histograms(query_codes, db_codes, query_labels, db_labels)
    return float(tie_aware_average_precision(histograms, top_k).mean())


def _average_precision(relevant_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP of each row of a ranked bool matrix [q, k] -> (ap [q], relevant count [q])."""
    hits = np.cumsum(relevant_sorted, axis=1, dtype=np.int32)
    count = hits[:, -1]
    ranks = np.arange(1, relevant_sorted.shape[1] + 1, dtype=np.float64)
    ap = np.where(relevant_sorted, hits / ranks, 0.0).sum(axis=1) / np.maximum(count, 1)
    return ap, count


def mean_average_precision_index_ties(query_codes, db_codes, query_labels, db_labels, top_k=1000) -> float:
    """The older protocol: ties broken by database index, queries without a hit in the top K skipped.

    Kept only to compare with published figures (the TBH reference code ranks
    this way). It depends on the database order: on a class-sorted database a
    constant encoder scores 1.0. Never use it to compare or select models.
    """
    check_top_k(top_k)
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
        ap, count = _average_precision(protocol.relevant(query_labels[start:stop], db_labels[positions]))
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
    check_top_k(top_k)
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
