"""SGH (tbhvae.sgh): the doubly stochastic neuron (its distributional-derivative gradient and its
Bernoulli samples), the negative ELBO against a hand computation, what the objective rewards, and that
it trains, resumes and exports through the shared trainer like TBH."""
import numpy as np
import pytest
import tensorflow as tf

from families import trains_resumes_and_exports
from tbhvae import train
from tbhvae.config import Config, ConfigError
from tbhvae.hashing_model import create_model
from tbhvae.sgh import StochasticGenerativeHashing, description_length, doubly_stochastic_neuron
from test_training import synthetic_features

SMALL = dict(model="sgh", bits=8, batch_size=64, log_every=5, checkpoint_every=10, eval_every=10,
             eval_queries=50, steps_per_execution=5, learning_rate=1e-2)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_the_neuron_samples_with_the_seed_and_its_gradient_is_the_distributional_derivative():
    logits = tf.constant([[0.3, -1.2, 2.0], [-0.1, 0.0, 0.7]])
    seed = tf.constant([4, 3])
    upstream_codes = tf.constant([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]])
    upstream_probs = tf.constant([[0.2, 0.4, -0.3], [1.0, 0.0, 2.0]])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        codes, probs = doubly_stochastic_neuron(logits, seed)
        loss = tf.reduce_sum(upstream_codes * codes) + tf.reduce_sum(upstream_probs * probs)
    p = sigmoid(logits.numpy())
    xi = tf.random.stateless_uniform([2, 3], seed=seed).numpy()
    np.testing.assert_array_equal(codes.numpy(), (p > xi).astype(np.float32))
    assert (codes.numpy() != (p > 0.5)).any()  # a sample, not the code at the threshold 1/2
    np.testing.assert_allclose(probs.numpy(), p, rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(loss, logits).numpy(),
                               p * (1 - p) * (upstream_codes.numpy() + upstream_probs.numpy()), rtol=1e-6)


def test_the_samples_are_bernoulli_of_the_sigmoid_and_new_with_each_seed():
    z = np.array([-3.0, -1.0, 0.0, 0.5, 2.0], np.float32)
    rows = 40000
    logits = tf.constant(np.tile(z, (rows, 1)))
    codes = doubly_stochastic_neuron(logits, tf.constant([0, 1]))[0].numpy()
    p = sigmoid(z)
    np.testing.assert_array_less(np.abs(codes.mean(axis=0) - p), 5 * np.sqrt(p * (1 - p) / rows))
    np.testing.assert_array_equal(codes, doubly_stochastic_neuron(logits, tf.constant([0, 1]))[0].numpy())
    assert (codes != doubly_stochastic_neuron(logits, tf.constant([0, 2]))[0].numpy()).mean() > 0.2


def test_the_loss_of_a_tiny_batch_is_the_hand_computed_negative_elbo():
    model = StochasticGenerativeHashing(Config(model="sgh", bits=2), input_dim=3, dataset_size=4)
    model.build_all()
    W = np.array([[0.5, -1.0], [0.2, 0.3], [-0.4, 0.8]])
    c, U, b = np.array([0.1, -0.2]), np.array([[1.0, 0.0, -0.5], [0.3, 2.0, 0.1]]), np.array([0.2, 0.1, 0.0])
    log_rho, prior_logits = -0.3, np.array([0.4, -1.1])
    model.encoder.set_weights([W, c])
    model.decoder.set_weights([U, b])
    model.log_rho.assign(log_rho)
    model.prior_logits.assign(prior_logits)
    x = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 2.0], [0.3, 0.3, 0.3], [2.0, 0.0, 1.0]], np.float32)
    seed = tf.constant([3, 5])
    got = {k: float(v) for k, v in model.step_losses(tf.constant(x), seed).items()}

    z = x.astype(np.float64) @ W + c
    p = sigmoid(z)
    h = (p > tf.random.stateless_uniform([4, 2], seed=seed).numpy()).astype(np.float64)
    assert (h != (z > 0)).any()  # a sampled code, not the deterministic one
    theta, rho = sigmoid(prior_logits), np.exp(log_rho)
    squared = ((x - (h @ U + b)) ** 2).sum(axis=1)
    reconstruction = squared / (2 * rho ** 2) + 3 * np.log(rho) + 1.5 * np.log(2 * np.pi)
    prior = -(h * np.log(theta) + (1 - h) * np.log(1 - theta)).sum(axis=1)
    log_posterior = (h * np.log(p) + (1 - h) * np.log(1 - p)).sum(axis=1)
    expected = {"reconstruction": reconstruction.mean(), "prior": prior.mean(),
                "log_posterior": log_posterior.mean(), "loss": (reconstruction + prior + log_posterior).mean(),
                "mse": squared.mean() / 3, "rho": rho, "bit_mean": (z > 0).mean()}
    assert got == pytest.approx(expected, rel=1e-5)


