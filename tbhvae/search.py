"""Exact k-nearest and radius selection over Hamming distances: the search kernels of `HammingIndex`.

Database codes are uint64 words [n, W] in column-major memory (`codes.database_words`),
queries words [q, W] (`codes.to_words`). Results are ordered by ascending distance,
ties by database position, for every backend: the numpy scan selects exactly, and
`faiss_top_k` re-ranks faiss's candidates to the same order.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tbhvae.codes import hamming_distances

# Bytes of one worker's [queries, n] distance block.
_DISTANCE_BLOCK_BYTES = 64 * 2**20
# Below this many query x code pairs, a thread pool costs more than it saves.
_MIN_PARALLEL_PAIRS = 2**22


def _kth_smallest(row: np.ndarray, k: int, top: int, guess: int) -> int:
    """Smallest t with at least k entries of `row` <= t (1 <= k <= len(row)).

    Gallops from `guess` (the previous query's answer, usually close) until the
    answer is bracketed, then bisects; every probe is one vectorised count.
    `top` bounds all values of `row`.
    """
    lo, hi = 0, top
    probe, step = min(max(guess, 0), top), 1
    lo_known = hi_known = False
    while lo < hi:
        if np.count_nonzero(row <= probe) >= k:
            hi, hi_known = probe, True
        else:
            lo, lo_known = probe + 1, True
        if lo_known and hi_known:
            probe = (lo + hi) // 2
        elif hi_known:
            probe = max(lo, hi - step)
        else:
            probe = min(hi, lo + step - 1)
        step *= 2
    return lo


def _sorted_within(row: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, positions) of entries <= threshold, by distance then position."""
    positions = np.flatnonzero(row <= threshold)
    distances = row[positions]
    order = np.argsort(distances, kind="stable")
    return distances[order], positions[order]


def scan(db_words: np.ndarray, bits: int, query_words: np.ndarray, select, workers: int) -> None:
    """Calls select(query_index, distance_row, guess) -> guess for every query.

    Queries are split across up to `workers` threads; each fills a bounded
    [chunk, n] distance block at a time. `guess` carries a hint (the last
    threshold) from one query to the next within a thread.
    """
    q, n = query_words.shape[0], db_words.shape[0]
    dtype = np.min_scalar_type(bits)
    chunk = max(1, min(q, _DISTANCE_BLOCK_BYTES // max(1, n * np.dtype(dtype).itemsize)))
    workers = min(workers, q) if q * n >= _MIN_PARALLEL_PAIRS else 1
    bounds = np.linspace(0, q, workers + 1).astype(int)

    def run(begin, end):
        block = np.empty((min(chunk, end - begin), n), dtype=dtype)
        guess = bits // 2
        for start in range(begin, end, chunk):
            stop = min(end, start + chunk)
            hamming_distances(query_words[start:stop], db_words, out=block[:stop - start])
            for offset in range(stop - start):
                guess = select(start + offset, block[offset], guess)

    if workers == 1:
        run(0, q)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(run, bounds[w], bounds[w + 1]) for w in range(workers)]:
            future.result()


def numpy_top_k(db_words: np.ndarray, bits: int, query_words: np.ndarray, k: int,
                workers: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest (1 <= k <= n): (distances int32 [q, k], positions int64 [q, k])."""
    q = query_words.shape[0]
    distances = np.empty((q, k), dtype=np.int32)
    positions = np.empty((q, k), dtype=np.int64)

    def select(i, row, guess):
        threshold = _kth_smallest(row, k, bits, guess)
        row_distances, row_positions = _sorted_within(row, threshold)
        distances[i] = row_distances[:k]
        positions[i] = row_positions[:k]
        return threshold

    scan(db_words, bits, query_words, select, workers)
    return distances, positions


def numpy_within(db_words: np.ndarray, bits: int, query_words: np.ndarray, radius: int,
                 workers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Everything within `radius`: one (distances int32 [m_i], positions int64 [m_i]) pair per query."""
    results = [None] * query_words.shape[0]

    def select(i, row, guess):
        distances, positions = _sorted_within(row, radius)
        results[i] = (distances.astype(np.int32), positions)
        return guess

    scan(db_words, bits, query_words, select, workers)
    return results


def faiss_top_k(faiss_index, n: int, query_words: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k through a faiss.IndexBinaryFlat of the n database codes, re-ranked to the numpy order.

    faiss's order among equal distances is not part of its API (and it may
    cut a tie at k), so each query fetches more than k neighbours until
    the last fetched distance exceeds the k-th one: then every code tied at
    the k-th distance is a candidate, and sorting the candidates by
    (distance, position) reproduces the numpy order exactly.
    Returns (distances int32 [q, k], positions int64 [q, k]).
    """
    nbytes = faiss_index.code_size
    queries = np.ascontiguousarray(query_words.view(np.uint8)[:, :nbytes])
    distances = np.empty((queries.shape[0], k), dtype=np.int32)
    positions = np.empty((queries.shape[0], k), dtype=np.int64)
    pending = np.arange(queries.shape[0])
    fetch = min(n, 2 * k + 16)
    while pending.size:
        found_distances, found_positions = faiss_index.search(queries[pending], fetch)
        complete = (found_distances[:, -1] > found_distances[:, k - 1]) | (fetch == n)
        key = found_distances[complete].astype(np.int64) * n + found_positions[complete]
        order = np.argsort(key, axis=1)[:, :k]
        rows = pending[complete]
        distances[rows] = np.take_along_axis(found_distances[complete], order, axis=1)
        positions[rows] = np.take_along_axis(found_positions[complete], order, axis=1)
        pending = pending[~complete]
        fetch = min(n, 4 * fetch)
    return distances, positions


def faiss_approximate_top_k(faiss_index, query_words: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest that an approximate faiss binary index (IndexBinaryIVF) finds, by (distance, position).

    One search of k: which of the codes tied at the k-th distance are kept is
    faiss's (deterministic) choice, as fetching every tie would cost more than
    the scan the index avoids. Position -1 (distance int32 max) where the probed
    clusters held fewer than k codes. Returns (distances int32 [q, k], positions int64 [q, k]).
    """
    queries = np.ascontiguousarray(query_words.view(np.uint8)[:, :faiss_index.code_size])
    distances, positions = faiss_index.search(queries, k)
    key = np.where(positions < 0, np.iinfo(np.int64).max, distances.astype(np.int64) << 40 | positions)
    order = np.argsort(key, axis=1)
    return (np.take_along_axis(distances, order, axis=1).astype(np.int32),
            np.take_along_axis(positions, order, axis=1).astype(np.int64))
