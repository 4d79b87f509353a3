"""Classic unsupervised hashing baselines on fixed feature vectors (numpy only).

Every method is a class ``Method(bits, seed=0, **options)`` with
``fit(train_features float [N, D]) -> self`` and
``encode(features float [n, D]) -> uint8 [n, bits]`` of 0/1 codes; `BASELINES`
maps a short name to each class:

- ``lsh``: signs of random Gaussian projections of centred features.
- ``pcah``: signs of the top-`bits` principal components.
- ``itq``: PCA followed by an orthogonal rotation that minimises the
  quantisation loss ||B - V R||^2 (Gong & Lazebnik, CVPR 2011).
- ``sh``: spectral hashing with the analytical 1-D eigenfunctions of a box
  (uniform) distribution along PCA directions (Weiss et al., NIPS 2008).
- ``spherh``: spherical hashing, one bit per hypersphere, pivots and radii
  optimised for balanced, pairwise independent bits (Heo et al., CVPR 2012).
  Codes are compared with plain Hamming distance.
- ``agh``: one-layer anchor graph hashing (Liu et al., ICML 2011).
- ``kmh``, ``dgh``, ``dgh_r``: k-means hashing (`tbhvae.kmh`) and discrete
  graph hashing, DGH-I and DGH-R (`tbhvae.dgh`), registered at the end of `BASELINES`.

SpherH and AGH do their iterative parts on a random training subsample, as the
papers do; see their docstrings.

Command line (database = train features, queries = test features)::

    python -m tbhvae.baselines --features F.npz --bits 16,32,64 --json OUT.json [--methods lsh,itq] [--queries q1k]

Every entry of OUT.json also records the feature file, the query set and the
package version that produced it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from tbhvae.cli import run_main
from tbhvae.data.features import DataError, FeatureSet, load_features, per_class_queries
from tbhvae.evaluation import code_statistics, evaluate_codes

ENCODE_CHUNK_ROWS = 16384
COVARIANCE_CHUNK_ROWS = 8192
PIVOT_START_ROWS = 5


def _check_bits_count(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits <= 0:
        raise ValueError(f"bits must be a positive integer, got {bits!r}")
    return int(bits)


def _as_features(features, name: str, dim: int | None = None) -> np.ndarray:
    """Returns `features` as float32 [n, D], raising ValueError naming `name` if unusable."""
    array = np.asarray(features)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [n, D], got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name}: expected a numeric array, got dtype {array.dtype}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name}: has {array.shape[1]} dimensions but the model was fit on {dim}")
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return array


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


def _squared_distances(rows: np.ndarray, centres: np.ndarray) -> np.ndarray:
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

    def fit(self, train_features) -> "HashingBaseline":
        train = _as_features(train_features, "train_features")
        if train.shape[0] < 2:
            raise ValueError(f"train_features: need at least 2 rows to fit, got {train.shape[0]}")
        limit = self._max_bits(*train.shape)
        if limit is not None and self.bits > limit:
            raise ValueError(
                f"{type(self).__name__} supports at most {limit} bits on {train.shape[0]} x "
                f"{train.shape[1]} features, got bits={self.bits}")
        self._fit(train)
        self._dim = train.shape[1]
        return self

    def encode(self, features) -> np.ndarray:
        """0/1 codes uint8 [n, bits] of `features` [n, D]."""
        if self._dim is None:
            raise RuntimeError(f"{type(self).__name__}.encode called before fit; call fit(train_features) first")
        rows = _as_features(features, "features", dim=self._dim)
        return np.concatenate([
            (self._scores(rows[start:start + ENCODE_CHUNK_ROWS]) > 0).astype(np.uint8)
            for start in range(0, rows.shape[0], ENCODE_CHUNK_ROWS)])

    def _fit(self, train: np.ndarray) -> None:
        raise NotImplementedError

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


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
    """Iterative quantisation: PCA to `bits` dims, then a learned rotation.

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


