"""Spectral baselines: bits from eigenfunctions of a similarity graph's Laplacian (numpy only).

- `SH`: spectral hashing with the analytical 1-D eigenfunctions of a box
  (uniform) distribution along PCA directions (Weiss et al., NIPS 2008).
- `AGH`: one-layer anchor graph hashing (Liu et al., ICML 2011); its anchor
  graph is also DGH's (`tbhvae.baselines.dgh`) and the TBH graph's
  (`tbhvae.layers`). It runs k-means on a random training subsample, as the
  paper does.
"""
from __future__ import annotations

import numpy as np

from tbhvae.baselines.base import HashingBaseline, _principal_components, _random_rows, squared_distances


class SH(HashingBaseline):
    """Spectral hashing (Weiss et al., NIPS 2008) with a box (uniform) data model along PCA directions.

    Projects on the top min(bits, D) principal directions, treats each as
    uniform on its training [min, max] range, and keeps the `bits` 1-D
    eigenfunctions sin(pi/2 + k pi (v - min) / range) with the smallest
    eigenvalues, i.e. the smallest (k / range)^2, k >= 1. Needs bits <= D.
    """

    def _max_bits(self, num_train, dim):
        return dim

    def _fit(self, train):
        self.mean_ = train.mean(axis=0)
        self.components_, _ = _principal_components(train - self.mean_, min(self.bits, train.shape[1]))
        projected = (train - self.mean_) @ self.components_
        eps = np.finfo(np.float32).eps
        self.minimum_ = projected.min(axis=0) - eps
        ranges = projected.max(axis=0) + eps - self.minimum_
        max_mode = np.ceil((self.bits + 1) * ranges / ranges.max()).astype(int)
        dims = np.concatenate([np.full(m, d) for d, m in enumerate(max_mode)])
        modes = np.concatenate([np.arange(1, m + 1) for m in max_mode])
        frequencies = modes * np.pi / ranges[dims]
        keep = np.argsort(frequencies, kind="stable")[:self.bits]
        self.mode_dims_ = dims[keep]
        self.mode_frequencies_ = frequencies[keep].astype(np.float32)

    def _scores(self, rows):
        projected = (rows - self.mean_) @ self.components_
        shifted = projected[:, self.mode_dims_] - self.minimum_[self.mode_dims_]
        return np.sin(np.pi / 2 + shifted * self.mode_frequencies_)


