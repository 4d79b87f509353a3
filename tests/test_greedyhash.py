"""GreedyHash (tbhvae.greedyhash): the greedy sign's gradient, what its objective rewards, and that
it trains, resumes and exports through the shared trainer like TBH."""
import numpy as np
import pytest
import tensorflow as tf

from families import trains_resumes_and_exports
from tbhvae import train
from tbhvae.config import CHOICES, Config, ConfigError
from tbhvae.greedyhash import GreedyHash, greedy_sign, quantisation_penalty, similarity_loss
from tbhvae.hashing_model import FAMILIES, create_model
from test_training import synthetic_features

SMALL = dict(model="greedyhash", bits=8, batch_size=64, log_every=5, checkpoint_every=10, eval_every=10,
             eval_queries=50, steps_per_execution=5, learning_rate=1e-3)


def test_the_greedy_sign_is_sign_forward_and_the_identity_backward():
    h = tf.constant([[-2.0, -0.3, 0.4, 3.0]])
    upstream = tf.constant([[0.1, -0.2, 0.3, -0.4]])
    with tf.GradientTape() as tape:
        tape.watch(h)
        b = greedy_sign(h)
        loss = tf.reduce_sum(b * upstream)
    np.testing.assert_array_equal(b.numpy(), [[-1.0, -1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(tape.gradient(loss, h).numpy(), upstream.numpy())


def test_the_similarity_loss_is_hand_computed_over_pairs_i_not_j():
    codes = tf.constant([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    features = tf.constant([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # code cosines: (0,1) 0, (0,2) -1, (1,2) 0; feature cosines: 1, 0, 0
    assert float(similarity_loss(codes, features)) == pytest.approx((1.0 + 1.0 + 0.0) / 3.0)
    assert float(quantisation_penalty(tf.constant([[0.0, 1.0, 3.0]]))) == pytest.approx((1.0 + 0.0 + 8.0) / 3.0)


def test_the_objective_prefers_codes_that_keep_the_neighbourhoods_over_collapsed_and_random_ones():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    signs = rng.choice([-1.0, 1.0], size=(4, 16))
    features = np.eye(4, 16)[labels] + 0.05 * rng.normal(size=(200, 16))
    kept = tf.constant(signs[labels], tf.float32)  # one code per cluster: orthogonal clusters keep apart
    collapsed = tf.ones([200, 16])
    random = tf.constant(rng.choice([-1.0, 1.0], size=(200, 16)), tf.float32)
    x = tf.constant(features, tf.float32)
    kept_loss = float(similarity_loss(kept, x))
    assert kept_loss < float(similarity_loss(random, x))
    assert kept_loss < float(similarity_loss(collapsed, x))


def test_greedyhash_trains_under_two_replicas_resumes_and_exports(tmp_path):
    trains_resumes_and_exports(Config(name="gh", **SMALL), synthetic_features(), tmp_path, GreedyHash,
                               {"similarity", "quantisation"}, min_map=0.3)  # 4 clusters: random codes ~0.25


def test_a_greedyhash_run_directory_refuses_a_twin_bottleneck_config(tmp_path):
    features = synthetic_features()
    train.train(Config(name="gh", steps=10, **SMALL), tmp_path, feature_set=features)
    with pytest.raises(ConfigError, match="model: greedyhash -> twin_bottleneck"):
        train.train(Config(name="gh", steps=10, **{**SMALL, "model": "twin_bottleneck"}), tmp_path,
                    feature_set=features)


def test_create_model_builds_the_family_the_config_names():
    assert isinstance(create_model(Config(model="greedyhash"), 24, 100), GreedyHash)
    assert type(create_model(Config(), 24, 100)).__name__ == "TwinBottleneckHashing"
    assert set(FAMILIES) == set(CHOICES["model"])  # every family the config accepts can be built
    with pytest.raises(ConfigError, match="greedyhash_penalty_weight"):
        Config(model="greedyhash", greedyhash_penalty_weight=-1.0).validate()
