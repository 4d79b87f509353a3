import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tbhvae import objectives


def _log_bernoulli(b, logits):
    return b * -np.logaddexp(0, -logits) + (1 - b) * -np.logaddexp(0, logits)


def _logsumexp(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def brute_force_terms(codes, logits, n, estimator):
    """Loop-by-loop numpy version of the beta-TCVAE estimators (Chen et al. 2018)."""
    b, m = codes.shape
    pairwise = np.zeros((b, b, m))
    for i in range(b):
        for j in range(b):
            pairwise[i, j] = _log_bernoulli(codes[i], logits[j])
    if estimator == "mws":
        weights = np.full((b, b), 1.0 / (n * b))
    else:
        mm = b - 1
        weights = np.full((b, b), 1.0 / mm)
        for i in range(b):
            weights[i, i] = 1.0 / n
            weights[i, (i + 1) % b] = (n - mm) / (n * mm)
    log_w = np.log(weights)
    cond = np.array([pairwise[i, i].sum() for i in range(b)])
    joint = np.array([_logsumexp(log_w[i] + pairwise[i].sum(1), 0) for i in range(b)])
    marg = np.array([sum(_logsumexp(log_w[i] + pairwise[i, :, k], 0) for k in range(m)) for i in range(b)])
    prior = -m * math.log(2)
    return {"mutual_information": (cond - joint).mean(), "total_correlation": (joint - marg).mean(),
            "dimensionwise_kl": (marg - prior).mean(), "kl": (cond - prior).mean()}


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_tc_estimators_against_brute_force(estimator):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(6, 5))
    codes = (rng.random((6, 5)) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    got = objectives.tc_decomposition(tf.constant(codes, tf.float32), tf.constant(logits, tf.float32),
                                      dataset_size=1000, estimator=estimator)
    expected = brute_force_terms(codes, logits, 1000, estimator)
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(value, rel=1e-4, abs=1e-4), key
    total = got["mutual_information"] + got["total_correlation"] + got["dimensionwise_kl"]
    assert float(total) == pytest.approx(float(got["kl"]), rel=1e-5, abs=1e-5)


def test_mss_weights_are_a_distribution():
    log_w = objectives._log_importance_weights(7, 50).numpy()
    np.testing.assert_allclose(np.exp(log_w).sum(axis=1), 1.0, rtol=1e-6)


def test_mws_recovers_exact_marginal_when_batch_is_the_dataset():
    """With the whole (tiny) dataset as the batch, log q(b) and q(b_k) are exact up to log(B)/N terms.

    For N = B the MWS estimate equals log (1/B^2) sum_j q(b|x_j), i.e. the exact
    log q(b) = log (1/N) sum_j q(b|x_j) minus log(B): check that identity by enumeration.
    """
    rng = np.random.default_rng(4)
    n, m = 4, 3
    logits = rng.normal(0, 1.5, size=(n, m))
    codes = rng.integers(0, 2, (n, m)).astype(np.float64)
    terms = objectives.tc_decomposition(tf.constant(codes, tf.float32), tf.constant(logits, tf.float32),
                                        dataset_size=n, estimator="mws")
    log_q = np.array([[_log_bernoulli(codes[i], logits[j]).sum() for j in range(n)] for i in range(n)])
    exact_joint = np.log(np.exp(log_q).mean(axis=1))  # exact aggregate posterior on this dataset
    conditional = np.diag(log_q)
    mi_exact_shifted = (conditional - (exact_joint - np.log(n))).mean()
    assert float(terms["mutual_information"]) == pytest.approx(mi_exact_shifted, rel=1e-4)


def test_gaussian_kl_matches_tfp():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(4, 6)).astype(np.float32)
    scale = rng.uniform(0.2, 2.0, size=(4, 6)).astype(np.float32)
    expected = tfp.distributions.kl_divergence(tfp.distributions.Normal(mean, scale),
                                               tfp.distributions.Normal(0.0, 1.0)).numpy().sum(1).mean()
    closed_form = (0.5 * (scale ** 2 + mean ** 2 - 1) - np.log(scale)).sum(1).mean()
    assert float(objectives.gaussian_kl(mean, scale)) == pytest.approx(expected, rel=1e-5)
    assert float(objectives.gaussian_kl(mean, scale)) == pytest.approx(closed_form, rel=1e-4)


def test_reconstruction_reductions():
    target = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    recon = tf.constant([[0.0, 2.0], [3.0, 2.0]])
    assert float(objectives.reconstruction_loss(target, recon, "sum")) == pytest.approx(0.5 * (1 + 4))
    assert float(objectives.reconstruction_loss(target, recon, "mean")) == pytest.approx(5 / 4)


def test_adversarial_loss_is_binary_cross_entropy():
    real, fake = tf.constant([[2.0], [0.5]]), tf.constant([[-1.0], [0.3]])
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    expected = -np.log(sig(np.array([2.0, 0.5]))).mean() - np.log(1 - sig(np.array([-1.0, 0.3]))).mean()
    assert float(objectives.adversarial_loss(real, fake)) == pytest.approx(expected, rel=1e-5)