class AGH(HashingBaseline):
    """One-layer anchor graph hashing (Liu et al., ICML 2011).

    Anchors: `anchors` k-means centres (Lloyd, `kmeans_iterations` rounds)
    fit on `kmeans_sample` random training rows. Each row x gets a sparse
    affinity z(x) [anchors]: Gaussian kernel exp(-d^2 / sigma^2) to its
    `nearest_anchors` nearest anchors, normalised to sum 1, where sigma is
    the mean training distance to the `nearest_anchors`-th nearest anchor.
    With Z [N, anchors] and L = diag(Z^T 1), the top eigenvectors V and
    eigenvalues S of L^-1/2 Z^T Z L^-1/2 other than the trivial L^1/2 1 give
    the projection W = sqrt(N) L^-1/2 V S^-1/2, and bits = sign(z(x) W) for
    training and new rows alike. Needs bits < anchors.
    """

    def __init__(self, bits: int, seed: int = 0, anchors: int = 300, nearest_anchors: int = 2,
                 kmeans_iterations: int = 10, kmeans_sample: int = 10000):
        super().__init__(bits, seed)
        if anchors < 2:
            raise ValueError(f"anchors must be >= 2, got {anchors}")
        if not 1 <= nearest_anchors <= anchors:
            raise ValueError(f"nearest_anchors must be in [1, anchors={anchors}], got {nearest_anchors}")
        if kmeans_iterations < 1:
            raise ValueError(f"kmeans_iterations must be >= 1, got {kmeans_iterations}")
        self.anchors = int(anchors)
        self.nearest_anchors = int(nearest_anchors)
        self.kmeans_iterations = int(kmeans_iterations)
        self.kmeans_sample = max(int(kmeans_sample), self.anchors)

    def _max_bits(self, num_train, dim):
        return self.anchors - 1

    def _fit(self, train):
        if train.shape[0] < self.anchors:
            raise ValueError(f"AGH with {self.anchors} anchors needs at least that many training rows, "
                             f"got {train.shape[0]}; pass anchors=<smaller>")
        rng = np.random.default_rng(self.seed)
        self.anchors_ = self._kmeans(_random_rows(train, self.kmeans_sample, rng), rng)
        nearest, squared = self._nearest_anchors(train)
        self.bandwidth_ = float(np.mean(np.sqrt(squared[:, -1])))
        affinity = self._affinity(nearest, squared)
        degrees = np.zeros(self.anchors)
        np.add.at(degrees, nearest.ravel(), affinity.ravel())
        gram = np.zeros((self.anchors, self.anchors))
        for k in range(self.nearest_anchors):
            for j in range(self.nearest_anchors):
                np.add.at(gram, (nearest[:, k], nearest[:, j]), affinity[:, k] * affinity[:, j])
        inv_sqrt_degrees = 1.0 / np.sqrt(np.maximum(degrees, 1e-12))
        normalised = gram * np.outer(inv_sqrt_degrees, inv_sqrt_degrees)
        # Remove the trivial eigenvector sqrt(degrees) (eigenvalue 1) explicitly rather than
        # dropping the top one, which is ambiguous when the graph has several components.
        trivial = np.sqrt(degrees) / np.linalg.norm(np.sqrt(degrees))
        eigenvalues, eigenvectors = np.linalg.eigh(normalised - np.outer(trivial, trivial))
        order = np.argsort(eigenvalues)[::-1][:self.bits]
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
        if eigenvalues[-1] <= 1e-10:
            raise ValueError(f"AGH: the anchor graph has fewer than {self.bits + 1} non-trivial "
                             "eigenvectors (too few anchors in use); lower bits or anchors")
        self.projection_ = (np.sqrt(train.shape[0]) * inv_sqrt_degrees[:, None] * eigenvectors
                            / np.sqrt(eigenvalues)).astype(np.float32)

    def _kmeans(self, sample: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Lloyd's k-means from random rows; empty clusters restart at random rows."""
        centres = sample[rng.choice(sample.shape[0], size=self.anchors, replace=False)].copy()
        for _ in range(self.kmeans_iterations):
            assignment = np.argmin(squared_distances(sample, centres), axis=1)
            counts = np.bincount(assignment, minlength=self.anchors)
            sums = np.zeros_like(centres)
            np.add.at(sums, assignment, sample)
            empty = counts == 0
            centres[~empty] = sums[~empty] / counts[~empty, None]
            centres[empty] = sample[rng.choice(sample.shape[0], size=int(empty.sum()), replace=False)]
        return centres

    def _nearest_anchors(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices int [n, s] and squared distances [n, s] of each row's s nearest anchors, nearest first."""
        squared = squared_distances(rows, self.anchors_)
        nearest = np.argpartition(squared, self.nearest_anchors - 1, axis=1)[:, :self.nearest_anchors]
        nearest_squared = np.take_along_axis(squared, nearest, axis=1)
        order = np.argsort(nearest_squared, axis=1)
        return np.take_along_axis(nearest, order, axis=1), np.take_along_axis(nearest_squared, order, axis=1)

    def _affinity(self, nearest: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """Row-normalised kernel weights [n, s] to the s nearest anchors."""
        # Subtracting each row's nearest distance only rescales the row before normalising.
        weights = np.exp(-(squared - squared[:, :1]) / self.bandwidth_ ** 2)
        return weights / weights.sum(axis=1, keepdims=True)

    def _scores(self, rows):
        nearest, squared = self._nearest_anchors(rows)
        affinity = self._affinity(nearest, squared)
        return np.einsum("ns,nsb->nb", affinity, self.projection_[nearest])

