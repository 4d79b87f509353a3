"""DistillHash (tbhvae.distillhash): the likelihood of the kept pairs, which pairs the distillation keeps,
SSDH's threshold from `adapt`, what the objective rewards, and that it trains, resumes and exports through
the shared trainer."""
import numpy as np
import pytest
import tensorflow as tf
from scipy.linalg import hadamard
from scipy.stats import norm

from families import trains_resumes_and_exports
from tbhvae import layers as tbh_layers
from tbhvae.config import Config, ConfigError
from tbhvae.data import FeatureSet
from tbhvae.distillhash import (
    DistillHash,
    distill_pairs,
    neighbour_pair_reduce,
    pair_likelihood_loss,
    ssdh_similar_distance,
)
from tbhvae.hashing_model import create_model
from test_training import two_replicas

SMALL = dict(model="distillhash", bits=8, batch_size=64, log_every=5, checkpoint_every=10, eval_every=10,
             eval_queries=50, steps_per_execution=5, learning_rate=1e-2, distillhash_neighbours=3)


def clustered(clusters=10, per_cluster=40, dim=64, noise=0.15, seed=0):
    """Non-negative rows around orthogonal centres e_c: float32 [clusters * per_cluster, dim], labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(clusters), per_cluster)
    rows = np.eye(clusters, dim)[labels] + noise * np.abs(rng.normal(size=(len(labels), dim)))
    return rows.astype(np.float32), labels


def test_the_likelihood_loss_is_hand_computed_over_the_kept_pairs():
    u = np.array([[1.0, 0.5], [-0.5, 1.0], [1.0, -1.0]])
    labels = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], np.float64)
    kept = np.array([[0, 1, 1], [1, 0, 0], [1, 0, 0]], np.float64)  # (0, 1) similar, (0, 2) dissimilar
    theta01, theta02 = (1.0 * -0.5 + 0.5 * 1.0) / 2, (1.0 * 1.0 + 0.5 * -1.0) / 2  # 0 and 0.25
    expected = 2 * (np.log1p(np.exp(theta01)) - theta01) + 2 * np.log1p(np.exp(theta02))
    got = pair_likelihood_loss(tf.constant(u, tf.float32), tf.constant(labels, tf.float32),
                               tf.constant(kept, tf.float32))
    assert float(got) == pytest.approx(expected / (3 * 2), rel=1e-6)


def test_the_distillation_drops_the_pairs_whose_neighbourhood_disagrees():
    # clusters {0, 1, 2} and {3, 4, 5}; the pair (2, 3) crosses them but its cosine 0.8 is above the
    # threshold 0.5, so its initial label is similar. With k = 2: N(0) = {0, 1}, N(1) = {1, 0}, N(2) = {2, 0},
    # N(3) = {3, 4}, N(4) = {4, 3}, N(5) = {5, 3}. The noisy posterior over N(i) x N(j) is 1 within a
    # cluster, 1/4 for (2, j) with j in {3, 4, 5} (only (2, 3) of the 4 neighbour pairs is similar) and 0
    # for the other crossing pairs. Within a cluster every neighbour pair has posterior 1: kept similar.
    # (2, j): 1 - 1/4 < (1 + min(1 - posterior) = 3/4) / 2: dropped. Other crossing pairs: posterior 0 over
    # their neighbourhood, 1 >= (1 + 1) / 2: kept dissimilar.
    cosine = np.full((6, 6), 0.1)
    for (i, j), value in {(0, 1): 0.95, (0, 2): 0.9, (1, 2): 0.85, (3, 4): 0.95, (3, 5): 0.9, (4, 5): 0.85,
                          (2, 3): 0.8}.items():
        cosine[i, j] = cosine[j, i] = value
    np.fill_diagonal(cosine, 1.0)
    labels, kept = distill_pairs(tf.constant(cosine, tf.float32), 0.5, neighbours=2)
    same = np.kron(np.eye(2), np.ones((3, 3))).astype(bool)
    expected_kept = ~np.eye(6, dtype=bool)
    expected_kept[2, 3:] = expected_kept[3:, 2] = False
    np.testing.assert_array_equal(kept.numpy().astype(bool), expected_kept)
    np.testing.assert_array_equal(labels.numpy().astype(bool), same)


def test_the_neighbour_pair_reduction_equals_the_loop_over_every_neighbour_pair():
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(7, 7)).astype(np.float32)
    neighbours = np.stack([rng.permutation(7)[:3] for _ in range(7)]).astype(np.int32)
    for reduce, numpy_reduce in ((tf.reduce_min, np.min), (tf.reduce_mean, np.mean)):
        expected = np.array([[numpy_reduce(matrix[np.ix_(neighbours[i], neighbours[j])]) for j in range(7)]
                             for i in range(7)])
        got = neighbour_pair_reduce(tf.constant(matrix), tf.constant(neighbours), reduce).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_adapt_sets_ssdh_threshold_from_the_distance_distribution_at_any_feature_scale():
    features, labels = clustered()
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    distances = (1.0 - unit @ unit.T)[~np.eye(len(unit), dtype=bool)]
    # SSDH: the mode m of the distances, a Gaussian fitted to the left half mirrored about m, m - 2 sigma
    counts, edges = np.histogram(distances, bins=np.arange(0.0, 2.01, 0.01))
    mode = edges[np.argmax(counts)]
    left = distances[distances <= mode]
    _, sigma_left = norm.fit(np.concatenate([left, 2 * mode - left]))
    assert ssdh_similar_distance(distances, 2.0) == pytest.approx(mode - 2.0 * sigma_left, rel=1e-9)
    assert ssdh_similar_distance(distances, 0.0) == pytest.approx(mode)
    for scale in (1.0, 50.0):  # adapt samples pairs: the mode may move by a bin of 0.01
        model = DistillHash(Config(model="distillhash", distillhash_alpha=2.0), 64, len(features))
        model.adapt(scale * features)
        assert float(model.similar_cosine) == pytest.approx(1.0 - (mode - 2.0 * sigma_left), abs=0.03)
    # the structure is known: the mode is the crossing pairs' (90% of pairs), and the similar tail holds
    # pairs within a cluster only, most of them
    same = (labels[:, None] == labels[None])[~np.eye(len(labels), dtype=bool)]
    assert np.abs(distances[~same] - mode).mean() < np.abs(distances[same] - mode).mean() / 4
    similar = 1.0 - distances >= float(model.similar_cosine)
    assert same[similar].mean() > 0.99 and similar[same].mean() > 0.5


def test_the_objective_prefers_codes_that_keep_the_clusters_over_collapsed_and_random_ones():
    features, labels = clustered(per_cluster=12)
    model = DistillHash(Config(model="distillhash"), 64, len(features))
    model.adapt(features)
    pair_labels, kept = distill_pairs(tbh_layers.pairwise_cosine(tf.constant(features)), model.similar_cosine, 5)
    assert float(tf.reduce_sum(kept * pair_labels)) > 0 and float(tf.reduce_sum(kept * (1 - pair_labels))) > 0
    rng = np.random.default_rng(1)
    codes = {"kept": hadamard(16)[:10][labels],  # one code per cluster, orthogonal across clusters
             "collapsed": np.ones((len(labels), 16)),
             "random": rng.choice([-1.0, 1.0], size=(len(labels), 16))}
    loss = {name: float(pair_likelihood_loss(tf.constant(u, tf.float32), pair_labels, kept))
            for name, u in codes.items()}
    assert loss["kept"] < loss["random"] and loss["kept"] < loss["collapsed"]


def test_the_threshold_is_identical_on_every_replica():
    strategy = two_replicas()
    features, _ = clustered()
    with strategy.scope():
        model = create_model(Config(model="distillhash"), 64, len(features))
    model.adapt(features)
    values = [float(v.numpy()) for v in strategy.experimental_local_results(model.similar_cosine.value)]
    assert len(values) == 2 and values[0] == values[1] != 1.0


def test_distillhash_trains_under_two_replicas_resumes_and_exports(tmp_path):
    # 10 clusters: with 4, a quarter of the pairs are similar and SSDH's similar tail is empty
    (train_rows, train_labels), (test_rows, test_labels) = clustered(per_cluster=50), clustered(per_cluster=6, seed=1)
    features = FeatureSet(train_rows, train_labels, test_rows, test_labels)
    config = Config(name="dh", **SMALL)
    metrics, trained = trains_resumes_and_exports(config, features, tmp_path, DistillHash,
                                                  {"kept_similar", "kept_dissimilar"},
                                                  min_map=0.5)  # 10 clusters: random codes give ~0.1
    assert metrics["final_train_terms"]["kept_similar"] > 0
    fresh = DistillHash(config, features.train_features.shape[1], len(features.train_features))
    fresh.adapt(features.train_features)
    assert float(trained.model.similar_cosine) == pytest.approx(float(fresh.similar_cosine))  # checkpointed


def test_create_model_builds_distillhash_and_the_config_refuses_bad_values():
    assert isinstance(create_model(Config(model="distillhash"), 24, 100), DistillHash)
    with pytest.raises(ConfigError, match="distillhash_neighbours"):
        Config(model="distillhash", distillhash_neighbours=0).validate()
    with pytest.raises(ConfigError, match="distillhash_alpha"):
        Config(model="distillhash", distillhash_alpha=-1.0).validate()
