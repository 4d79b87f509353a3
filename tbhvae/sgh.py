"""SGH, Stochastic Generative Hashing (Dai, Guo, Kumar, He, Song, "Stochastic Generative Hashing",
ICML 2017, Sec. 2 (the model and its description-length objective) and Sec. 3 (distributional SGD)).

  encoder   q(h|x) = prod_k Bernoulli(h_k; sigmoid(z_k)),  z = W^T x + c,  h in {0, 1}^M
  generator p(x|h) = N(U^T h + b, rho^2 I),   prior p(h) = prod_k Bernoulli(h_k; theta_k)
  loss      = E_q[-log p(x|h) - log p(h) + log q(h|x)]        (nats per example: the negative ELBO,
            = E_q[ ||x - U^T h - b||^2 / (2 rho^2) + D log rho + D/2 log(2 pi)     the description length
                   - sum_k [h_k log theta_k + (1 - h_k) log(1 - theta_k)]          of x in nats)
                   + sum_k [h_k log sigma(z_k) + (1 - h_k) log(1 - sigma(z_k))] ]
  h = 1[sigmoid(z) > xi], xi ~ U(0, 1)      (the doubly stochastic neuron: h ~ q(h|x))
  dh/dz := sigmoid'(z)                       (the approximate distributional derivative)

The gradient of the objective through the sample is the paper's approximate distributional
derivative, which the authors' code writes as a custom gradient: sigmoid'(z) times the sum of the
upstream gradients of the binary sample and of the probability output. That estimator is TBH's
`tbhvae.layers.stochastic_binary` (TBH took it from SGH), used here with xi ~ U(0, 1) drawn per step
and replica from `HashingModel._step_seed`. Test-time codes are deterministic, bits = 1[z > 0].

Choices, with what the paper and the authors' code (doubling/Stochastic_Generative_Hashing, a linear
encoder and decoder on MNIST) do:
- rho and theta are learned, with W, c, U, b, as the paper's parameters {W, U, beta, rho}
  (beta = log(theta / (1 - theta)), here `prior_logits`); rho as log rho. The code has neither: its
  loss is 1/2 ||x - x_hat||^2 (rho fixed) with no prior term (theta fixed at 1/2).
- Every term has weight 1, as the objective states it. The code weights its entropy term by 1e-3
  with the opposite sign (a penalty on -log q(h|x) of the code it trains, h = 1[sigmoid(z) > 1/2])
  and adds 1e-3 weight decay on W and U; neither is taken.
- xi ~ U(0, 1) in training, as in the paper (the code's demo fixes xi = 1/2).
- The decoder has a bias b (p(x|h) = N(U^T h, rho^2 I) in the paper) initialised at the mean of the
  training features, as the code's trainable shift; the code's per-dimension output scale, which
  multiplies U's columns, is a reparametrisation of the same linear decoder and is left out.
- The encoder sees the features as the code does, unscaled (`input_scaling="none"`), and the
  decoder reconstructs what the encoder sees; `Config.input_scaling` chooses another scaling.
- rho starts at the root-mean-square deviation of the scaled features from their mean (the maximum-
  likelihood rho of the initial decoder, which predicts the mean) and theta at 1/2.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tbhvae import layers as tbh_layers
from tbhvae.config import Config
from tbhvae.hashing_model import HashingModel


def doubly_stochastic_neuron(logits: tf.Tensor, seed) -> tuple[tf.Tensor, tf.Tensor]:
    """h = 1[sigmoid(z) > xi], xi ~ U(0, 1) drawn with the stateless `seed` int32 [2]: logits float32
    [B, M] -> (codes 0/1 float32 [B, M], probabilities sigmoid(z) [B, M]), differentiated by the
    distributional derivative, d/dz = sigmoid'(z) (dL/dh + dL/dp)."""
    threshold = tf.random.stateless_uniform(tf.shape(logits), seed=seed, dtype=logits.dtype)
    return tbh_layers.stochastic_binary(logits, threshold)