def negative_elbo(features, codes):
    """The description length of deterministic codes 0/1 [N, M] of features [N, D] with the decoder
    U, b fitted by least squares, rho its maximum-likelihood value and theta the bits' frequencies."""
    design = np.hstack([codes, np.ones((len(codes), 1))])
    reconstruction = design @ np.linalg.lstsq(design, features, rcond=None)[0]
    log_rho = 0.5 * np.log(np.mean((features - reconstruction) ** 2))
    theta = np.clip(codes.mean(axis=0), 1e-6, 1 - 1e-6)
    terms = description_length(tf.constant(features, tf.float32), tf.constant(reconstruction, tf.float32),
                               tf.constant(codes, tf.float32), tf.constant(30.0 * (2 * codes - 1), tf.float32),
                               tf.constant(log_rho, tf.float32), tf.constant(np.log(theta / (1 - theta)), tf.float32))
    return float(terms["loss"])


def test_the_objective_prefers_codes_that_keep_the_clusters_and_no_code_to_a_random_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    features = 3.0 * rng.normal(size=(4, 16))[labels] + rng.normal(size=(400, 16))
    kept = np.array([[0, 0, 1, 1], [0, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 0]], np.float64)[labels]
    collapsed = np.zeros((400, 4))
    random = rng.integers(0, 2, (400, 4)).astype(np.float64)
    kept_loss, collapsed_loss, random_loss = (negative_elbo(features, c) for c in (kept, collapsed, random))
    # kept: D/2 log(variance ratio) ~ 8 log 8 nats of reconstruction saved for at most 4 log 2 of code
    assert kept_loss < collapsed_loss - 10
    assert collapsed_loss < random_loss  # bits that describe nothing cost their code length


def test_sgh_trains_under_two_replicas_resumes_and_exports(tmp_path):
    features = synthetic_features()
    config = Config(name="sgh", **SMALL)
    _, trained = trains_resumes_and_exports(config, features, tmp_path, StochasticGenerativeHashing,
                                            {"reconstruction", "prior", "log_posterior", "rho"},
                                            min_map=0.3)  # 4 clusters: random codes give ~0.25
    fresh = create_model(config, features.dim, len(features.train_features))
    fresh.adapt(features.train_features)
    batch, seed = tf.constant(features.train_features), tf.constant([0, 9])
    assert float(trained.model.step_losses(batch, seed)["loss"]) < float(fresh.step_losses(batch, seed)["loss"]) - 1.0
    assert float(trained.model.log_rho.numpy()) != pytest.approx(float(fresh.log_rho.numpy()))  # rho is learned
    assert np.abs(trained.model.prior_logits.numpy()).max() > 0  # and theta


def test_an_sgh_run_directory_refuses_a_greedyhash_config(tmp_path):
    features = synthetic_features()
    train.train(Config(name="sgh", steps=5, **SMALL), tmp_path, feature_set=features)
    with pytest.raises(ConfigError, match="model: sgh -> greedyhash"):
        train.train(Config(name="sgh", steps=5, **{**SMALL, "model": "greedyhash"}), tmp_path, feature_set=features)


def test_create_model_builds_sgh_with_the_decoder_at_the_mean_and_rho_at_the_spread():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 0.5, size=(300, 24)).astype(np.float32)
    model = create_model(Config(model="sgh"), 24, 300)
    assert isinstance(model, StochasticGenerativeHashing)
    model.adapt(x)
    np.testing.assert_allclose(model.decoder.bias.numpy(), x.mean(axis=0), rtol=1e-5)
    assert float(np.exp(model.log_rho.numpy())) == pytest.approx(np.sqrt(x.var(axis=0).mean()), rel=1e-5)
