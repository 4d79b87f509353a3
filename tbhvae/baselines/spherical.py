"""Spherical hashing: one bit per hypersphere (Heo et al., CVPR 2012; numpy only).

Pivots and radii are optimised for balanced, pairwise independent bits on a
random training subsample, as the paper does. Codes are compared with plain
Hamming distance.
"""
from __future__ import annotations

import numpy as np

from tbhvae.baselines.base import HashingBaseline, _random_rows, squared_distances

PIVOT_START_ROWS = 5


class SpherH(HashingBaseline):
    """Spherical hashing (Heo et al., CVPR 2012): bit k = [||x - p_k|| <= t_k].

    Fit on `training_sample` random training rows (the paper optimises on a
    small subset): each pivot starts at the mean of `PIVOT_START_ROWS` random
    rows (as in the authors' code); each round sets every radius
    t_k to the median distance of the subset to p_k (so each bit is 1 for
    half the rows), counts o_ij, the rows inside both spheres i and j, and
    moves each pivot by the mean over j of
    0.5 (o_ij - m/4) / (m/4) (p_i - p_j), pushing pairs apart when they
    overlap too much and together when too little. Stops when the mean and
    standard deviation of |o_ij - m/4| fall under `mean_tolerance` and
    `std_tolerance` times m/4 (10 % and 15 % in the paper) or after
    `max_iterations` rounds.
    """

    def __init__(self, bits: int, seed: int = 0, training_sample: int = 5000,
                 max_iterations: int = 100, mean_tolerance: float = 0.10,
                 std_tolerance: float = 0.15):
        super().__init__(bits, seed)
        if training_sample < 4:
            raise ValueError(f"training_sample must be >= 4, got {training_sample}")
        if max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
        self.training_sample = int(training_sample)
        self.max_iterations = int(max_iterations)
        self.mean_tolerance = float(mean_tolerance)
        self.std_tolerance = float(std_tolerance)

    def _fit(self, train):
        rng = np.random.default_rng(self.seed)
        sample = _random_rows(train, self.training_sample, rng).astype(np.float64)
        quarter = sample.shape[0] / 4.0
        starts = np.stack([rng.choice(sample.shape[0], size=min(PIVOT_START_ROWS, len(sample)), replace=False)
                           for _ in range(self.bits)])
        pivots = sample[starts].mean(axis=1)
        off_diagonal = ~np.eye(self.bits, dtype=bool)
        self.iterations_ = 0
        while self.bits > 1 and self.iterations_ < self.max_iterations:
            distances = np.sqrt(squared_distances(sample, pivots))
            inside = (distances <= np.median(distances, axis=0)).astype(np.float64)
            overlaps = inside.T @ inside
            deviation = np.abs(overlaps[off_diagonal] - quarter)
            if (deviation.mean() <= self.mean_tolerance * quarter
                    and deviation.std() <= self.std_tolerance * quarter):
                break
            weights = 0.5 * (overlaps - quarter) / quarter
            np.fill_diagonal(weights, 0.0)
            # sum_j w_ij (p_i - p_j) = p_i * sum_j w_ij - (W p)_i
            pivots += (pivots * weights.sum(axis=1, keepdims=True) - weights @ pivots) / self.bits
            self.iterations_ += 1
        self.pivots_ = pivots.astype(np.float32)
        self.radii_ = np.median(np.sqrt(squared_distances(sample, pivots)), axis=0).astype(np.float32)

    def _scores(self, rows):
        # >= 0 inside the sphere; nudged so that the boundary itself counts as inside.
        return self.radii_ ** 2 - squared_distances(rows, self.pivots_) + 1e-6

