"""PseudoLabel hashing (tbhvae.pseudolabel): the loss by hand, the k-means pseudo labels, what its
objective rewards, and that it trains, resumes and exports through the shared trainer."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from families import trains_resumes_and_exports
from tbhvae.config import Config, ConfigError
from tbhvae.hashing_model import create_model
from tbhvae.pseudolabel import PseudoLabelHashing, balance_loss, objective, quantisation_loss
from test_training import synthetic_features

SMALL = dict(model="pseudolabel", bits=8, batch_size=64, log_every=5, checkpoint_every=10, eval_every=10,
             eval_queries=50, steps_per_execution=5, learning_rate=1e-2, pseudolabel_clusters=8)


def separated_clusters(sizes, dim=16, seed=0):
    """Rows float32 [sum(sizes), dim] around far-apart centres, and their cluster int [N]."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, size=(len(sizes), dim))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def test_the_step_loss_is_hand_computed():
    config = Config(model="pseudolabel", bits=2, pseudolabel_clusters=2, pseudolabel_balance_weight=0.5,
                    pseudolabel_quantisation_weight=2.0)
    model = create_model(config, 2, 3)
    model.build_all()
    w, a = np.array([[1.0, -2.0], [0.5, 1.0]]), np.array([-3.0, 0.5])
    v, e = np.array([[2.0, -1.0], [-1.0, 1.5]]), np.array([0.1, -0.2])
    model.hash_layer.kernel.assign(w), model.hash_layer.bias.assign(a)
    model.classifier.kernel.assign(v), model.classifier.bias.assign(e)
    model.centroids.assign([[0.0, 0.0], [4.0, 4.0]])
    x = np.array([[0.5, 0.0], [4.0, 3.5], [3.0, 4.0]])
    labels = np.array([0, 1, 1])  # nearest centroid of each row
    h = 1.0 / (1.0 + np.exp(-(x @ w + a)))
    logits = h @ v + e
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    classification = -log_softmax[np.arange(3), labels].mean()
    p = h.mean(axis=0)
    balance = math.log(2.0) + np.mean(p * np.log(p) + (1 - p) * np.log(1 - p))
    quantisation = np.mean((h - (h > 0.5)) ** 2)
    got = {k: float(t) for k, t in model.step_losses(tf.constant(x, tf.float32), None).items()}
    np.testing.assert_array_equal(model.pseudo_labels(tf.constant(x, tf.float32)).numpy(), labels)
    assert got["classification"] == pytest.approx(classification, rel=1e-5)
    assert got["balance"] == pytest.approx(balance, rel=1e-4)
    assert got["quantisation"] == pytest.approx(quantisation, rel=1e-5)
    assert got["loss"] == pytest.approx(classification + 0.5 * balance + 2.0 * quantisation, rel=1e-5)
    assert got["bit_mean"] == pytest.approx(np.mean(h > 0.5))


def test_adapt_recovers_well_separated_clusters_up_to_permutation():
    features, truth = separated_clusters([120, 40, 80, 20, 60])
    model = create_model(Config(model="pseudolabel", pseudolabel_clusters=5, seed=3), 16, len(features))
    model.build_all()
    model.adapt(features)
    found = model.pseudo_labels(tf.constant(features)).numpy()
    pairs = set(zip(truth.tolist(), found.tolist()))
    assert len(pairs) == 5 and len({f for _, f in pairs}) == 5  # a bijection: one found cluster per true one
    with pytest.raises(ConfigError, match="pseudolabel_clusters"):
        create_model(Config(model="pseudolabel", pseudolabel_clusters=400), 16, 320).adapt(features)


def test_the_balance_term_prefers_balanced_bits_and_quantisation_binary_ones():
    balanced = tf.constant([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    constant = tf.ones([4, 2])
    assert float(balance_loss(balanced)) == pytest.approx(0.0, abs=1e-6)
    assert float(balance_loss(constant)) == pytest.approx(math.log(2.0), abs=1e-5)
    assert float(quantisation_loss(tf.constant([[0.0, 0.2, 0.5, 0.9, 1.0]]))) == pytest.approx(
        (0.0 + 0.04 + 0.25 + 0.01 + 0.0) / 5)


def best_objective(codes, labels, clusters):
    """The objective of fixed codes [N, M] in {0, 1} with the softmax classifier trained to its minimum."""
    keras.utils.set_random_seed(0)
    classifier = keras.layers.Dense(clusters)
    optimizer = keras.optimizers.Adam(0.05)
    h = tf.constant(codes, tf.float32)
    for _ in range(300):
        with tf.GradientTape() as tape:
            loss = objective(h, classifier(h), labels, 1.0, 1.0)["loss"]
        grads = tape.gradient(loss, classifier.trainable_variables)
        optimizer.apply_gradients(zip(grads, classifier.trainable_variables))
    return float(objective(h, classifier(h), labels, 1.0, 1.0)["loss"])


def test_the_objective_prefers_codes_that_keep_the_clusters_over_collapsed_and_random_ones():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    kept = rng.integers(0, 2, size=(4, 16))[labels]  # one code per pseudo class
    collapsed = np.ones((200, 16))
    random = rng.integers(0, 2, size=(200, 16))
    kept_loss = best_objective(kept, labels, 4)
    assert kept_loss < best_objective(random, labels, 4) - 0.3
    assert kept_loss < best_objective(collapsed, labels, 4) - 0.3


def test_pseudolabel_trains_under_two_replicas_resumes_and_exports(tmp_path):
    features = synthetic_features()
    config = Config(name="pl", **SMALL)
    _, trained = trains_resumes_and_exports(config, features, tmp_path, PseudoLabelHashing,
                                            {"classification", "balance", "quantisation"},
                                            min_map=0.3)  # 4 clusters: random codes give ~0.25
    fresh = create_model(config, features.dim, len(features.train_features))
    fresh.adapt(features.train_features)  # the checkpoint holds the centroids adapt computed
    np.testing.assert_allclose(trained.model.centroids.numpy(), fresh.centroids.numpy(), rtol=1e-5, atol=1e-5)


def test_create_model_builds_the_family_and_the_config_checks_its_keys():
    assert isinstance(create_model(Config(model="pseudolabel"), 24, 100), PseudoLabelHashing)
    for key, value in (("pseudolabel_clusters", 1), ("pseudolabel_balance_weight", -1.0),
                       ("pseudolabel_quantisation_weight", -0.5)):
        with pytest.raises(ConfigError, match=key):
            Config(model="pseudolabel", **{key: value}).validate()