def description_length(target, reconstruction, codes, logits, log_rho, prior_logits) -> dict:
    """The negative ELBO of one sample h per row, in nats per example (batch means):
    "reconstruction" -log p(x|h), "prior" -log p(h), "log_posterior" log q(h|x), and "loss" their sum.

    target, reconstruction float32 [B, D]; codes 0/1 float32 [B, M]; logits z float32 [B, M];
    log_rho scalar; prior_logits log theta / (1 - theta) float32 [M].
    """
    dim = tf.cast(tf.shape(target)[-1], tf.float32)
    squared_error = tf.reduce_sum(tf.square(target - reconstruction), axis=-1)
    reconstruction_nats = (squared_error * 0.5 * tf.exp(-2.0 * log_rho) + dim * log_rho
                           + 0.5 * dim * np.log(2.0 * np.pi))
    prior_logits = tf.broadcast_to(prior_logits, tf.shape(codes))
    prior_nats = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=codes, logits=prior_logits), -1)
    log_posterior = -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=codes, logits=logits), -1)
    terms = {"reconstruction": tf.reduce_mean(reconstruction_nats), "prior": tf.reduce_mean(prior_nats),
             "log_posterior": tf.reduce_mean(log_posterior)}
    terms["loss"] = terms["reconstruction"] + terms["prior"] + terms["log_posterior"]
    return terms


class StochasticGenerativeHashing(HashingModel):
    """Linear Bernoulli encoder, linear Gaussian decoder, Bernoulli prior; bits = 1[z > 0]."""

    def __init__(self, config: Config, input_dim: int, dataset_size: int, **kwargs):
        super().__init__(config, input_dim, dataset_size, **kwargs)
        self.scaling = tbh_layers.InputScaling(config.input_scaling, input_dim, name="input_scaling")
        self.encoder = keras.layers.Dense(config.bits, name="encoder")  # W, c
        self.decoder = keras.layers.Dense(input_dim, name="decoder")  # U, b
        self.decoder.build((None, config.bits))  # b is set by `adapt`
        self.log_rho = self.add_weight(shape=(), initializer="zeros", name="log_rho")
        self.prior_logits = self.add_weight(shape=(config.bits,), initializer="zeros", name="prior_logits")

    def adapt(self, features: np.ndarray) -> None:
        """The input scaling's statistics, b = the mean of the scaled features float [N, D] and
        rho = their root-mean-square deviation from it."""
        self.scaling.adapt(features)
        total, total_squares = np.zeros(self.input_dim), np.zeros(self.input_dim)
        for start in range(0, len(features), 8192):
            scaled = tf.cast(self.scaling(features[start:start + 8192]), tf.float64).numpy()
            total += scaled.sum(axis=0)
            total_squares += np.square(scaled).sum(axis=0)
        mean = total / len(features)
        variance = max(float(np.mean(total_squares / len(features) - np.square(mean))), 1e-12)
        self.decoder.bias.assign(mean.astype(np.float32))
        self.log_rho.assign(0.5 * np.log(variance))

    def hash_logits(self, features):
        return tf.cast(self.encoder(self.scaling(features)), tf.float32)

    def logged_names(self) -> list[str]:
        return ["loss", "reconstruction", "prior", "log_posterior", "mse", "rho", "bit_mean"]

    def step_losses(self, features, seed) -> dict:
        target = self.scaling(features)
        logits = tf.cast(self.encoder(target), tf.float32)
        codes, _ = doubly_stochastic_neuron(logits, seed)
        reconstruction = tf.cast(self.decoder(tf.cast(codes, self.compute_dtype)), tf.float32)
        target = tf.cast(target, tf.float32)
        logged = description_length(target, reconstruction, codes, logits, self.log_rho, self.prior_logits)
        logged["mse"] = tf.reduce_mean(tf.square(target - reconstruction))
        logged["rho"] = tf.exp(tf.convert_to_tensor(self.log_rho))
        logged["bit_mean"] = tf.reduce_mean(tf.cast(logits > 0, tf.float32))
        return logged
