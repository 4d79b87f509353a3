"""GreedyHash, unsupervised (Su, Zhang, Han, Tian, "Greedy Hash: Towards Fast Optimization for
Accurate Hash Coding in CNN", NeurIPS 2018, Sec. 3 and the unsupervised loss of Sec. 4).

  features x [B, D] -> InputScaling -> h = x W + c [B, M] (the hash layer)
  b = sign(h) in the forward pass, db = dh in the backward one (the greedy gradient, Eq. 7)
  loss = mean over pairs i != j of (cos(b_i, b_j) - cos(x_i, x_j))^2       (similarity)
         + penalty_weight * mean |(|h| - 1)|^3                              (h close to b)

As in the authors' unsupervised code (VGG-16 fc7 frozen, one linear layer trained), the
model is one linear hash layer on fixed features. Two choices differ from that code,
for the same objective: the similarity averages over all B (B - 1) ordered pairs of the
batch rather than the B / 2 pairs of its two halves (a lower-variance estimate of the
same expectation), and the optimiser is the trainer's Adam instead of SGD with momentum.
The cubic penalty's weight 0.1 is the code's (`Config.greedyhash_penalty_weight`).
"""
from __future__ import annotations

import tensorflow as tf

from tbhvae import layers as tbh_layers
from tbhvae.hashing_model import LinearHashModel


def greedy_sign(h: tf.Tensor) -> tf.Tensor:
    """sign(h) forward, the identity backward (GreedyHash's hash layer): float [..., M] -> {-1, 0, 1}."""
    return h + tf.stop_gradient(tf.sign(h) - h)


def similarity_loss(codes: tf.Tensor, features: tf.Tensor) -> tf.Tensor:
    """Mean squared difference of code and feature cosines over the pairs i != j (scalar).

    codes float32 [B, M] in {-1, 1} (their cosine is b_i . b_j / M), features float32 [B, D].
    """
    bits = tf.cast(tf.shape(codes)[1], tf.float32)
    error = tf.square(tf.matmul(codes, codes, transpose_b=True) / bits - tbh_layers.pairwise_cosine(features))
    batch = tf.cast(tf.shape(codes)[0], tf.float32)
    return (tf.reduce_sum(error) - tf.reduce_sum(tf.linalg.diag_part(error))) / (batch * (batch - 1.0))


def quantisation_penalty(h: tf.Tensor) -> tf.Tensor:
    """mean |(|h| - 1)|^3 over a batch of hash-layer outputs float32 [B, M] (scalar)."""
    return tf.reduce_mean(tf.abs(tf.abs(h) - 1.0) ** 3)


class GreedyHash(LinearHashModel):
    """One linear hash layer trained with the greedy sign; bits = 1[h > 0]."""

    def logged_names(self) -> list[str]:
        return ["loss", "similarity", "quantisation", "bit_mean"]

    def step_losses(self, features, seed) -> dict:
        scaled = self.scaling(features)
        h = tf.cast(self.hash_layer(scaled), tf.float32)
        similarity = similarity_loss(greedy_sign(h), tf.cast(scaled, tf.float32))
        quantisation = quantisation_penalty(h)
        return {"loss": similarity + self.config.greedyhash_penalty_weight * quantisation,
                "similarity": similarity, "quantisation": quantisation,
                "bit_mean": tf.reduce_mean(tf.cast(h > 0, tf.float32))}

    def training_flops_per_example(self, replica_batch: int) -> float:
        """The hash layer and the batch cosines b b^T and x x^T (`batch_cosine_flops`), per example."""
        return super().training_flops_per_example(replica_batch) + self.batch_cosine_flops(replica_batch)
