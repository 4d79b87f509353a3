"""Hamming-ranking retrieval evaluation (the TBH protocol).

The database is ranked by Hamming distance to each query, ties broken by
database index (a stable sort). mAP@K averages, over queries with at least one
relevant item in the top K, AP = (1/R) * sum_{j<=K} rel_j * precision@j with R
the relevant items within the top K. Relevance: same class id, or (multi-hot
labels) at least one shared label.

Codes are packed into 64-bit words and compared with XOR + popcount, a chunk
of queries at a time on a thread pool, so memory stays bounded and both cores
work. mAP@K alone takes the exact top-K search of `HammingIndex` (a count
threshold per query, then a sort of the few codes within it), which gives the
same order as a full stable sort at a fraction of its cost.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tbhvae.codes import check_bits, hamming_distances, pack_codes, to_words
from tbhvae.index import HammingIndex

PRECISION_AT_N = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000)
_CHUNK_ELEMENTS = 1 << 24  # distances per chunk (x 8 bytes for the sort order)
_TOP_K_ELEMENTS = 1 << 22  # ranked (query, item[, label]) entries per chunk of the mAP@K path


@dataclasses.dataclass
class _Totals:
    """Sums over queries; every array is summed elementwise."""

    ap_top_k: float = 0.0
    queries_top_k: int = 0
    ap_full: float = 0.0
    queries_full: int = 0
    precision_at_n: np.ndarray | None = None  # [len(ns)]
    radius_precision: np.ndarray | None = None  # [M + 1]
    radius_recall: np.ndarray | None = None  # [M + 1]
    queries_with_relevant: int = 0

    def add(self, other: "_Totals") -> None:
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if theirs is not None:
                setattr(self, field.name, theirs if mine is None else mine + theirs)


def _check_labels(labels, count: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim not in (1, 2) or labels.shape[0] != count:
        raise ValueError(f"{name}: expected class ids [{count}] or multi-hot [{count}, C], "
                         f"got shape {labels.shape}")
    return labels


def _relevance(query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """bool [q, n]: query i and database item j share a class."""
    if query_labels.ndim == 1:
        return query_labels[:, None] == db_labels[None, :]
    shared = query_labels.astype(np.float32) @ db_labels.astype(np.float32).T
    return shared > 0


def _relevance_at(query_labels: np.ndarray, db_labels: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """bool [q, k]: query i shares a class with database item positions[i, j]."""
    if query_labels.ndim == 1:
        return query_labels[:, None] == db_labels[positions]
    shared = np.einsum("qc,qkc->qk", query_labels.astype(np.float32), db_labels[positions].astype(np.float32))
    return shared > 0


def _average_precision(relevant_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP of each row of a ranked bool matrix [q, k] -> (ap [q], relevant count [q])."""
    hits = np.cumsum(relevant_sorted, axis=1, dtype=np.int32)
    count = hits[:, -1]
    ranks = np.arange(1, relevant_sorted.shape[1] + 1, dtype=np.float64)
    ap = np.where(relevant_sorted, hits / ranks, 0.0).sum(axis=1) / np.maximum(count, 1)
    return ap, count


