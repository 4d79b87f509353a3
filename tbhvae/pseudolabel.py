"""Unsupervised hashing with pseudo labels (Zhang, Liu, Long, Shao, "Unsupervised Deep Hashing With
Pseudo Labels for Scalable Image Retrieval", IEEE Transactions on Image Processing 27(4), 2018).

The paper turns unsupervised hashing into classification: k-means on the training features gives
each image a pseudo label, and a network with a sigmoid hash layer followed by a softmax classifier
over the pseudo labels is trained by (its abstract) likelihood maximisation, mutual information
maximisation and quantisation error minimisation. Here, on K = `pseudolabel_clusters` clusters:

  adapt:  centroids c [K, D] = k-means of the training rows (k-means++ seeding, then Lloyd until no
          row moves, at most 100 rounds)
  step:   y_i = argmin_k |x_i - c_k|^2                          (the pseudo label of a batch row)
          h = sigmoid(x W + a) [B, M] (the hash layer),  b = 1[h > 1/2]
          classification = -mean_i log softmax(h V + e)_{y_i}   (likelihood of the pseudo labels)
          balance        = log 2 - mean_k H(mean_i h_ik)        (nats per bit, H the binary entropy)
          quantisation   = mean_ik (h_ik - b_ik)^2
          loss = classification + balance_weight * balance + quantisation_weight * quantisation

b is a deterministic function of x, so I(x; b) = H(b) <= sum_k H(b_k): the mutual information term
is maximised through the per-bit marginal entropies, i.e. each bit on for half of the batch (the
"balance" term, 0 when balanced, log 2 for a constant bit). Only the paper's abstract could be read
here, so the three terms' exact forms, their weights (1 each) and the number of clusters are this
module's choices, not checked against the paper's body. No decorrelation term is added.

The paper fine-tunes a CNN; here, as `tbhvae.greedyhash` does, the input is the fixed feature
and the network is the hash head on it. The k-means assignment of a row is its nearest centroid, so
the step recomputes it from the centroids (non-trainable weights: checkpointed, equal on replicas).
`tbhvae.baselines.AGH`'s k-means seeds at random rows and so often merges two well-separated
clusters (a centre stuck between them); k-means++ seeding (Arthur & Vassilvitskii, SODA 2007)
avoids that.
"""
from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from tbhvae import objectives
from tbhvae.baselines.base import squared_distances
from tbhvae.config import Config, ConfigError
from tbhvae.hashing_model import LinearHashModel

KMEANS_MAX_ITERATIONS = 100  # Lloyd rounds if the assignment has not settled before


def kmeans(rows: np.ndarray, clusters: int, rng: np.random.Generator,
           max_iterations: int = KMEANS_MAX_ITERATIONS) -> np.ndarray:
    """Centroids float32 [K, D] of rows float [N, D]: k-means++ seeding, then Lloyd until no row changes
    cluster; an empty cluster keeps its centroid."""
    rows = np.asarray(rows, np.float32)
    centres = np.empty((clusters, rows.shape[1]), np.float32)
    centres[0] = rows[rng.integers(len(rows))]
    nearest = squared_distances(rows, centres[:1])[:, 0]
    for k in range(1, clusters):
        total = float(nearest.sum())
        pick = rng.choice(len(rows), p=nearest / total) if total > 0 else rng.integers(len(rows))
        centres[k] = rows[pick]
        nearest = np.minimum(nearest, squared_distances(rows, centres[k:k + 1])[:, 0])
    assignment = None
    for _ in range(max_iterations):
        updated = np.argmin(squared_distances(rows, centres), axis=1)
        if assignment is not None and np.array_equal(updated, assignment):
            break
        assignment = updated
        members = np.zeros((len(rows), clusters), np.float32)
        members[np.arange(len(rows)), assignment] = 1.0
        counts = members.sum(axis=0)
        filled = counts > 0
        centres[filled] = (members.T @ rows)[filled] / counts[filled, None]
    return centres


def nearest_centroid(features: tf.Tensor, centroids: tf.Tensor) -> tf.Tensor:
    """Index int32 [B] of the nearest centroid [K, D] of each row of features float32 [B, D]."""
    squared = (tf.reduce_sum(tf.square(centroids), axis=1)[None, :]
               - 2.0 * tf.matmul(features, centroids, transpose_b=True))  # |x|^2 is the same for every k
    return tf.argmin(squared, axis=1, output_type=tf.int32)


