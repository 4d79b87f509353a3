"""Tests for tbhvae.baselines (the classic hashing methods) and their CLI, tbhvae.cli.baselines."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tbhvae
from tbhvae.baselines import AGH, BASELINES, ITQ, PCAH, SH, SpherH, run_baselines
from tbhvae.data.features import FeatureSet, save_features
from tbhvae.evaluation import mean_average_precision
from tbhvae.protocol import select_queries

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_FEATURES = DATA_DIR / "cifar10_effnetlite0.npz"
RANDOM_SEEDED = ("lsh", "itq", "spherh", "agh")


def clustered_features(num_rows: int, dim: int, classes: int, seed: int = 0):
    """Gaussian clusters: (features float32 [num_rows, dim], labels int64 [num_rows])."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num_rows) % classes
    centres = rng.normal(scale=3.0, size=(classes, dim))
    features = centres[labels] + rng.normal(size=(num_rows, dim))
    return features.astype(np.float32), labels.astype(np.int64)


@pytest.fixture(scope="module")
def synthetic():
    return clustered_features(400, 24, classes=4)


@pytest.fixture(scope="module")
def cifar_slice():
    """2,000 train / 200 test rows of the real CIFAR-10 features, class-balanced."""
    if not CIFAR_FEATURES.is_file():
        pytest.skip(f"{CIFAR_FEATURES} not found")
    with np.load(CIFAR_FEATURES) as data:
        return (data["train_features"][::25].astype(np.float32), data["train_labels"][::25],
                data["test_features"][::50].astype(np.float32), data["test_labels"][::50])


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_encode_returns_binary_uint8_of_requested_shape(method, synthetic):
    features, _ = synthetic
    codes = BASELINES[method](8).fit(features).encode(features[:50])
    assert codes.dtype == np.uint8
    assert codes.shape == (50, 8)
    assert set(np.unique(codes)) <= {0, 1}
    assert len(np.unique(codes, axis=0)) > 1


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_same_seed_gives_same_codes(method, synthetic):
    features, _ = synthetic
    first = BASELINES[method](12, seed=3).fit(features).encode(features)
    second = BASELINES[method](12, seed=3).fit(features).encode(features)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("method", RANDOM_SEEDED)
def test_other_seed_gives_other_codes(method, synthetic):
    features, _ = synthetic
    first = BASELINES[method](12, seed=0).fit(features).encode(features)
    second = BASELINES[method](12, seed=1).fit(features).encode(features)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_beats_random_codes_on_real_cifar_slice(method, cifar_slice):
    train, train_labels, test, test_labels = cifar_slice
    bits = 32
    rng = np.random.default_rng(0)
    random_map = mean_average_precision(
        rng.integers(0, 2, (len(test), bits), dtype=np.uint8),
        rng.integers(0, 2, (len(train), bits), dtype=np.uint8), test_labels, train_labels, top_k=None)
    model = BASELINES[method](bits).fit(train)
    method_map = mean_average_precision(model.encode(test), model.encode(train),
                                        test_labels, train_labels, top_k=None)
    # Random projections are the weakest; every learned method should be far above chance.
    factor = 1.3 if method == "lsh" else 1.8
    assert method_map > factor * random_map, (method, method_map, random_map)


def quantisation_loss(projected: np.ndarray) -> float:
    """Mean ||sign(v) - v||^2 over rows of projected data [N, M]."""
    return float(np.mean(np.sum((np.where(projected >= 0, 1.0, -1.0) - projected) ** 2, axis=1)))


def test_itq_rotation_is_orthogonal_and_lowers_quantisation_loss(synthetic):
    features, _ = synthetic
    itq = ITQ(8).fit(features)
    pcah = PCAH(8).fit(features)
    np.testing.assert_allclose(itq.rotation_ @ itq.rotation_.T, np.eye(8), atol=1e-5)
    pca_projected = (features - pcah.mean_) @ pcah.components_
    itq_projected = (features - itq.mean_) @ itq.components_ @ itq.rotation_
    assert quantisation_loss(itq_projected) < 0.9 * quantisation_loss(pca_projected)
    assert np.all(np.diff(itq.loss_history_) <= 1e-6 * itq.loss_history_[0])
    np.testing.assert_array_equal(itq.encode(features), (itq_projected > 0).astype(np.uint8))


