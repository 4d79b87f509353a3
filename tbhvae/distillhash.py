"""DistillHash (Yang, Liu, Deng, Liu, Tao, "DistillHash: Unsupervised Deep Hashing by Distilling Data
Pairs", CVPR 2019), on fixed features.

  features x [B, D] -> InputScaling -> h = x W + c [B, M] (the hash layer), u = tanh(h), bits = 1[h > 0]
  initial (noisy) labels   s~_ij = 1[cos(x_i, x_j) >= c_s]                       (SSDH's similar tail)
  noisy posterior          eta_ij = mean of s~ over the pairs N(i) x N(j)         (the local structure)
  local flip-rate bounds   rho0_ij = min of eta, rho1_ij = min of 1 - eta over N(i) x N(j)
  distilled pairs          similar if eta > 1/2 and eta >= (1 + rho0) / 2,
                           dissimilar if eta < 1/2 and 1 - eta >= (1 + rho1) / 2, the rest ignored
  loss = sum over distilled pairs i != j of [log(1 + exp(Theta_ij)) - s_ij Theta_ij] / (B (B - 1)),
         Theta_ij = u_i . u_j / 2                                     (the pairwise Bayesian likelihood)

The initial labels follow SSDH (Yang et al., IJCAI 2018): the pairwise cosine distances of the fixed
features have a mode m, and each side of it is fitted by a half Gaussian; pairs closer than
m - alpha sigma_left are similar. As in the authors' DistillHash code, which binarises SSDH's labels
(S > 0), the other pairs are dissimilar. `adapt` estimates m and sigma_left once from a sample of
pairs of the training features and stores c_s = 1 - (m - alpha sigma_left) as a non-trainable
variable (checkpointed, the same on every replica).

Distillation: with P(s~ = 1 | S* = 0) = rho0 and P(s~ = 0 | S* = 1) = rho1 (the flip rates around a
pair), eta = (1 - rho0 - rho1) P(S* = 1) + rho0, so eta > (1 + rho0 - rho1) / 2 implies the Bayes
optimal label S* = 1, and eta >= (1 + rho0) / 2 is a sufficient condition free of rho1 (the
symmetric one for S* = 0). The flip rates are estimated as in the authors' code, by the smallest
noisy posterior over the pairs of the two rows' nearest neighbours (an upper bound, so the test
stays sufficient). "Greater or equal" keeps a neighbourhood whose pairs all carry the same label,
where that bound is trivially 1.

Choices where this differs from the paper and its code, for frozen features and the shared trainer:
- The network is one linear hash layer with tanh on the fixed features (the paper fine-tunes
  VGG-16 with a new tanh fc8; here the feature extractor is frozen, as for GreedyHash).
- The code estimates eta with a first network trained on the noisy labels (sigmoid of its codes'
  inner products) and finds neighbours among all training rows; here eta is the neighbours'
  average of the noisy labels, and the neighbours are the k nearest rows of the batch by cosine
  (`Config.distillhash_neighbours`, self included), so the labels of a batch come from the batch
  alone (a [B, B] cosine matrix) and need neither a first training stage nor an N x N label matrix.
- The authors' final stage calls a loss its released file does not define; the one here is the
  pairwise likelihood of the paper's Bayesian framework (as Luo et al.'s survey of deep hashing,
  TKDD 2023, Eq. 60, states it), with no quantisation term: codes are sign(u) at test time.
- The rule above is read from the authors' code (distill_confident_label.py: keep similar if
  p > (1 + min p) / 2, dissimilar if p < (1 - min (1 - p)) / 2 over the neighbour pairs); that
  code indexes the neighbour pairs as (N(j), N(j)), which reads as a slip for (N(i), N(j)).
- The mode of the distances is the fullest 0.01-wide histogram bin, as in SSDH's reimplementation
  (TreezzZ/SSDH_PyTorch), whose alpha = 2 is the default here.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tbhvae import layers as tbh_layers
from tbhvae.config import Config
from tbhvae.hashing_model import LinearHashModel

ADAPT_PAIRS = 200_000  # random pairs for the distance statistics: the mode and sigma to ~0.01 at any N
HISTOGRAM_BIN = 0.01  # cosine-distance bin width of the mode (SSDH's code: 100 bins over [0, 1])


def ssdh_similar_distance(distances: np.ndarray, alpha: float) -> float:
    """SSDH's similar threshold m - alpha sigma_left of pairwise cosine distances float [P] in [0, 2].

    m is the fullest histogram bin's left edge; sigma_left the RMS of (d - m) over d <= m (the std of
    the left half mirrored about m, SSDH's half-Gaussian fit)."""
    counts, edges = np.histogram(distances, bins=np.arange(0.0, 2.0 + HISTOGRAM_BIN, HISTOGRAM_BIN))
    mode = edges[np.argmax(counts)]
    left = distances[distances <= mode]
    sigma_left = np.sqrt(np.mean((left - mode) ** 2)) if left.size else 0.0
    return float(mode - alpha * sigma_left)