def balance_loss(h: tf.Tensor) -> tf.Tensor:
    """log 2 - mean over bits of the entropy of the bit's batch mean (scalar, nats, in [0, log 2]);
    h float32 [B, M] in [0, 1]."""
    return math.log(2.0) - tf.reduce_mean(objectives.bernoulli_entropy(tf.reduce_mean(h, axis=0)))


def quantisation_loss(h: tf.Tensor) -> tf.Tensor:
    """Mean squared distance of h float32 [B, M] in [0, 1] to its bits 1[h > 1/2] (scalar)."""
    return tf.reduce_mean(tf.square(h - tf.cast(h > 0.5, h.dtype)))


def classification_loss(class_logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Mean softmax cross-entropy (nats) of logits float32 [B, K] at the pseudo labels int [B]."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=class_logits))


def objective(h: tf.Tensor, class_logits: tf.Tensor, labels: tf.Tensor, balance_weight: float,
              quantisation_weight: float) -> dict:
    """The loss and its terms (scalars) of hash-layer outputs h float32 [B, M] in [0, 1], classifier
    logits float32 [B, K] and pseudo labels int [B]."""
    terms = {"classification": classification_loss(class_logits, labels), "balance": balance_loss(h),
             "quantisation": quantisation_loss(h)}
    terms["loss"] = (terms["classification"] + balance_weight * terms["balance"]
                     + quantisation_weight * terms["quantisation"])
    return terms


class PseudoLabelHashing(LinearHashModel):
    """Sigmoid hash layer + softmax classifier over k-means pseudo labels; bits = 1[h > 1/2]."""

    def __init__(self, config: Config, input_dim: int, dataset_size: int, **kwargs):
        super().__init__(config, input_dim, dataset_size, **kwargs)
        self.classifier = keras.layers.Dense(config.pseudolabel_clusters, name="classifier")
        self.centroids = self.add_weight(shape=(config.pseudolabel_clusters, input_dim), initializer="zeros",
                                         trainable=False, dtype="float32", name="centroids")

    def adapt(self, features: np.ndarray) -> None:
        """Input statistics, then the k-means centroids of the scaled training rows."""
        if len(features) < self.config.pseudolabel_clusters:
            raise ConfigError(f"config key 'pseudolabel_clusters' ({self.config.pseudolabel_clusters}) must be "
                              f"at most the number of training rows ({len(features)})")
        super().adapt(features)
        scaled = np.concatenate([tf.cast(self.scaling(features[i:i + 8192]), tf.float32).numpy()
                                 for i in range(0, len(features), 8192)])
        self.centroids.assign(kmeans(scaled, self.config.pseudolabel_clusters,
                                     np.random.default_rng(self.config.seed)))

    def pseudo_labels(self, features) -> tf.Tensor:
        """The k-means cluster int32 [B] of features float [B, D]."""
        return nearest_centroid(tf.cast(self.scaling(features), tf.float32), tf.convert_to_tensor(self.centroids))

    def build_variables(self) -> None:
        self.classifier(tf.sigmoid(self.hash_logits(tf.zeros([2, self.input_dim]))))

    def logged_names(self) -> list[str]:
        return ["loss", "classification", "balance", "quantisation", "bit_mean"]

    def step_losses(self, features, seed) -> dict:
        h = tf.sigmoid(self.hash_logits(features))
        terms = objective(h, tf.cast(self.classifier(h), tf.float32), self.pseudo_labels(features),
                          self.config.pseudolabel_balance_weight, self.config.pseudolabel_quantisation_weight)
        return {**terms, "bit_mean": tf.reduce_mean(tf.cast(h > 0.5, tf.float32))}

    def training_flops_per_example(self, replica_batch: int) -> float:
        """The hash layer and the classifier (trained, 3 x 2 x (D M + M K)) and the nearest-centroid
        search (forward only, 2 x K D), per example."""
        return super().training_flops_per_example(replica_batch) + 2.0 * self.config.pseudolabel_clusters * \
            self.input_dim