class SH(HashingBaseline):
    """Spectral hashing with a box (uniform) data model along PCA directions.

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


class SpherH(HashingBaseline):
    """Spherical hashing: bit k = [||x - p_k|| <= t_k].

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
            distances = np.sqrt(_squared_distances(sample, pivots))
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
        self.radii_ = np.median(np.sqrt(_squared_distances(sample, pivots)), axis=0).astype(np.float32)

    def _scores(self, rows):
        # >= 0 inside the sphere; nudged so that the boundary itself counts as inside.
        return self.radii_ ** 2 - _squared_distances(rows, self.pivots_) + 1e-6


class AGH(HashingBaseline):
    """One-layer anchor graph hashing.

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
            for l in range(self.nearest_anchors):
                np.add.at(gram, (nearest[:, k], nearest[:, l]), affinity[:, k] * affinity[:, l])
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
            assignment = np.argmin(_squared_distances(sample, centres), axis=1)
            counts = np.bincount(assignment, minlength=self.anchors)
            sums = np.zeros_like(centres)
            np.add.at(sums, assignment, sample)
            empty = counts == 0
            centres[~empty] = sums[~empty] / counts[~empty, None]
            centres[empty] = sample[rng.choice(sample.shape[0], size=int(empty.sum()), replace=False)]
        return centres

    def _nearest_anchors(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices int [n, s] and squared distances [n, s] of each row's s nearest anchors, nearest first."""
        squared = _squared_distances(rows, self.anchors_)
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


BASELINES = {
    "lsh": LSH,
    "pcah": PCAH,
    "itq": ITQ,
    "sh": SH,
    "spherh": SpherH,
    "agh": AGH,
}


