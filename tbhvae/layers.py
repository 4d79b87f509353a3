"""Layers of the twin-bottleneck autoencoder (Keras 3, TensorFlow backend)."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

DEGREE_EPSILON = 1e-8  # keeps D^-1/2 finite for isolated nodes


@tf.custom_gradient
def stochastic_binary(logits, threshold):
    """Stochastic binary neuron with the straight-through gradient of TBH.

    Args:
      logits: float [B, M].
      threshold: float [B, M], eps in b = 1[sigmoid(logits) > eps].
    Returns:
      (codes 0/1 float [B, M], probabilities sigmoid(logits) [B, M]). The
      gradient w.r.t. the logits is p (1 - p) (dL/db + dL/dp); the threshold
      gets none.
    """
    probs = tf.sigmoid(logits)
    codes = tf.cast(probs > threshold, logits.dtype)

    def grad(d_codes, d_probs):
        return probs * (1.0 - probs) * (d_codes + d_probs), tf.zeros_like(threshold)

    return (codes, probs), grad


def hamming_adjacency(codes, exponent: float):
    """Batch graph A_ij = (1 - d_H(b_i, b_j) / M) ** exponent: float [B, M] -> [B, B].

    Codes in {0, 1} give Hamming distances; relaxed codes in [0, 1] give the
    expected distance sum_k b_ik + b_jk - 2 b_ik b_jk, which is >= 0.
    """
    codes = tf.cast(codes, tf.float32)
    bits = tf.cast(tf.shape(codes)[1], tf.float32)
    ones = tf.reduce_sum(codes, axis=1)
    distance = ones[:, None] + ones[None, :] - 2.0 * tf.matmul(codes, codes, transpose_b=True)
    similarity = tf.clip_by_value(1.0 - distance / bits, 0.0, 1.0)
    if exponent == 1.0:
        return similarity
    return tf.pow(tf.maximum(similarity, DEGREE_EPSILON), exponent)


def normalize_adjacency(adjacency):
    """Symmetric normalisation D^-1/2 A D^-1/2 of a self-connected graph [B, B]."""
    inv_sqrt_degree = tf.math.rsqrt(tf.reduce_sum(adjacency, axis=1) + DEGREE_EPSILON)
    return inv_sqrt_degree[:, None] * adjacency * inv_sqrt_degree[None, :]


class GraphConvolution(keras.layers.Layer):
    """z' = activation(norm(A) @ Dense(z)): [B, C] and [B, B] -> [B, units]."""

    def __init__(self, units: int, activation="sigmoid", **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units, name="dense")
        self.activation = keras.activations.get(activation)

    def call(self, values, adjacency):
        projected = self.dense(values)
        norm = tf.cast(normalize_adjacency(adjacency), projected.dtype)
        return self.activation(tf.matmul(norm, projected))