def test_sh_picks_low_frequency_modes_along_the_widest_direction():
    rng = np.random.default_rng(0)
    box = rng.uniform(size=(4000, 2)) * np.array([4.0, 1.0])
    sh = SH(2).fit(box.astype(np.float32))
    np.testing.assert_array_equal(sh.mode_dims_, [0, 0])
    np.testing.assert_allclose(sh.mode_frequencies_, [np.pi / 4, np.pi / 2], rtol=1e-2)
    codes = sh.encode(box.astype(np.float32))
    x = box[:, 0]
    # Mode 1 splits the 4-unit axis in half (which half is 1 depends on the PCA sign),
    # mode 2 is 1 on its outer quarters.
    left, right = x < 1.95, x > 2.05
    assert len(np.unique(codes[left, 0])) == 1 and len(np.unique(codes[right, 0])) == 1
    assert codes[left, 0][0] != codes[right, 0][0]
    inner, outer = (x > 1.05) & (x < 2.95), (x < 0.95) | (x > 3.05)
    assert codes[inner, 1].max() == 0 and codes[outer, 1].min() == 1


def test_spherh_bits_are_balanced_and_pairwise_independent(synthetic):
    features, _ = synthetic
    codes = SpherH(6, training_sample=400).fit(features).encode(features).astype(np.float64)
    np.testing.assert_allclose(codes.mean(axis=0), 0.5, atol=0.01)
    pair_rates = (codes.T @ codes / len(codes))[~np.eye(6, dtype=bool)]
    assert abs(pair_rates.mean() - 0.25) < 0.025 and pair_rates.std() < 0.04


def test_agh_first_bits_follow_the_graph_components(synthetic):
    # Four well-separated clusters make an anchor graph with four components, whose
    # three non-trivial leading eigenvectors are constant on each component.
    features, labels = synthetic
    codes = AGH(4, anchors=40).fit(features).encode(features)[:, :3]
    cluster_codes = [np.unique(codes[labels == c], axis=0) for c in range(4)]
    assert all(len(unique) == 1 for unique in cluster_codes)
    assert len(np.unique(np.concatenate(cluster_codes), axis=0)) == 4


@pytest.mark.parametrize("method", ["pcah", "itq", "sh"])
def test_pca_methods_reject_more_bits_than_dimensions(method, synthetic):
    features, _ = synthetic
    with pytest.raises(ValueError, match="at most 24 bits"):
        BASELINES[method](25).fit(features)


def test_agh_rejects_bits_not_below_anchor_count(synthetic):
    features, _ = synthetic
    with pytest.raises(ValueError, match="at most 9 bits"):
        AGH(10, anchors=10).fit(features)
    with pytest.raises(ValueError, match="needs at least that many training rows"):
        AGH(4, anchors=401).fit(features)


@pytest.mark.parametrize("bits", [0, -3, 2.5, True, "8"])
@pytest.mark.parametrize("method", sorted(BASELINES))
def test_bad_bit_counts_raise(method, bits):
    with pytest.raises(ValueError, match="bits must be a positive integer"):
        BASELINES[method](bits)


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_bad_features_raise_clear_errors(method, synthetic):
    features, _ = synthetic
    model = BASELINES[method](4)
    with pytest.raises(RuntimeError, match="before fit"):
        model.encode(features)
    with pytest.raises(ValueError, match="2-D"):
        model.fit(features[0])
    with pytest.raises(ValueError, match="NaN"):
        model.fit(np.where(np.arange(features.size).reshape(features.shape) == 7, np.nan, features))
    with pytest.raises(ValueError, match="at least 2 rows"):
        model.fit(features[:1])
    model.fit(features)
    with pytest.raises(ValueError, match="fit on 24"):
        model.encode(features[:, :10])


