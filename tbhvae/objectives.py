"""Loss terms: reconstruction, adversarial priors, beta-TCVAE decomposition, similarity, decorrelation.

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


def tc_floor(bits, support):
    """max(0, M log 2 - log S): the estimated TC of M balanced, independent, deterministic bits.

    An aggregate posterior estimated from S codes (S = N for the MSS estimator,
    the batch B for MWS) holds at most log S nats, so even ideal hash codes show
    TC = M log 2 - log S when 2^M > S; a penalty on TC above this floor does not
    push ideal codes toward fewer bits.
    """
    return tf.nn.relu(tf.cast(bits, tf.float32) * math.log(2.0) - tf.math.log(tf.cast(support, tf.float32)))


def bernoulli_entropy(probs):
    """H(Bernoulli(p)) in nats, elementwise (p clipped to [1e-7, 1 - 1e-7], so a constant bit is finite)."""
    probs = tf.clip_by_value(probs, 1e-7, 1.0 - 1e-7)
    return -(probs * tf.math.log(probs) + (1.0 - probs) * tf.math.log(1.0 - probs))


def _bernoulli_entropy_sum(probs):
    """sum_k H(Bernoulli(p_k)) in nats: probs [M] -> scalar."""
    return tf.reduce_sum(bernoulli_entropy(probs))


def tc_decomposition(codes, logits, dataset_size: int, estimator: str, marginals: str = "estimator"):
    """beta-TCVAE terms of KL(q(b|x) || Bernoulli(0.5)^M), estimated on one batch.

    Args:
      codes: samples b_i ~ q(b|x_i), 0/1 float [B, M].
      logits: posterior logits l_i, float [B, M].
      dataset_size: N, the number of training examples.
      estimator: "mws" (minibatch-weighted) or "mss" (minibatch-stratified)
        estimate of the aggregate posterior q(b) (Chen et al. 2018, eqs. 4-5).
      marginals: "estimator" estimates each q(b_k) like q(b); "batch_mean"
        takes q(b_k) = Bernoulli(mean_i p_ik), whose dimension-wise KL is the
        closed form sum_k KL(Bernoulli(p̄_k) || Bernoulli(0.5)) (a bit-balance
        penalty) and which needs no [B, B, M] tensor.
    Returns:
      dict of scalars (nats per example, batch means): "mutual_information"
      E[log q(b|x) - log q(b)], "total_correlation" E[log q(b) - sum_k log q(b_k)],
      "dimensionwise_kl" E[sum_k log q(b_k) - log p(b)], and "kl" (their sum,
      E[log q(b|x) - log p(b)]). Both estimators weight each row of the batch
      with weights summing to 1, so the values carry no log N offsets.
    """
    codes = tf.cast(codes, tf.float32)
    logits = tf.cast(logits, tf.float32)
    batch = tf.shape(codes)[0]
    bits = tf.cast(tf.shape(codes)[1], tf.float32)
    log_p, log_not_p = tf.math.log_sigmoid(logits), tf.math.log_sigmoid(-logits)
    # log q(b_i | x_j) summed over bits, as two matmuls: [B (i), B (j)]
    joint_pairwise = tf.matmul(codes, log_p, transpose_b=True) + tf.matmul(1.0 - codes, log_not_p, transpose_b=True)
    log_q_conditional = tf.linalg.diag_part(joint_pairwise)
    log_weights = _log_batch_weights(batch, dataset_size, estimator)
    log_q_joint = tf.reduce_logsumexp(log_weights + joint_pairwise, axis=1)
    log_prior = -bits * math.log(2.0)
    if marginals == "batch_mean":
        mean_probs = tf.reduce_mean(tf.sigmoid(logits), axis=0)
        log_q_marginals = tf.reduce_sum(codes * tf.math.log(tf.maximum(mean_probs, 1e-7))
                                        + (1.0 - codes) * tf.math.log(tf.maximum(1.0 - mean_probs, 1e-7)), axis=1)
        dimensionwise_kl = -log_prior - _bernoulli_entropy_sum(mean_probs)
    else:
        pairwise = pairwise_bernoulli_log_prob(codes, logits)  # [B, B, M]
        log_q_marginals = tf.reduce_sum(tf.reduce_logsumexp(log_weights[:, :, None] + pairwise, axis=1), axis=1)
        dimensionwise_kl = tf.reduce_mean(log_q_marginals - log_prior)
    return {
        "mutual_information": tf.reduce_mean(log_q_conditional - log_q_joint),
        "total_correlation": tf.reduce_mean(log_q_joint - log_q_marginals),
        "dimensionwise_kl": dimensionwise_kl,
        "kl": tf.reduce_mean(log_q_conditional - log_prior),
    }


def _log_batch_weights(batch_size, dataset_size: int, estimator: str):
    """log W [B, B]: row i weights the batch as a sample of the aggregate posterior (rows sum to 1).

    "mss": minibatch-stratified weights. "mws": the uniform 1/B, i.e. Chen et
    al.'s minibatch-weighted 1/(N B) plus log N: the same gradients, without the
    -log N offset in log q(b) and log q(b_k) that made the reported TC and
    dimension-wise KL meaningless. Its estimate of q(b) has support B, not N.
    """
    if estimator == "mss":
        return _log_importance_weights(batch_size, dataset_size)
    return tf.fill([batch_size, batch_size], -tf.math.log(tf.cast(batch_size, tf.float32)))


def binary_regularizer(terms: dict, alpha: float, beta: float, gamma: float, floor: float):
    """alpha * MI + beta * max(0, TC - floor) + gamma * DWKL (Chen et al. 2018, eq. 4, with the TC floor hinged).

    `floor` is `tc_floor(M, N)` to hinge the unavoidable TC of ideal codes away,
    or 0 for the literal beta-TCVAE penalty.
    """
    return (alpha * terms["mutual_information"] + beta * tf.nn.relu(terms["total_correlation"] - floor)
            + gamma * terms["dimensionwise_kl"])


def pairwise_similarity_loss(means, target):
    """Expected squared error of code similarities under the posterior, over pairs i != j.

    With independent bits of means h = E[2b - 1] (float [B, M], in [-1, 1]),
    s_ij = <2b_i - 1, 2b_j - 1> / M has E[s_ij] = <h_i, h_j> / M and
    Var[s_ij] = sum_k (1 - h_ik^2 h_jk^2) / M^2, so E[(s_ij - T_ij)^2] is
    (<h_i, h_j> / M - T_ij)^2 + Var[s_ij]: noisy posteriors pay for their noise.
    target: T [B, B] in [-1, 1]. Returns the mean over the B (B - 1) ordered pairs.
    """
    means = tf.cast(means, tf.float32)
    batch = tf.shape(means)[0]
    bits = tf.cast(tf.shape(means)[1], tf.float32)
    squared = tf.square(means)
    error = tf.square(tf.matmul(means, means, transpose_b=True) / bits - tf.cast(target, tf.float32))
    variance = (bits - tf.matmul(squared, squared, transpose_b=True)) / tf.square(bits)
    off_diagonal = 1.0 - tf.eye(batch)
    pairs = tf.cast(batch * (batch - 1), tf.float32)
    return tf.reduce_sum((error + variance) * off_diagonal) / pairs


def decorrelation_loss(codes_pm):
    """Mean squared off-diagonal of the bits' batch second moments E[h_k h_l]: [B, M] -> scalar."""
    codes_pm = tf.cast(codes_pm, tf.float32)
    moments = tf.matmul(codes_pm, codes_pm, transpose_a=True) / tf.cast(tf.shape(codes_pm)[0], tf.float32)
    off_diagonal = moments - tf.linalg.diag(tf.linalg.diag_part(moments))
    bits = tf.cast(tf.shape(codes_pm)[1], tf.float32)
    return tf.reduce_sum(tf.square(off_diagonal)) / (bits * (bits - 1.0))


def gaussian_kl(mean, scale):
    """Analytic KL(Normal(mean, scale) || Normal(0, 1)) summed over dims, batch mean (nats)."""
    posterior = tfd.Normal(tf.cast(mean, tf.float32), tf.cast(scale, tf.float32))
    kl = tfd.kl_divergence(posterior, tfd.Normal(0.0, 1.0))
    return tf.reduce_mean(tf.reduce_sum(kl, axis=1))
