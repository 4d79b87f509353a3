"""Loss terms: reconstruction, adversarial priors, beta-TCVAE decomposition, GECO.

All functions work on one replica's batch and return that batch's value;
scaling for tf.distribute happens once, in the model's train step.
"""
from __future__ import annotations

import math

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions


def reconstruction_loss(target, reconstruction, reduction: str):
    """Squared error: "sum" = 0.5 * sum over the batch (tf.nn.l2_loss, TBH code), "mean" per element."""
    error = tf.square(tf.cast(reconstruction, tf.float32) - tf.cast(target, tf.float32))
    if reduction == "sum":
        return 0.5 * tf.reduce_sum(error)
    return tf.reduce_mean(error)


def adversarial_loss(real_logits, fake_logits):
    """Critic cross-entropy: prior samples labelled 1, encoder outputs labelled 0 (means over the batch)."""
    real = tf.nn.sigmoid_cross_entropy_with_logits(tf.ones_like(real_logits), real_logits)
    fake = tf.nn.sigmoid_cross_entropy_with_logits(tf.zeros_like(fake_logits), fake_logits)
    return tf.reduce_mean(real) + tf.reduce_mean(fake)


def pairwise_bernoulli_log_prob(codes, logits):
    """log q(b_i,k | x_j) for every pair: codes [B, M], logits [B, M] -> [B (i), B (j), M]."""
    posterior = tfd.Bernoulli(logits=logits[None, :, :], dtype=codes.dtype)
    return posterior.log_prob(codes[:, None, :])


def _log_importance_weights(batch_size, dataset_size):
    """log W [B, B] of minibatch-stratified sampling (Chen et al. 2018, appendix C.2).

    Row i weights the batch as a sample of q(z) that contains x_i: 1/N on the
    diagonal, (N - M)/(N M) for the element after it (cyclically), 1/M for
    the rest, with M = B - 1.
    """
    batch = tf.cast(batch_size, tf.float32)
    m = batch - 1.0
    n = tf.cast(dataset_size, tf.float32)
    eye = tf.eye(batch_size)
    next_one = tf.roll(eye, shift=1, axis=1)
    weights = (eye / n + next_one * (n - m) / (n * m)
               + (1.0 - eye - next_one) / m)
    return tf.math.log(weights)


def tc_decomposition(codes, logits, dataset_size: int, estimator: str):
    """beta-TCVAE terms of KL(q(b|x) || Bernoulli(0.5)^M), estimated on one batch.

    Args:
      codes: samples b_i ~ q(b|x_i), float [B, M] (0/1, or relaxed in [0, 1]).
      logits: posterior logits l_i, float [B, M].
      dataset_size: N, the number of training examples.
      estimator: "mws" (minibatch-weighted) or "mss" (minibatch-stratified).
    Returns:
      dict of scalars (nats per example, batch means): "mutual_information"
      E[log q(b|x) - log q(b)], "total_correlation" E[log q(b) - sum_k log q(b_k)],
      "dimensionwise_kl" E[sum_k log q(b_k) - log p(b)], and "kl" (their sum,
      E[log q(b|x) - log p(b)]).
    """
    codes = tf.cast(codes, tf.float32)
    logits = tf.cast(logits, tf.float32)
    batch = tf.shape(codes)[0]
    bits = tf.cast(tf.shape(codes)[1], tf.float32)
    pairwise = pairwise_bernoulli_log_prob(codes, logits)  # [B, B, M]
    log_q_conditional = tf.reduce_sum(tf.linalg.diag_part(tf.transpose(pairwise, [2, 0, 1])), axis=0)
    if estimator == "mws":
        log_norm = math.log(dataset_size) + tf.math.log(tf.cast(batch, tf.float32))
        log_q_joint = tf.reduce_logsumexp(tf.reduce_sum(pairwise, axis=2), axis=1) - log_norm
        log_q_marginals = tf.reduce_sum(tf.reduce_logsumexp(pairwise, axis=1) - log_norm, axis=1)
    else:
        log_weights = _log_importance_weights(batch, dataset_size)
        log_q_joint = tf.reduce_logsumexp(log_weights + tf.reduce_sum(pairwise, axis=2), axis=1)
        log_q_marginals = tf.reduce_sum(
            tf.reduce_logsumexp(log_weights[:, :, None] + pairwise, axis=1), axis=1)
    log_prior = -bits * math.log(2.0)
    terms = {
        "mutual_information": tf.reduce_mean(log_q_conditional - log_q_joint),
        "total_correlation": tf.reduce_mean(log_q_joint - log_q_marginals),
        "dimensionwise_kl": tf.reduce_mean(log_q_marginals - log_prior),
    }
    terms["kl"] = tf.reduce_mean(log_q_conditional - log_prior)
    return terms


def gaussian_kl(mean, scale):
    """Analytic KL(Normal(mean, scale) || Normal(0, 1)) summed over dims, batch mean (nats)."""
    posterior = tfd.Normal(tf.cast(mean, tf.float32), tf.cast(scale, tf.float32))
    kl = tfd.kl_divergence(posterior, tfd.Normal(0.0, 1.0))
    return tf.reduce_mean(tf.reduce_sum(kl, axis=1))