def neighbour_pair_reduce(matrix: tf.Tensor, neighbours: tf.Tensor, reduce) -> tf.Tensor:
    """reduce over (a, b) in N(i) x N(j) of matrix[a, b], for every pair (i, j): [B, B], [B, k] -> [B, B].

    `reduce` (tf.reduce_mean, tf.reduce_min) is taken over b, then over a: 2 B^2 k gathers, not B^2 k^2."""
    over_columns = reduce(tf.gather(matrix, neighbours, axis=1), axis=2)  # [a, j]: b in N(j)
    return reduce(tf.gather(over_columns, neighbours), axis=1)  # [i, j]: a in N(i)


def distill_pairs(cosine: tf.Tensor, similar_cosine, neighbours: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Distilled labels of a batch: cosine float32 [B, B] -> (labels s [B, B] in {0, 1}, kept mask [B, B]).

    Noisy labels 1[cos >= similar_cosine]; each row's neighbours are its `neighbours` most similar rows
    (itself first); the diagonal is never kept."""
    batch = tf.shape(cosine)[0]
    eye = tf.eye(batch, dtype=tf.bool)
    _, nearest = tf.math.top_k(tf.where(eye, 2.0, cosine), k=tf.minimum(neighbours, batch))
    noisy = tf.cast(cosine >= similar_cosine, tf.float32)
    posterior = neighbour_pair_reduce(noisy, nearest, tf.reduce_mean)
    flip_to_similar = neighbour_pair_reduce(posterior, nearest, tf.reduce_min)
    flip_to_dissimilar = neighbour_pair_reduce(1.0 - posterior, nearest, tf.reduce_min)
    similar = (posterior > 0.5) & (posterior >= (1.0 + flip_to_similar) / 2.0)
    dissimilar = (posterior < 0.5) & (1.0 - posterior >= (1.0 + flip_to_dissimilar) / 2.0)
    kept = (similar | dissimilar) & ~eye
    return tf.cast(similar, tf.float32), tf.cast(kept, tf.float32)


def pair_likelihood_loss(u: tf.Tensor, labels: tf.Tensor, kept: tf.Tensor) -> tf.Tensor:
    """Negative log-likelihood of the kept pairs, summed and divided by B (B - 1) (scalar).

    u float32 [B, M] in (-1, 1); labels, kept float32 [B, B]; Theta = u u^T / 2."""
    theta = tf.matmul(u, u, transpose_b=True) / 2.0
    nll = tf.math.softplus(theta) - labels * theta
    batch = tf.cast(tf.shape(u)[0], tf.float32)
    return tf.reduce_sum(kept * nll) / (batch * (batch - 1.0))


class DistillHash(LinearHashModel):
    """One linear hash layer, tanh relaxation, trained on the batch's distilled pairs; bits = 1[h > 0]."""

    def __init__(self, config: Config, input_dim: int, dataset_size: int, **kwargs):
        super().__init__(config, input_dim, dataset_size, **kwargs)
        # c_s: cosine at and above which a pair's initial label is similar (set by `adapt`)
        self.similar_cosine = self.add_weight(shape=(), initializer="ones", trainable=False, dtype="float32",
                                              name="similar_cosine")

    def adapt(self, features: np.ndarray) -> None:
        """Input scaling and SSDH's threshold from ADAPT_PAIRS random pairs i != j of features float [N, D]."""
        super().adapt(features)
        rng = np.random.default_rng(self.config.seed)
        first = rng.integers(0, len(features), ADAPT_PAIRS)
        second = (first + rng.integers(1, len(features), ADAPT_PAIRS)) % len(features)  # never first
        unit = features / np.maximum(np.linalg.norm(features.astype(np.float32), axis=1, keepdims=True), 1e-12)
        distances = np.concatenate([  # in chunks of pairs: two [P, D] gathers of every pair would take GBs
            1.0 - np.einsum("pd,pd->p", unit[first[i:i + 8192]], unit[second[i:i + 8192]], dtype=np.float64)
            for i in range(0, ADAPT_PAIRS, 8192)])
        self.similar_cosine.assign(1.0 - ssdh_similar_distance(distances, self.config.distillhash_alpha))

    def logged_names(self) -> list[str]:
        return ["loss", "kept_similar", "kept_dissimilar", "bit_mean"]

    def step_losses(self, features, seed) -> dict:
        h = self.hash_logits(features)
        labels, kept = distill_pairs(tbh_layers.pairwise_cosine(tf.cast(features, tf.float32)), self.similar_cosine,
                                     self.config.distillhash_neighbours)
        pairs = tf.cast(tf.size(kept) - tf.shape(kept)[0], tf.float32)
        return {"loss": pair_likelihood_loss(tf.tanh(h), labels, kept),
                "kept_similar": tf.reduce_sum(kept * labels) / pairs,  # fractions of the pairs i != j
                "kept_dissimilar": tf.reduce_sum(kept * (1.0 - labels)) / pairs,
                "bit_mean": tf.reduce_mean(tf.cast(h > 0, tf.float32))}

    def training_flops_per_example(self, replica_batch: int) -> float:
        """The hash layer and the batch products u u^T and x x^T (`batch_cosine_flops`), per example; the
        distillation's gathers are not matrix products."""
        return super().training_flops_per_example(replica_batch) + self.batch_cosine_flops(replica_batch)