class InputScaling(keras.layers.Layer):
    """Fixed input normalisation stored with the model (and so with every export).

    "none" passes features through; "standardize" applies (x - mean) / std
    with statistics of the training features; "l2" scales each row to unit
    norm and then by sqrt(D) so that entries stay O(1).
    """

    def __init__(self, mode: str, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode
        self.shift = self.add_weight(shape=(dim,), initializer="zeros", trainable=False, name="shift")
        self.scale = self.add_weight(shape=(dim,), initializer="ones", trainable=False, name="scale")

    def adapt(self, features) -> None:
        """Sets the statistics from training features float [N, D] (numpy)."""
        if self.mode == "standardize":
            std = features.std(axis=0)
            spread = std + 1e-3 * std.mean()  # relative floor: any feature scale, constant dims stay finite
            self.shift.assign(features.mean(axis=0))
            self.scale.assign(1.0 / np.where(spread > 0, spread, 1.0))

    def call(self, features):
        features = tf.cast(features, self.compute_dtype)
        if self.mode == "l2":
            # one factor per row, not tf.math.l2_normalize: an int8 TFLite conversion maps that to
            # L2_NORMALIZATION, whose output step is fixed at 1/128, coarse for the unit vector's entries
            # (~1/sqrt(D)); this form keeps the scaled row on a calibrated int8 scale
            dim = tf.cast(tf.shape(features)[-1], features.dtype)
            squares = tf.reduce_sum(tf.square(features), axis=-1, keepdims=True)
            return features * (tf.math.rsqrt(tf.maximum(squares, 1e-12)) * tf.sqrt(dim))
        return (features - tf.cast(self.shift, features.dtype)) * tf.cast(self.scale, features.dtype)


class AnchorGraph(keras.layers.Layer):
    """Anchor-graph similarity of a batch (Liu et al., "Hashing with Graphs", ICML 2011).

    Each row x gets affinities z(x) [anchors] to its `nearest` nearest of
    `anchors` k-means centres (Gaussian kernel, normalised to sum 1, as in
    `tbhvae.baselines.AGH`, which fits the centres); the graph between two rows
    is z(x_i) L^-1 z(x_j) with L the anchors' degrees over the training set.
    `similarity` rescales it by its diagonal to [0, 1]: 1 for rows with the same
    anchors, 0 for rows that share none. The defaults (300 anchors, 2 nearest)
    are AGH's and do not depend on the feature dimension.
    """

    def __init__(self, anchors: int, nearest: int, dim: int, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.nearest = nearest
        constant = dict(trainable=False)
        self.centres = self.add_weight(shape=(anchors, dim), initializer="zeros", name="centres", **constant)
        self.inverse_bandwidth = self.add_weight(shape=(), initializer="ones", name="inverse_bandwidth", **constant)
        self.inverse_degrees = self.add_weight(shape=(anchors,), initializer="ones", name="inverse_degrees",
                                               **constant)

    def adapt(self, features, seed: int) -> None:
        """Fits the anchors on training rows float [N, D] (numpy, already input-scaled)."""
        from tbhvae.baselines import AGH
        agh = AGH(bits=1, seed=seed, anchors=self.centres.shape[0], nearest_anchors=self.nearest)
        agh.fit(features)
        self.centres.assign(agh.anchors_)
        self.inverse_bandwidth.assign(1.0 / max(agh.bandwidth_, 1e-12) ** 2)
        degrees = sum(tf.reduce_sum(self.affinity(tf.constant(features[i:i + 8192], tf.float32)), axis=0)
                      for i in range(0, len(features), 8192))
        self.inverse_degrees.assign(1.0 / tf.maximum(degrees, 1e-6))

    def affinity(self, features):
        """z(x): float [B, D] -> [B, anchors], `nearest` non-zeros per row summing to 1."""
        features = tf.cast(features, tf.float32)
        centres = tf.convert_to_tensor(self.centres)
        squared = (tf.reduce_sum(tf.square(features), axis=1, keepdims=True)
                   - 2.0 * tf.matmul(features, centres, transpose_b=True)
                   + tf.reduce_sum(tf.square(centres), axis=1)[None, :])
        negative, nearest = tf.math.top_k(-squared, self.nearest)
        weights = tf.nn.softmax(negative * self.inverse_bandwidth, axis=1)
        return tf.reduce_sum(tf.one_hot(nearest, tf.shape(centres)[0]) * weights[:, :, None], axis=1)

    def similarity(self, features):
        """Normalised anchor-graph similarity of a batch: float [B, D] -> [B, B] in [0, 1]."""
        z = self.affinity(features)
        graph = tf.matmul(z * self.inverse_degrees, z, transpose_b=True)
        inv_sqrt_diagonal = tf.math.rsqrt(tf.linalg.diag_part(graph) + DEGREE_EPSILON)
        return inv_sqrt_diagonal[:, None] * graph * inv_sqrt_diagonal[None, :]


def pairwise_cosine(rows):
    """Cosine similarity of every pair of rows: float32 [B, K] -> [B, B]."""
    unit = tf.math.l2_normalize(rows, axis=-1)
    return tf.matmul(unit, unit, transpose_b=True)


def centred_cosine_similarity(features):
    """Cosine similarity of the batch's rows after removing the batch mean: [B, D] -> [B, B] in [-1, 1]."""
    features = tf.cast(features, tf.float32)
    centred = tf.math.l2_normalize(features - tf.reduce_mean(features, axis=0, keepdims=True), axis=1)
    return tf.matmul(centred, centred, transpose_b=True)


class Discriminator(keras.layers.Layer):
    """Real-vs-encoded critic returning logits [B, 1]: one Dense, or a small MLP."""

    def __init__(self, kind: str, hidden: int, **kwargs):
        super().__init__(**kwargs)
        self.hidden = [keras.layers.Dense(hidden, activation="relu", name="hidden")] if kind == "mlp" else []
        self.logit = keras.layers.Dense(1, name="logit", dtype="float32")

    def call(self, inputs):
        for layer in self.hidden:
            inputs = layer(inputs)
        return self.logit(inputs)