def test_select_queries_takes_first_100_of_each_class():
    labels = np.repeat(np.arange(3), 150)
    rows = select_queries(labels, "q1k")
    assert len(rows) == 300
    np.testing.assert_array_equal(rows[:100], np.arange(100))
    np.testing.assert_array_equal(rows[100:200], np.arange(150, 250))
    np.testing.assert_array_equal(select_queries(labels, "q10k"), np.arange(450))
    with pytest.raises(ValueError, match="q10k, q1k"):
        select_queries(labels, "q5k")


def test_run_baselines_rejects_unknown_methods(synthetic):
    features, labels = synthetic
    feature_set = FeatureSet(features, labels, features[:20], labels[:20])
    with pytest.raises(ValueError, match="unknown nope"):
        run_baselines(feature_set, [8], ["lsh", "nope"])


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    features, labels = clustered_features(460, 16, classes=4, seed=1)
    path = tmp_path_factory.mktemp("features") / "tiny.npz"
    save_features(path, FeatureSet(features[:400], labels[:400], features[400:], labels[400:]))
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tbhvae.cli.baselines", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_json_with_documented_schema(tiny_npz, tmp_path):
    out = tmp_path / "out" / "baselines.json"
    result = run_cli("--features", str(tiny_npz), "--bits", "4,8", "--json", str(out))
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert list(results) == list(BASELINES)
    for method, per_bits in results.items():
        assert list(per_bits) == ["4", "8"]
        for metrics in per_bits.values():
            provenance = {k: metrics.pop(k) for k in ("features", "queries", "tbhvae_version")}
            assert provenance == {"features": str(tiny_npz.resolve()), "queries": "q10k",
                                  "tbhvae_version": tbhvae.__version__}
            assert set(metrics) == {"map@1000", "map", "precision@r2", "map@1000_index_ties", "chance_map@1000",
                                    "bit_balance", "min_bit_balance", "distinct_codes", "fit_seconds"}
            assert all(isinstance(v, (int, float)) for v in metrics.values())
            assert 0.25 < metrics["map@1000"] <= 1.0 and metrics["fit_seconds"] >= 0.0
            assert 0.0 <= metrics["min_bit_balance"] <= metrics["bit_balance"] <= 1.0
        assert f"| {method} |" in result.stdout
    assert result.stderr.count("bits: mAP@1000") == 2 * len(BASELINES)


def test_cli_q1k_and_method_subset(tiny_npz, tmp_path):
    out = tmp_path / "q1k.json"
    result = run_cli("--features", str(tiny_npz), "--bits", "8", "--json", str(out),
                     "--methods", "itq,lsh", "--queries", "q1k", "--seed", "2")
    assert result.returncode == 0, result.stderr
    assert list(json.loads(out.read_text())) == ["itq", "lsh"]


@pytest.mark.parametrize("args, message", [
    (["--bits", "8,x"], "--bits"),
    (["--methods", "lsh,pcahh"], "unknown pcahh"),
    (["--bits", "32"], "at most 16 bits"),
])
def test_cli_bad_flags_fail_with_clear_message(tiny_npz, tmp_path, args, message):
    out = tmp_path / "bad.json"
    result = run_cli("--features", str(tiny_npz), "--json", str(out), *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert not out.exists()


def test_cli_help_is_readable():
    result = run_cli("--help")
    assert "--features F.npz --bits 16,32,64 --json OUT.json" in result.stdout


def test_cli_missing_features_file(tmp_path):
    result = run_cli("--features", str(tmp_path / "absent.npz"), "--json", str(tmp_path / "o.json"))
    assert result.returncode != 0
    assert "absent.npz" in result.stderr and "not found" in result.stderr
