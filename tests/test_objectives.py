import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tbhvae import objectives
from tbhvae.config import load_config


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
        weights = np.full((b, b), 1.0 / b)  # Chen et al.'s 1/(N B), shifted by log N to sum to 1
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


def test_mws_is_exact_when_batch_is_the_dataset():
    """With the whole (tiny) dataset as the batch, MWS's log q(b) is the exact log (1/N) sum_j q(b|x_j)."""
    rng = np.random.default_rng(4)
    n, m = 4, 3
    logits = rng.normal(0, 1.5, size=(n, m))
    codes = rng.integers(0, 2, (n, m)).astype(np.float64)
    terms = objectives.tc_decomposition(tf.constant(codes, tf.float32), tf.constant(logits, tf.float32),
                                        dataset_size=1000, estimator="mws")  # N does not enter MWS
    log_q = np.array([[_log_bernoulli(codes[i], logits[j]).sum() for j in range(n)] for i in range(n)])
    exact_joint = np.log(np.exp(log_q).mean(axis=1))
    assert float(terms["mutual_information"]) == pytest.approx((np.diag(log_q) - exact_joint).mean(), rel=1e-4)


def test_batch_mean_marginals_closed_form():
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 2, size=(7, 4))
    codes = (rng.random((7, 4)) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    got = objectives.tc_decomposition(tf.constant(codes, tf.float32), tf.constant(logits, tf.float32),
                                      dataset_size=1000, estimator="mss", marginals="batch_mean")
    mean = (1 / (1 + np.exp(-logits))).mean(axis=0)
    dwkl = (mean * np.log(2 * mean) + (1 - mean) * np.log(2 * (1 - mean))).sum()
    assert float(got["dimensionwise_kl"]) == pytest.approx(dwkl, rel=1e-4)
    estimated = brute_force_terms(codes, logits, 1000, "mss")
    assert float(got["mutual_information"]) == pytest.approx(estimated["mutual_information"], rel=1e-4)
    # TC = E[log q(b)] - E[sum_k log Bernoulli(b_k; mean_k)], with log q(b) = log q(b|x) - MI on average
    marginals = (codes * np.log(mean) + (1 - codes) * np.log(1 - mean)).sum(axis=1)
    conditional = np.array([_log_bernoulli(codes[i], logits[i]).sum() for i in range(7)])
    log_q_joint = conditional.mean() - estimated["mutual_information"]
    assert float(got["total_correlation"]) == pytest.approx(log_q_joint - marginals.mean(), rel=1e-4, abs=1e-4)


# --- what the binary objective rewards -------------------------------------------------------------

BATCH, DATASET, BITS = 400, 50000, 32


def _deterministic(codes):
    """Confident posteriors (logits +-12) that put all mass on `codes` [B, M]."""
    return tf.constant(codes, tf.float32), tf.constant(np.where(codes > 0, 12.0, -12.0), tf.float32)


def _codes(balanced: int, constant: int, seed: int = 0, duplicated: bool = False):
    rng = np.random.default_rng(seed)
    free = rng.integers(0, 2, (BATCH, 1 if duplicated else balanced))
    free = np.repeat(free, balanced, axis=1) if duplicated else free
    return np.concatenate([free, np.ones((BATCH, constant))], axis=1).astype(np.float64)


def _terms(codes, estimator, marginals="estimator"):
    return objectives.tc_decomposition(*_deterministic(codes), DATASET, estimator, marginals)


@pytest.mark.parametrize("estimator", ["mws", "mss"])
@pytest.mark.parametrize("marginals", ["estimator", "batch_mean"])
def test_terms_of_known_code_sets(estimator, marginals):
    support = DATASET if estimator == "mss" else BATCH
    floor = BITS * math.log(2) - math.log(support)
    # posterior = prior: every term ~0
    rng = np.random.default_rng(1)
    prior = objectives.tc_decomposition(tf.constant(rng.integers(0, 2, (BATCH, BITS)), tf.float32),
                                        tf.zeros([BATCH, BITS]), DATASET, estimator, marginals)
    for key in ("mutual_information", "total_correlation", "dimensionwise_kl", "kl"):
        assert abs(float(prior[key])) < 0.02, key
    # collapsed codes: all the KL is dimension-wise, M log 2
    collapsed = _terms(np.ones((BATCH, BITS)), estimator, marginals)
    assert float(collapsed["dimensionwise_kl"]) == pytest.approx(BITS * math.log(2), rel=1e-3)
    assert abs(float(collapsed["total_correlation"])) < 1e-3
    # balanced independent deterministic bits: no dimension-wise KL, TC at the floor
    balanced = _terms(_codes(BITS, 0), estimator, marginals)
    assert abs(float(balanced["dimensionwise_kl"])) < 0.1
    assert float(balanced["total_correlation"]) == pytest.approx(floor, abs=0.15)
    assert float(objectives.tc_floor(BITS, support)) == pytest.approx(floor, rel=1e-6)
    # one balanced bit copied M times: TC = (M - 1) H(bit), H(bit) ~ log 2 for the batch's share f of ones
    copies = _codes(BITS, 0, duplicated=True)
    f = copies[:, 0].mean()
    entropy = -(f * math.log(f) + (1 - f) * math.log(1 - f))
    duplicated = _terms(copies, estimator, marginals)
    assert float(duplicated["total_correlation"]) == pytest.approx((BITS - 1) * entropy, abs=0.1)


def test_tc_floor_is_zero_when_the_support_can_hold_every_code():
    # With S >= 2^M codes an aggregate posterior can be uniform over all codes: no unavoidable TC.
    assert float(objectives.tc_floor(8, 1000)) == 0.0
    assert float(objectives.tc_floor(8, 256)) == pytest.approx(0.0, abs=1e-5)
    assert float(objectives.tc_floor(16, 400)) == pytest.approx(16 * math.log(2) - math.log(400), rel=1e-6)


def _penalty(codes, alpha, beta, gamma, hinge):
    terms = _terms(codes, "mss", "batch_mean")
    floor = objectives.tc_floor(BITS, DATASET) if hinge else 0.0
    return float(objectives.binary_regularizer(terms, alpha, beta, gamma, floor))


def test_recommended_penalty_prefers_balanced_bits_and_the_papers_does_not():
    all_bits, half, quarter = _codes(32, 0), _codes(16, 16), _codes(8, 24)
    recommended = dict(alpha=0.0, beta=1.0, gamma=1.0, hinge=True)
    assert _penalty(all_bits, **recommended) < _penalty(half, **recommended) < _penalty(quarter, **recommended)
    assert _penalty(all_bits, **recommended) < 0.2
    shipped = load_config("cifar10_tbhvae")  # the recommended config's weights
    weights = dict(alpha=shipped.tc_alpha, beta=shipped.tc_beta, gamma=shipped.tc_gamma, hinge=shipped.tc_hinge)
    assert _penalty(all_bits, **weights) < _penalty(half, **weights) < _penalty(quarter, **weights)
    # The paper's literal weights reward collapse: 8 + 24 and 16 + 16 cost less than 32 balanced bits.
    paper = dict(alpha=1.0, beta=6.0, gamma=1.0, hinge=False)
    assert _penalty(quarter, **paper) < _penalty(all_bits, **paper)
    assert _penalty(half, **paper) < _penalty(all_bits, **paper)


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_a_gradient_step_on_duplicated_bits_lowers_tc(estimator):
    rng = np.random.default_rng(3)
    base = rng.normal(0, 1, (64, 1))
    logits = tf.Variable(np.repeat(base, 8, axis=1) + 0.01 * rng.normal(size=(64, 8)), dtype=tf.float32)
    codes = tf.constant((base > 0).repeat(8, axis=1), tf.float32)

    def tc():
        return objectives.tc_decomposition(codes, logits, 1000, estimator)["total_correlation"]

    with tf.GradientTape() as tape:
        before = tc()
    gradient = tape.gradient(before, logits)
    logits.assign_sub(0.5 * gradient / tf.norm(gradient))
    assert float(tc()) < float(before) - 1e-3


def test_similarity_loss_is_the_expected_error_under_the_posterior():
    codes = tf.constant([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    target = tf.constant([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]])
    assert float(objectives.pairwise_similarity_loss(codes, target)) == pytest.approx(0.0)
    assert float(objectives.pairwise_similarity_loss(codes, tf.zeros([3, 3]))) == pytest.approx(2 / 6)
    # Monte Carlo over Bernoulli codes with means h: the closed form is E[(s - T)^2]
    rng = np.random.default_rng(0)
    means = rng.uniform(-0.9, 0.9, (5, 8))
    target = rng.uniform(-1, 1, (5, 5))
    samples = np.where(rng.random((20000, 5, 8)) < (1 + means) / 2, 1.0, -1.0)
    similarity = np.einsum("sik,sjk->sij", samples, samples) / 8
    off = ~np.eye(5, dtype=bool)
    expected = np.square(similarity - target)[:, off].mean()
    got = float(objectives.pairwise_similarity_loss(tf.constant(means), tf.constant(target)))
    assert got == pytest.approx(expected, rel=0.01)
    # noise is not free: uncertain bits (h = 0) pay 1/M per pair where orthogonal confident codes pay 0
    orthogonal = tf.constant([[1.0, 1.0], [1.0, -1.0]])
    assert float(objectives.pairwise_similarity_loss(orthogonal, tf.eye(2))) == pytest.approx(0.0)
    assert float(objectives.pairwise_similarity_loss(tf.zeros([2, 2]), tf.eye(2))) == pytest.approx(0.5)


def test_decorrelation_loss():
    independent = tf.constant([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert float(objectives.decorrelation_loss(independent)) == pytest.approx(0.0)
    copied = tf.constant([[1.0, 1.0], [-1.0, -1.0]])
    assert float(objectives.decorrelation_loss(copied)) == pytest.approx(1.0)
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
