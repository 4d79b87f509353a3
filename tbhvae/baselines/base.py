"""The baselines' common base class and numeric helpers (numpy only).

`HashingBaseline` checks the inputs and encodes in row chunks; a method
implements `_fit(train [N, D])` and `_scores(rows [n, D]) -> [n, bits]`.
"""
from __future__ import annotations

import numpy as np

from tbhvae.checks import check_features

ENCODE_CHUNK_ROWS = 16384
COVARIANCE_CHUNK_ROWS = 8192


def _check_bits_count(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits <= 0:
        raise ValueError(f"bits must be a positive integer, got {bits!r}")
    return int(bits)


def _principal_components(centred: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Top principal directions of centred rows [N, D]: (directions [D, count], variances [count]).

    The covariance is accumulated in float64 over row chunks; directions are
    sorted by decreasing variance.
    """
    dim = centred.shape[1]
    covariance = np.zeros((dim, dim), dtype=np.float64)
    for start in range(0, centred.shape[0], COVARIANCE_CHUNK_ROWS):
        chunk = centred[start:start + COVARIANCE_CHUNK_ROWS].astype(np.float64)
        covariance += chunk.T @ chunk
    covariance /= max(centred.shape[0] - 1, 1)
    variances, directions = np.linalg.eigh(covariance)
    order = np.argsort(variances)[::-1][:count]
    return directions[:, order].astype(np.float32), variances[order]


def squared_distances(rows: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [n, k] between rows [n, D] and centres [k, D], clipped at 0."""
    distances = (
        np.einsum("ij,ij->i", rows, rows)[:, None]
        - 2.0 * rows @ centres.T
        + np.einsum("ij,ij->i", centres, centres)[None, :]
    )
    return np.maximum(distances, 0.0)


def _random_rows(features: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random rows in their original order (all rows when there are fewer)."""
    count = min(count, features.shape[0])
    return features[np.sort(rng.choice(features.shape[0], size=count, replace=False))]


class HashingBaseline:
    """Base class: input checks, `fit` / `encode` plumbing, chunked encoding.

    Subclasses implement `_fit(train [N, D] float32)` and
    `_scores(rows [n, D] float32) -> float [n, bits]` (bit = score > 0), and
    may override `_max_bits(num_train, dim)`.
    """

    def __init__(self, bits: int, seed: int = 0):
        self.bits = _check_bits_count(bits)
        self.seed = int(seed)
        self._dim: int | None = None

    def _max_bits(self, num_train: int, dim: int) -> int | None:
        return None

    def check_fits(self, num_train: int, dim: int) -> None:
        """ValueError unless this method can fit `bits` on num_train x dim features (checked before any work)."""
        limit = self._max_bits(num_train, dim)
        if limit is not None and self.bits > limit:
            raise ValueError(f"{type(self).__name__} supports at most {limit} bits on {num_train} x {dim} "
                             f"features, got bits={self.bits}")

    def fit(self, train_features) -> HashingBaseline:
        """Fits on `train_features` float [N, D], N >= 2; returns self."""
        train = check_features(train_features, "train_features")
        if train.shape[0] < 2:
            raise ValueError(f"train_features: need at least 2 rows to fit, got {train.shape[0]}")
        self.check_fits(*train.shape)
        self._fit(train)
        self._dim = train.shape[1]
        return self

    def encode(self, features) -> np.ndarray:
        """0/1 codes uint8 [n, bits] of `features` [n, D]."""
        if self._dim is None:
            raise RuntimeError(f"{type(self).__name__}.encode called before fit; call fit(train_features) first")
        rows = check_features(features, "features")
        if rows.shape[1] != self._dim:
            raise ValueError(f"features: has {rows.shape[1]} dimensions but the model was fit on {self._dim}")
        return np.concatenate([
            (self._scores(rows[start:start + ENCODE_CHUNK_ROWS]) > 0).astype(np.uint8)
            for start in range(0, rows.shape[0], ENCODE_CHUNK_ROWS)])

    def _fit(self, train: np.ndarray) -> None:
        raise NotImplementedError

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError
