"""Hyperplane baselines: bit k = [projection_k(x - mean) > 0] (numpy only).

- `LSH`: random Gaussian projections of centred features.
- `PCAH`: the top-`bits` principal components.
- `ITQ`: PCA followed by an orthogonal rotation that minimises the
  quantisation loss ||B - V R||^2 (Gong & Lazebnik, CVPR 2011).
"""
from __future__ import annotations

import numpy as np

from tbhvae.baselines.base import HashingBaseline, _principal_components


class LSH(HashingBaseline):
    """Locality-sensitive hashing: bit k = [(x - mean) . w_k > 0], w_k ~ N(0, I)."""

    def _fit(self, train):
        self.mean_ = train.mean(axis=0)
        rng = np.random.default_rng(self.seed)
        self.projection_ = rng.standard_normal((train.shape[1], self.bits)).astype(np.float32)

    def _scores(self, rows):
        return (rows - self.mean_) @ self.projection_


class PCAH(HashingBaseline):
    """PCA hashing: bit k = sign of the k-th principal component (bits <= D)."""

    def _max_bits(self, num_train, dim):
        return dim

    def _fit(self, train):
        self.mean_ = train.mean(axis=0)
        self.components_, _ = _principal_components(train - self.mean_, self.bits)

    def _scores(self, rows):
        return (rows - self.mean_) @ self.components_


class ITQ(HashingBaseline):
    """Iterative quantisation (Gong & Lazebnik, CVPR 2011): PCA to `bits` dims, then a learned rotation.

    Starting from a random orthogonal R, alternates B = sign(V R) and the
    orthogonal Procrustes solution R = U W^T of V^T B = U S W^T, for
    `iterations` rounds (50 in the paper). `loss_history_` holds the mean
    quantisation loss ||B - V R||^2 / N before each update.
    """

    def __init__(self, bits: int, seed: int = 0, iterations: int = 50):
        super().__init__(bits, seed)
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.iterations = int(iterations)

    def _max_bits(self, num_train, dim):
        return dim

    def _fit(self, train):
        self.mean_ = train.mean(axis=0)
        self.components_, _ = _principal_components(train - self.mean_, self.bits)
        projected = ((train - self.mean_) @ self.components_).astype(np.float64)
        rng = np.random.default_rng(self.seed)
        rotation, _ = np.linalg.qr(rng.standard_normal((self.bits, self.bits)))
        self.loss_history_ = []
        for _ in range(self.iterations):
            rotated = projected @ rotation
            signs = np.where(rotated >= 0, 1.0, -1.0)
            self.loss_history_.append(float(np.mean(np.sum((signs - rotated) ** 2, axis=1))))
            left, _, right_t = np.linalg.svd(projected.T @ signs)
            rotation = left @ right_t
        self.rotation_ = rotation.astype(np.float32)

    def _scores(self, rows):
        return (rows - self.mean_) @ self.components_ @ self.rotation_