class _Evaluator:
    """Per-chunk statistics of one query set against one database.

    `complete=False` computes only AP@top_k (the fast path, through
    `HammingIndex.search`); `complete=True` sorts the whole database per query
    (chunk_totals) and adds full-ranking AP, precision@N and the
    precision/recall-by-radius curves.
    """

    def __init__(self, query_codes, db_codes, query_labels, db_labels, top_k, complete):
        query_codes = check_bits(query_codes, "query_codes")
        db_codes = check_bits(db_codes, "db_codes")
        if query_codes.shape[1] != db_codes.shape[1]:
            raise ValueError(f"query codes have {query_codes.shape[1]} bits but database codes "
                             f"have {db_codes.shape[1]}")
        if len(db_codes) == 0 or len(query_codes) == 0:
            raise ValueError("query_codes and db_codes must each hold at least one code")
        self.query_labels = _check_labels(query_labels, len(query_codes), "query_labels")
        self.db_labels = _check_labels(db_labels, len(db_codes), "db_labels")
        if self.query_labels.ndim != self.db_labels.ndim:
            raise ValueError("query_labels and db_labels must both be class ids or both multi-hot")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be positive or None, got {top_k}")
        self.bits = query_codes.shape[1]
        self.query_codes, self.db_codes = query_codes, db_codes
        if complete:  # the full sort packs here; the mAP@K path packs inside HammingIndex
            self.query_words = to_words(pack_codes(query_codes))
            self.db_words = to_words(pack_codes(db_codes))
        n = len(db_codes)
        self.top_k = n if top_k is None else min(top_k, n)
        self.complete = complete
        self.ns = np.array([v for v in PRECISION_AT_N if v <= n], dtype=np.int64)
        self.chunk = max(1, min(1024, _CHUNK_ELEMENTS // n))

    def chunk_totals(self, start: int) -> _Totals:
        stop = min(start + self.chunk, len(self.query_codes))
        dist = hamming_distances(self.query_words[start:stop], self.db_words)
        relevant = _relevance(self.query_labels[start:stop], self.db_labels)
        order = np.argsort(dist, axis=1, kind="stable")
        relevant_sorted = np.take_along_axis(relevant, order, axis=1)
        totals = _Totals()
        ap, count = _average_precision(relevant_sorted[:, :self.top_k])
        totals.ap_top_k, totals.queries_top_k = float(ap[count > 0].sum()), int((count > 0).sum())
        ap, count = _average_precision(relevant_sorted)
        totals.ap_full, totals.queries_full = float(ap[count > 0].sum()), int((count > 0).sum())
        hits = np.cumsum(relevant_sorted[:, :self.ns[-1]], axis=1)
        totals.precision_at_n = (hits[:, self.ns - 1] / self.ns).sum(axis=0)
        (totals.radius_precision, totals.radius_recall,
         totals.queries_with_relevant) = self._radius_curves(dist, relevant)
        return totals

    def _radius_curves(self, dist, relevant):
        """Summed precision/recall of retrieving everything within radius r, r = 0..M."""
        rows, bins = dist.shape[0], self.bits + 1
        flat = (dist + (np.arange(rows, dtype=np.int64) * bins)[:, None]).ravel()
        retrieved = np.bincount(flat, minlength=rows * bins).reshape(rows, bins).cumsum(axis=1)
        hits = np.bincount(flat, weights=relevant.ravel(), minlength=rows * bins)
        hits = hits.reshape(rows, bins).cumsum(axis=1)
        precision = np.where(retrieved > 0, hits / np.maximum(retrieved, 1), 0.0)
        has_relevant = hits[:, -1] > 0
        recall = hits[has_relevant] / hits[has_relevant, -1:]
        return precision.sum(axis=0), recall.sum(axis=0), int(has_relevant.sum())

    def top_k_totals(self) -> _Totals:
        """AP@top_k of every query from the index's exact top-K (threaded inside the index)."""
        index = HammingIndex(self.db_codes, backend="numpy")
        width = 1 if self.query_labels.ndim == 1 else self.query_labels.shape[1]
        rows = max(1, _TOP_K_ELEMENTS // (self.top_k * width))
        totals = _Totals()
        for start in range(0, len(self.query_codes), rows):
            stop = min(start + rows, len(self.query_codes))
            _, positions = index.search(self.query_codes[start:stop], self.top_k)
            ap, count = _average_precision(_relevance_at(self.query_labels[start:stop], self.db_labels, positions))
            totals.ap_top_k += float(ap[count > 0].sum())
            totals.queries_top_k += int((count > 0).sum())
        return totals

    def run(self) -> _Totals:
        if not self.complete:
            return self.top_k_totals()
        totals = _Totals()
        starts = range(0, len(self.query_codes), self.chunk)
        workers = min(os.cpu_count() or 1, len(starts))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for part in pool.map(self.chunk_totals, starts):
                totals.add(part)
        return totals


def code_statistics(codes) -> dict:
    """Health of a code set, 0/1 uint8 [n, M] -> {"bit_balance", "distinct_codes"}.

    bit_balance = 1 - 2 * mean_k |P(b_k = 1) - 1/2|: 1 when every bit splits the
    set in half, 0 when every bit is constant. Collapsed codes (few distinct
    codes) inflate mAP@K under index tie-breaking, so both belong next to it.
    """
    codes = check_bits(codes)
    return {"bit_balance": 1.0 - 2.0 * float(np.abs(codes.mean(axis=0) - 0.5).mean()),
            "distinct_codes": int(len(np.unique(pack_codes(codes), axis=0)))}


def _mean(total: float, count: int) -> float:
    return float(total / count) if count else 0.0


def mean_average_precision(query_codes, db_codes, query_labels, db_labels, top_k=1000) -> float:
    """mAP@top_k of Hamming ranking; `top_k=None` ranks the whole database.

    Args:
      query_codes: 0/1 uint8 [q, M].
      db_codes: 0/1 uint8 [n, M].
      query_labels, db_labels: class ids [q] / [n] or multi-hot [q, C] / [n, C].
      top_k: ranking depth K, or None for the full ranking.
    """
    totals = _Evaluator(query_codes, db_codes, query_labels, db_labels, top_k,
                        complete=False).run()
    return _mean(totals.ap_top_k, totals.queries_top_k)


def evaluate_codes(query_codes, db_codes, query_labels, db_labels, top_k=1000,
                   curves=False) -> dict:
    """All retrieval metrics of one query set against one database.

    Returns a dict with "map@{top_k}", "map" (full ranking) and "precision@r2"
    (mean precision of the items within Hamming radius 2, 0 for queries that
    retrieve nothing). With `curves=True` it also holds "pr_curve" (precision
    and recall of retrieving everything within radius r, r = 0..M, recall
    averaged over queries with a relevant item) and "precision_at_n"
    ({N: precision of the top N}).
    """
    evaluator = _Evaluator(query_codes, db_codes, query_labels, db_labels, top_k, complete=True)
    totals = evaluator.run()
    queries = len(evaluator.query_codes)
    precision = totals.radius_precision / queries
    metrics = {
        f"map@{top_k}": _mean(totals.ap_top_k, totals.queries_top_k),
        "map": _mean(totals.ap_full, totals.queries_full),
        "precision@r2": float(precision[min(2, evaluator.bits)]),
    }
    if curves:
        metrics["pr_curve"] = {
            "radius": list(range(evaluator.bits + 1)),
            "precision": precision.tolist(),
            "recall": (totals.radius_recall / max(totals.queries_with_relevant, 1)).tolist(),
        }
        metrics["precision_at_n"] = {
            int(n): float(p / queries) for n, p in zip(evaluator.ns, totals.precision_at_n)}
    return metrics
