"""Tests for tbhvae.baselines.kmh (k-means hashing) and tbhvae.baselines.dgh (discrete graph hashing)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tbhvae.baselines import BASELINES
from tbhvae.baselines.dgh import DGH, DGHR, _balanced_orthogonal
from tbhvae.baselines.kmh import KMH, _Subspace
from tbhvae.data.features import FeatureSet, save_features
from tbhvae.evaluation import mean_average_precision


def clustered_features(num_rows: int, dim: int, classes: int, seed: int = 0, spread: float = 3.0):
    """Gaussian clusters: (features float32 [num_rows, dim], labels int64 [num_rows])."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num_rows) % classes
    features = rng.normal(scale=spread, size=(classes, dim))[labels] + rng.normal(size=(num_rows, dim))
    return features.astype(np.float32), labels.astype(np.int64)


def torus(num_rows: int, seed: int = 0) -> np.ndarray:
    """Points on a flat torus in R^4 (two circles) with a little noise: a manifold with balanced codes."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0, 2 * np.pi, (2, num_rows))
    points = np.stack([np.cos(a), np.sin(a), np.cos(b), np.sin(b)], axis=1)
    return (points + 0.05 * rng.standard_normal(points.shape)).astype(np.float32)


def random_map(queries: int, database: int, bits: int, query_labels, db_labels) -> float:
    rng = np.random.default_rng(0)
    return mean_average_precision(rng.integers(0, 2, (queries, bits), dtype=np.uint8),
                                  rng.integers(0, 2, (database, bits), dtype=np.uint8),
                                  query_labels, db_labels, top_k=None)


@pytest.fixture(scope="module")
def clusters():
    return clustered_features(300, 16, classes=6, spread=1.5)


# ---------------------------------------------------------------------------------------- KMH
def test_kmh_objective_decreases_over_its_iterations(clusters):
    features, _ = clusters
    model = KMH(8, iterations=15).fit(features)
    for history in model.history_:
        steps = [step for step, _, _ in history]
        assert steps == ["assign"] + ["update", "assign"] * 15
        quantisation = np.array([q for _, q, _ in history])
        total = quantisation + 10.0 * np.array([a for _, _, a in history])
        for t in range(1, len(history)):
            if steps[t] == "update":  # codewords (and indices) move at fixed cells: E cannot rise
                assert total[t] <= total[t - 1] * (1 + 1e-12), (t, total[t - 1], total[t])
            else:  # samples move to their nearest codeword: E_quan cannot rise
                assert quantisation[t] <= quantisation[t - 1] * (1 + 1e-12), (t, quantisation[t - 1:t + 1])
        assert total[-1] < 0.9 * total[0]
        assert quantisation[-1] < 0.9 * quantisation[0]


def test_kmh_affinity_term_keeps_quantisation_and_hamming_distances_consistent(clusters):
    features, _ = clusters
    errors = {}
    for weight in (0.0, 10.0):
        model = KMH(4, iterations=15, affinity_weight=weight, index_search=False).fit(features)
        errors[weight] = model.objective_history()[-1]
    # lambda = 0 is plain k-means from the cube: its cells drift from their indices' geometry
    assert errors[10.0][1] < 0.25 * errors[0.0][1]
    assert errors[0.0][0] <= errors[10.0][0]  # ... and quantises at least as well


def test_kmh_index_search_repairs_scrambled_indices():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((500, 6)) * np.array([3.0, 2.5, 2.0, 1.5, 0.5, 0.5])
    subspace = _Subspace(data, 4, affinity_weight=10.0)
    subspace.assign()
    assert subspace.affinity_error() < 1e-12  # the cube initialisation fits its indices exactly
    subspace.index_of = np.random.default_rng(0).permutation(16)
    scrambled = subspace.affinity_error()
    subspace._search_indices()
    assert subspace.swaps > 0
    assert subspace.affinity_error() < 1e-12 < scrambled
    assert sorted(subspace.index_of) == list(range(16))


def test_kmh_codes_are_the_nearest_codewords_indices_and_beat_random_codes(clusters):
    features, labels = clusters
    model = KMH(8, iterations=10).fit(features)
    codes = model.encode(features)
    centred = features - model.mean_
    for m, (projection, codewords, table) in enumerate(
            zip(model.projections_, model.codewords_, model.codeword_bits_)):
        distances = ((centred @ projection)[:, None, :] - codewords[None]) ** 2
        np.testing.assert_array_equal(codes[:, 4 * m:4 * m + 4], table[distances.sum(axis=2).argmin(axis=1)])
    method = mean_average_precision(codes, codes, labels, labels, top_k=None)
    assert method > 2.0 * random_map(len(codes), len(codes), 8, labels, labels), method


def test_kmh_splits_all_dimensions_and_takes_a_shorter_last_subspace(clusters):
    features, _ = clusters
    model = KMH(10, iterations=2).fit(features)  # b = 4: subspaces of 4, 4 and 2 bits
    assert [t.shape[1] for t in model.codeword_bits_] == [4, 4, 2]
    assert [len(c) for c in model.codewords_] == [16, 16, 4]
    stacked = np.concatenate(model.projections_, axis=1)
    assert stacked.shape == (16, 16)
    np.testing.assert_allclose(stacked.T @ stacked, np.eye(16), atol=1e-5)  # every direction once
    assert model.encode(features).shape == (300, 10)


def test_kmh_is_deterministic(clusters):
    features, _ = clusters
    first = KMH(8, seed=3, iterations=5).fit(features).encode(features)
    np.testing.assert_array_equal(first, KMH(8, seed=3, iterations=5).fit(features).encode(features))


def test_kmh_rejects_bad_inputs(clusters):
    features, _ = clusters
    with pytest.raises(ValueError, match="at most 16 bits"):
        KMH(17).fit(features)
    with pytest.raises(ValueError, match=r"bits_per_subspace must be an integer in \[1, 8\]"):
        KMH(8, bits_per_subspace=9)
    with pytest.raises(ValueError, match=r"bits_per_subspace must be an integer in \[1, 8\]"):
        KMH(8, bits_per_subspace=0)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        KMH(8, iterations=0)
    with pytest.raises(ValueError, match="affinity_weight"):
        KMH(8, affinity_weight=-1.0)


# ---------------------------------------------------------------------------------------- DGH
def test_y_subproblem_is_the_exact_maximiser_on_omega():
    rng = np.random.default_rng(0)
    n, r = 300, 6
    codes = np.sign(rng.standard_normal((n, r)))
    codes[:, 1] = codes[:, 0]  # rank-deficient J B: the random completion is needed
    codes[:, 2] = 1.0
    y = _balanced_orthogonal(codes, rng)
    np.testing.assert_allclose(y.sum(axis=0), 0.0, atol=1e-8)
    np.testing.assert_allclose(y.T @ y, n * np.eye(r), atol=1e-8)
    bound = np.sqrt(n) * np.linalg.svd(codes - codes.mean(axis=0), compute_uv=False).sum()
    np.testing.assert_allclose(np.sum(codes * y), bound, rtol=1e-10)  # von Neumann's bound, attained
    for _ in range(50):  # and no other element of Omega does better
        other = rng.standard_normal((n, r))
        other -= other.mean(axis=0)
        other, _ = np.linalg.qr(other)
        assert np.sum(codes * np.sqrt(n) * other) <= bound + 1e-8


@pytest.mark.parametrize("cls", [DGH, DGHR])
def test_dgh_objective_never_decreases(cls):
    features = torus(400)
    model = cls(8, anchors=50, rho=1.0).fit(features)
    objective = np.array(model.objective_history_)
    assert len(objective) >= 2
    np.testing.assert_allclose(objective[:, 0] + objective[:, 1], objective[:, 2])
    assert np.all(np.diff(objective[:, 2]) >= -1e-9 * abs(objective[0, 2]))
    assert objective[-1, 2] > objective[0, 2]
    if cls is DGHR:  # the rotation's lower bound rises from R = I
        bound = np.array(model.rotation_history_)
        assert np.all(np.diff(bound) >= -1e-9 * bound[0]) and bound[-1] > bound[0]


def code_health(codes01: np.ndarray) -> tuple[float, float]:
    """(||B^T 1|| / n, ||B^T B / n - I||_F) of 0/1 codes read as -1/+1."""
    codes = codes01.astype(np.float64) * 2.0 - 1.0
    n, r = codes.shape
    return np.linalg.norm(codes.sum(axis=0)) / n, np.linalg.norm(codes.T @ codes / n - np.eye(r))


@pytest.mark.parametrize("cls", [DGH, DGHR])
def test_dgh_codes_are_balanced_and_decorrelated_at_convergence(cls):
    features = torus(400)
    unconstrained = code_health(cls(8, anchors=50, rho=0.0).fit(features).codes_)
    model = cls(8, anchors=50).fit(features)  # default rho
    balance, correlation = code_health(model.codes_)
    # rms bit mean under 0.15; rms off-diagonal entry of B^T B / n under 0.16 (1.2 / sqrt(56))
    assert balance < 0.15 * np.sqrt(8) and correlation < 1.2, (balance, correlation)
    # the penalty is what does it: without it (rho = 0) the codes are further from Omega
    assert balance < unconstrained[0] and correlation < unconstrained[1], (balance, correlation, unconstrained)


def test_dgh_out_of_sample_codes_are_the_affinity_weighted_vote():
    features = torus(460)
    train, test = features[:400], features[400:]
    model = DGH(8, anchors=50).fit(train)
    agh = model.anchor_graph_

    def dense_z(rows):
        nearest, squared = agh._nearest_anchors(rows)
        z = np.zeros((len(rows), 50))
        np.put_along_axis(z, nearest, agh._affinity(nearest, squared), axis=1)
        return z

    z_train = dense_z(train)
    affinity = dense_z(test) @ np.diag(1.0 / z_train.sum(axis=0)) @ z_train.T  # A(x, x_i)
    signs = model.codes_ * 2.0 - 1.0
    # b(x) = argmin_b sum_i A(x, x_i) ||b - b_i||^2 = sgn(sum_i A(x, x_i) b_i)
    np.testing.assert_array_equal(model.encode(test), (affinity @ signs > 0).astype(np.uint8))
    assert model.in_sample_agreement_ > 0.9


def test_dgh_is_deterministic_for_a_seed_and_its_initialisations_differ():
    features = torus(400)
    first = DGH(8, seed=2, anchors=50).fit(features).encode(features)
    np.testing.assert_array_equal(first, DGH(8, seed=2, anchors=50).fit(features).encode(features))
    rotated = DGHR(8, seed=2, anchors=50).fit(features)
    np.testing.assert_array_equal(rotated.encode(features), DGHR(8, seed=2, anchors=50).fit(features).encode(features))
    assert rotated.init == "rotation" and not np.array_equal(first, rotated.encode(features))


def test_dgh_beats_random_codes(clusters):
    features, labels = clusters
    for cls in (DGH, DGHR):
        codes = cls(8, anchors=60).fit(features).encode(features)
        method = mean_average_precision(codes, codes, labels, labels, top_k=None)
        assert method > 2.0 * random_map(len(codes), len(codes), 8, labels, labels), (cls, method)


def test_dgh_rejects_bad_inputs(clusters):
    features, _ = clusters
    with pytest.raises(ValueError, match="at most 49 bits"):
        DGH(50, anchors=50).fit(features)
    with pytest.raises(ValueError, match="needs at least that many training rows"):
        DGH(8, anchors=301).fit(features)
    with pytest.raises(ValueError, match="init must be one of identity, rotation"):
        DGH(8, init="random")
    with pytest.raises(ValueError, match="rho must be"):
        DGH(8, rho=-1.0)
    with pytest.raises(ValueError, match="b_iterations must be >= 1"):
        DGH(8, b_iterations=0)
    with pytest.raises(ValueError, match="nearest_anchors must be in"):
        DGH(8, anchors=10, nearest_anchors=11)


# ---------------------------------------------------------------------------------- registry
def test_registered_names_build_the_classes():
    assert type(BASELINES["kmh"](8)) is KMH
    assert type(BASELINES["dgh"](8, seed=1)) is DGH and BASELINES["dgh"](8).init == "identity"
    assert type(BASELINES["dgh_r"](8)) is DGHR and BASELINES["dgh_r"](8).init == "rotation"


@pytest.mark.parametrize("module", ["tbhvae.baselines.kmh", "tbhvae.baselines.dgh", "tbhvae.baselines"])
def test_modules_import_first_without_a_cycle(module):
    code = f"import {module}; from tbhvae.baselines import BASELINES; print(type(BASELINES['dgh_r'](4)).__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "DGHR"


def test_cli_runs_kmh_and_dgh(tmp_path):
    features, labels = clustered_features(460, 16, classes=4, seed=1)
    path = tmp_path / "tiny.npz"
    save_features(path, FeatureSet(features[:400], labels[:400], features[400:], labels[400:]))
    out = tmp_path / "kmh_dgh.json"
    result = subprocess.run([sys.executable, "-m", "tbhvae.cli.baselines", "--features", str(path), "--bits", "8",
                             "--methods", "kmh,dgh,dgh_r", "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert list(results) == ["kmh", "dgh", "dgh_r"]
    for per_bits in results.values():
        assert {"map@1000", "map", "precision@r2", "map@1000_index_ties", "bit_balance", "min_bit_balance",
                "distinct_codes", "fit_seconds"} <= set(per_bits["8"])
        assert per_bits["8"]["map@1000"] > 0.25