class _Deferred:
    """A `BASELINES` entry whose class lives in a module that imports this one (tbhvae.kmh,
    tbhvae.dgh): imported on first call, so no import order (nor `python -m tbhvae.baselines`,
    which runs this file as __main__) meets a half-initialised module."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def resolve(self) -> type:
        import importlib
        return getattr(importlib.import_module(self.module), self.name)

    def __call__(self, *args, **options):
        return self.resolve()(*args, **options)


# DGH-I and DGH-R are one class with an `init` option; DGHR only changes its default, so each
# name maps to a class that BASELINES[name](bits, seed=...) builds with the paper's settings.
BASELINES.update(kmh=_Deferred("tbhvae.kmh", "KMH"), dgh=_Deferred("tbhvae.dgh", "DGH"),
                 dgh_r=_Deferred("tbhvae.dgh", "DGHR"))

QUERY_SETS = ("q10k", "q1k")
QUERIES_PER_CLASS = 100


def select_queries(labels: np.ndarray, queries: str) -> np.ndarray:
    """Test-row indices of a query set: "q10k" = all rows, "q1k" = first 100 of each class."""
    if queries == "q10k":
        return np.arange(labels.shape[0])
    if queries == "q1k":
        return per_class_queries(labels, QUERIES_PER_CLASS)
    raise ValueError(f"queries must be one of {', '.join(QUERY_SETS)}, got {queries!r}")


def run_baselines(feature_set: FeatureSet, bits_list, methods, seed: int = 0,
                  queries: str = "q10k", progress=None) -> dict:
    """Fits every method at every code length on the train split and evaluates retrieval.

    Database = train features, queries = the `queries` subset of the test
    features. Returns {method: {str(bits): {"map@1000" (tie-aware), "map",
    "precision@r2", "map@1000_index_ties" (the older convention),
    "bit_balance", "min_bit_balance", "distinct_codes", "fit_seconds"}}}; calls `progress(method, bits, metrics)` after each fit.
    """
    unknown = [m for m in methods if m not in BASELINES]
    if unknown or not methods:
        raise ValueError(f"methods: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {','.join(BASELINES)}")
    if not bits_list:
        raise ValueError("bits_list: give at least one code length")
    bits_list = [_check_bits_count(bits) for bits in bits_list]
    query_rows = select_queries(feature_set.test_labels, queries)
    query_features = feature_set.test_features[query_rows]
    query_labels = feature_set.test_labels[query_rows]
    results = {}
    for method in methods:
        results[method] = {}
        for bits in bits_list:
            model = BASELINES[method](bits, seed=seed)
            started = time.perf_counter()
            model.fit(feature_set.train_features)
            fit_seconds = time.perf_counter() - started
            db_codes = model.encode(feature_set.train_features)
            metrics = evaluate_codes(model.encode(query_features), db_codes, query_labels,
                                     feature_set.train_labels, index_ties=True)
            metrics.update(code_statistics(db_codes), fit_seconds=fit_seconds)
            results[method][str(bits)] = metrics
            if progress is not None:
                progress(method, bits, metrics)
    return results


def markdown_table(results: dict) -> str:
    """Method x bits table of tie-aware mAP@1000, the index-ties figure in brackets, and the fit time."""
    bits_list = sorted({int(b) for per_bits in results.values() for b in per_bits})
    lines = ["| method | " + " | ".join(f"{b} bits mAP@1000 [index ties] (fit s)" for b in bits_list) + " |",
             "| --- |" + " --- |" * len(bits_list)]
    for method, per_bits in results.items():
        cells = [f"{per_bits[str(b)]['map@1000']:.3f} [{per_bits[str(b)]['map@1000_index_ties']:.3f}] "
                 f"({per_bits[str(b)]['fit_seconds']:.1f})"
                 if str(b) in per_bits else "" for b in bits_list]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_bits(values) -> list[int]:
    try:
        bits_list = [int(v) for v in values]
    except ValueError:
        bits_list = []
    if not bits_list or min(bits_list) <= 0:
        raise app.UsageError(f"--bits: expected comma-separated positive integers, got {','.join(values)!r}")
    return bits_list


FLAGS = flags.FLAGS


def _print_progress(method: str, bits: int, metrics: dict) -> None:
    print(f"{method} {bits} bits: mAP@1000 {metrics['map@1000']:.4f}, mAP {metrics['map']:.4f}, "
          f"P@r2 {metrics['precision@r2']:.4f}, fit {metrics['fit_seconds']:.1f} s",
          file=sys.stderr, flush=True)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}; all options are --flags")
    bits_list = _parse_bits(FLAGS.bits)
    out = Path(FLAGS.json)
    try:  # before the work: an unwritable --json must not cost an hour of fitting
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_name(out.name + ".probe").touch()
        out.with_name(out.name + ".probe").unlink()
    except OSError as err:
        raise SystemExit(f"tbhvae-baselines: --json {out}: cannot write there ({err.strerror or err})") from None
    try:
        feature_set = load_features(FLAGS.features)
        results = run_baselines(feature_set, bits_list, FLAGS.methods, seed=FLAGS.seed,
                                queries=FLAGS.queries, progress=_print_progress)
    except (DataError, ValueError) as err:
        raise SystemExit(f"tbhvae-baselines: {err}") from None
    print(markdown_table(results))
    from tbhvae import __version__
    provenance = {"features": str(Path(FLAGS.features).resolve()), "queries": FLAGS.queries,
                  "tbhvae_version": __version__}
    for per_bits in results.values():
        for metrics in per_bits.values():
            metrics.update(provenance)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def _define_flags() -> list:
    """Registers the CLI flags (here rather than at import, so importing the module adds no flags)."""
    holders = [
        flags.DEFINE_string("features", None,
                            "Feature .npz (train_features, train_labels, test_features, test_labels)."),
        flags.DEFINE_list("bits", ["16", "32", "64"], "Comma-separated code lengths."),
        flags.DEFINE_string("json", None, "Output JSON path: "
                            "{method: {bits: {map@1000 (tie-aware), map, precision@r2, "
                            "map@1000_index_ties, bit_balance, distinct_codes, fit_seconds}}}."),
        flags.DEFINE_list("methods", list(BASELINES), f"Comma-separated subset of {','.join(BASELINES)}."),
        flags.DEFINE_integer("seed", 0, "Random seed of every method."),
        flags.DEFINE_enum("queries", "q10k", list(QUERY_SETS),
                          "q10k: all test rows as queries; q1k: the first 100 test rows of each class."),
    ]
    flags.mark_flags_as_required(["features", "json"])
    return holders


def run() -> None:
    """Console-script entry point (`tbhvae-baselines`)."""
    _define_flags()
    run_main(main, __name__)


if __name__ == "__main__":
    run()
