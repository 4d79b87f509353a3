"""The objective of the twin-bottleneck model as objects: one class per term, each citing its source.

The model sums the `LossTerms` of its terms, one per role (see `build_terms`):
  Reconstruction          the autoencoder's squared error (TBH's decoder loss)
  binary bottleneck       AdversarialBinary (TBH) | BetaTcvaeBernoulli (TBH-VAE)
  continuous bottleneck   AdversarialContinuous (TBH) | GecoGaussian (TBH-VAE)
  code structure          SimilarityPreserving, Decorrelation (this library's additions; off by default)
Each term is a Keras layer (so its state is checkpointed) with
  names                          the values it logs; the model's metrics derive from them
  loss_terms(out, prior) -> LossTerms   its share of the losses on one replica's batch
  critic                         a Discriminator it trains against, or None; then also
    width, sample_prior(batch, seed)  the critic's input width and prior samples [B, width]
  updates, update(step, global_mse)   state changed after the optimiser step (GECO)
The continuous bottlenecks also shape the encoder: head() gives the continuous
head's units and activation, posterior(head output, seed, training) -> (z, mean, scale).
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tbhvae import layers as tbh_layers
from tbhvae import objectives
from tbhvae.config import Config

tfd = tfp.distributions

@dataclasses.dataclass
class LossTerms:
    """One replica's share of the losses, unscaled: scalars (or 0.0) and the logged values."""

    actor: tf.Tensor | float = 0.0  # encoder/decoder loss, a mean over the batch
    actor_sum: tf.Tensor | float = 0.0  # encoder/decoder loss that is a sum over this replica's rows
    critic: tf.Tensor | float = 0.0  # the critics' loss
    logged: dict = dataclasses.field(default_factory=dict)  # name -> scalar

    def __add__(self, other: "LossTerms") -> "LossTerms":
        return LossTerms(self.actor + other.actor, self.actor_sum + other.actor_sum, self.critic + other.critic,
                         {**self.logged, **other.logged})


class Term(keras.layers.Layer):
    """A loss term; subclasses set `names` and implement `loss_terms`."""

    names: tuple[str, ...] = ()
    critic = None
    updates = False  # True: `update` changes state after each optimiser step

    def __init__(self, config: Config, **kwargs):
        super().__init__(**kwargs)
        self.config = config

    def loss_terms(self, out, prior=None) -> LossTerms:
        """out: the model's `Forward`; prior: this term's critic's prior samples (or None)."""
        raise NotImplementedError

    def update(self, step, global_mse) -> None:
        """Called after the optimiser step with the all-reduced MSE; stateless terms do nothing."""


class Reconstruction(Term):
    """Squared reconstruction error, weighted (`reconstruction_weight`), as "sum" (TBH code) or "mean".

    With GECO the weight is GECO's multiplier instead, so `weighted=False` only logs it.
    """

    names = ("reconstruction", "mse")

    def __init__(self, config: Config, weighted: bool, **kwargs):
        super().__init__(config, **kwargs)
        self.weighted = weighted

    def loss_terms(self, out, prior=None) -> LossTerms:
        value = objectives.reconstruction_loss(out.target, out.reconstruction, self.config.reconstruction)
        terms = LossTerms(logged={"reconstruction": value, "mse": out.mse})
        if not self.weighted:
            return terms
        weighted = self.config.reconstruction_weight * value
        if self.config.reconstruction == "sum":  # tf.nn.l2_loss of the batch: already this replica's share
            return dataclasses.replace(terms, actor_sum=weighted)
        return dataclasses.replace(terms, actor=weighted)


class _Adversarial(Term):
    """TBH's adversarial prior (Shen et al. 2020, sec. 3.3): a critic tells prior samples from encodings;
    the encoder is rewarded (weight `adversarial_weight`) for fooling it."""

    def __init__(self, config: Config, **kwargs):
        super().__init__(config, **kwargs)
        self.critic = tbh_layers.Discriminator(config.discriminator, config.discriminator_hidden,
                                               name=f"{self.name}_critic")

    def encoded(self, out) -> tf.Tensor:
        raise NotImplementedError

    def loss_terms(self, out, prior=None) -> LossTerms:
        loss = objectives.adversarial_loss(self.critic(prior), self.critic(self.encoded(out)))
        return LossTerms(actor=-self.config.adversarial_weight * loss, critic=loss, logged={self.names[0]: loss})


class AdversarialBinary(_Adversarial):
    """Critic on the codes b [B, M] against Bernoulli(0.5)^M samples."""

    names = ("adversarial_binary",)

    @property
    def width(self) -> int:
        return self.config.bits

    def encoded(self, out):
        return out.codes

    def sample_prior(self, batch, seed):
        return tf.cast(tf.random.stateless_uniform([batch, self.width], seed=seed) < 0.5, tf.float32)


class AdversarialContinuous(_Adversarial):
    """Critic on the graph-convolved code z' [B, C] against U(0, 1)^C samples; z is the head's output."""

    names = ("adversarial_continuous",)

    def head(self) -> tuple[int, str]:
        """Units and activation of the encoder's continuous head."""
        return self.config.continuous_dim, self.config.continuous_activation

    def posterior(self, head_output, seed, training):
        """z [B, C] (and no Gaussian parameters) from the continuous head's output."""
        return head_output, None, None

    @property
    def width(self) -> int:
        return self.config.continuous_dim

    def encoded(self, out):
        return out.z_graph

    def sample_prior(self, batch, seed):
        return tf.random.stateless_uniform([batch, self.width], seed=seed)


class BetaTcvaeBernoulli(Term):
    """TBH-VAE's binary bottleneck: KL(q(b|x) || Bernoulli(0.5)^M) decomposed as in beta-TCVAE
    (Chen et al. 2018, eq. 2) into alpha * MI + beta * TC + gamma * DWKL, weighted by `binary_kl_weight`.

    With `tc_hinge` the TC of ideal codes, max(0, M log 2 - log S), is not penalised
    (S = N for the MSS estimator, B for MWS: the support of the estimated q(b)).
    """

    names = ("mutual_information", "total_correlation", "dimensionwise_kl", "binary_kl")

    def __init__(self, config: Config, dataset_size: int, **kwargs):
        if config.tc_estimator == "mss" and dataset_size < config.batch_size:
            raise ValueError(f"the MSS estimator needs dataset_size >= batch_size ({config.batch_size}), "
                             f"got {dataset_size}; use a smaller batch or tc_estimator='mws'")
        super().__init__(config, **kwargs)
        self.dataset_size = dataset_size

    def loss_terms(self, out, prior=None) -> LossTerms:
        config = self.config
        tc = objectives.tc_decomposition(out.codes, out.logits, self.dataset_size, config.tc_estimator,
                                         config.tc_marginals)
        support = self.dataset_size if config.tc_estimator == "mss" else tf.shape(out.codes)[0]
        floor = objectives.tc_floor(config.bits, support) if config.tc_hinge else 0.0
        penalty = objectives.binary_regularizer(tc, config.tc_alpha, config.tc_beta, config.tc_gamma, floor)
        return LossTerms(actor=config.binary_kl_weight * penalty,
                         logged={"mutual_information": tc["mutual_information"],
                                 "total_correlation": tc["total_correlation"],
                                 "dimensionwise_kl": tc["dimensionwise_kl"], "binary_kl": tc["kl"]})


class GecoGaussian(Term):
    """TBH-VAE's continuous bottleneck: a Gaussian VAE on z whose reconstruction is a constraint,
    minimised with GECO (Rezende & Viola 2018, algorithm 1): loss = lambda * C_hat + KL(q(z|x) || N(0, I)).

    The constraint is relative, C = MSE / kappa^2 - 1 (0 when the error meets the
    tolerance), so nu and the bounds mean the same for any feature scale.
    lambda starts at D / 2, the weight that makes lambda * MSE / kappa^2 the
    Gaussian log-likelihood (std kappa) of a D-dimensional reconstruction, and
    stays within e^(+-range) of it. The state is non-trainable with "mean"
    aggregation and only assigned values identical on every replica.
    """

    names = ("continuous_kl", "geco_constraint")
    updates = True

    def __init__(self, config: Config, input_dim: int, **kwargs):
        super().__init__(config, dtype="float32", **kwargs)
        self.log_lambda_init = float(np.log(input_dim / 2.0) + config.geco_log_lambda_offset)
        scalar = dict(shape=(), trainable=False, aggregation="mean")
        self.log_lambda = self.add_weight(
            initializer=keras.initializers.Constant(self.log_lambda_init), name="log_lambda", **scalar)
        self.constraint_average = self.add_weight(initializer="zeros", name="constraint_average", **scalar)
        # 0 until calibrated (geco_kappa = 0): the constraint is then relative to the batch's own MSE
        self.kappa_squared = self.add_weight(
            initializer=keras.initializers.Constant(config.geco_kappa ** 2), name="kappa_squared", **scalar)
        self.calibration_sum = self.add_weight(initializer="zeros", name="calibration_sum", **scalar)

    def head(self) -> tuple[int, str | None]:
        """Units and activation of the encoder's continuous head: mean and raw scale, [B, 2C]."""
        return 2 * self.config.continuous_dim, None

    def posterior(self, head_output, seed, training):
        """z ~ Normal(mean, softplus(raw) + 1e-4) [B, C] when training, else the mean; and (mean, scale)."""
        mean, raw_scale = tf.split(tf.cast(head_output, tf.float32), 2, axis=1)
        scale = tf.nn.softplus(raw_scale) + 1e-4
        z = tfd.Normal(mean, scale).sample(seed=seed) if training else mean
        return z, mean, scale

    @property
    def multiplier(self):
        return tf.exp(tf.convert_to_tensor(self.log_lambda))

    def _tolerance(self, mse):
        kappa_squared = tf.convert_to_tensor(self.kappa_squared)
        return tf.where(kappa_squared > 0.0, kappa_squared, tf.stop_gradient(mse))

    def constraint(self, mse):
        """C = MSE / kappa^2 - 1, with the value/gradient trick of GECO.

        Returns (C_hat, C): C_hat has C's gradient and C_ma's value.
        """
        constraint = mse / self._tolerance(mse) - 1.0
        average = tf.convert_to_tensor(self.constraint_average)
        return constraint + tf.stop_gradient(average - constraint), constraint

    def loss_terms(self, out, prior=None) -> LossTerms:
        constraint_hat, constraint = self.constraint(out.mse)
        kl = objectives.gaussian_kl(out.z_mean, out.z_scale)
        return LossTerms(actor=tf.stop_gradient(self.multiplier) * constraint_hat + kl,
                         logged={"continuous_kl": kl, "geco_constraint": constraint})

    def update(self, step, global_mse):
        """One GECO update from the all-reduced MSE of step `step` (read before the optimiser step)."""
        config = self.config
        step = tf.cast(step, tf.float32)
        if config.geco_kappa == 0.0:
            calibrating = step < config.geco_calibration_steps
            self.calibration_sum.assign_add(tf.where(calibrating, global_mse, 0.0))
            seen = tf.minimum(step + 1.0, float(config.geco_calibration_steps))
            self.kappa_squared.assign(config.geco_kappa_factor ** 2 * self.calibration_sum / seen)
        constraint = tf.stop_gradient(global_mse) / self._tolerance(global_mse) - 1.0
        average = tf.where(step < config.geco_warmup, constraint,
                           config.geco_alpha * self.constraint_average + (1.0 - config.geco_alpha) * constraint)
        self.constraint_average.assign(average)
        change = tf.clip_by_value(config.geco_rate * average, -config.geco_max_log_step, config.geco_max_log_step)
        log_lambda = tf.clip_by_value(self.log_lambda + change, self.log_lambda_init - config.geco_log_lambda_range,
                                      self.log_lambda_init + config.geco_log_lambda_range)
        self.log_lambda.assign(tf.where(step >= config.geco_warmup, log_lambda,
                                        tf.convert_to_tensor(self.log_lambda)))


class SimilarityPreserving(Term):
    """Code inner products pulled toward the features' neighbourhood structure (this library's addition).

    objectives.pairwise_similarity_loss on tanh(l / 2) = E[2b - 1], as a Gaussian
    log-likelihood per example: B - 1 pairs, each with the variance 1/M that the
    similarity of two random codes has, so `similarity_weight` means the same for any B, M.
    """

    names = ("similarity",)

    def __init__(self, config: Config, input_dim: int, dataset_size: int, **kwargs):
        super().__init__(config, **kwargs)
        # at most one anchor per 10 training rows, so that small datasets keep populated anchors
        anchors = max(config.nearest_anchors + 1, min(config.anchors, dataset_size // 10))
        self.anchor_graph = (tbh_layers.AnchorGraph(anchors, config.nearest_anchors, input_dim, name="anchor_graph")
                             if config.similarity_target == "anchor" else None)

    def adapt(self, scaled_features: np.ndarray) -> None:
        """Fits the anchor graph (if any) on the input-scaled training rows float [N, D]."""
        if self.anchor_graph is not None:
            self.anchor_graph.adapt(scaled_features, self.config.seed)

    def target(self, target):
        """Target code similarity T [B, B] of a batch of scaled features [B, D].

        clip(scale * centred cosine, -1, 1); with the anchor graph, the larger
        of that and the anchor-graph similarity (neighbourhood structure, as in
        AGH); then shifted so that its off-diagonal mean is 0.
        """
        similarity = tf.clip_by_value(
            self.config.similarity_scale * tbh_layers.centred_cosine_similarity(target), -1.0, 1.0)
        if self.anchor_graph is not None:
            similarity = tf.maximum(similarity, self.anchor_graph.similarity(target))
        # Balanced codes have mean similarity 0 over pairs; a target with a positive mean would
        # ask for a constant bit, so only its deviations from the mean over pairs are kept.
        off_diagonal = 1.0 - tf.eye(tf.shape(similarity)[0])
        mean = tf.reduce_sum(similarity * off_diagonal) / tf.reduce_sum(off_diagonal)
        return tf.stop_gradient(similarity - mean * off_diagonal)

    def loss_terms(self, out, prior=None) -> LossTerms:
        loss = objectives.pairwise_similarity_loss(tf.tanh(out.logits / 2.0), self.target(out.target))
        pairs = tf.cast(tf.shape(out.logits)[0] - 1, tf.float32)
        return LossTerms(actor=self.config.similarity_weight * pairs * self.config.bits / 2.0 * loss,
                         logged={"similarity": loss})


class Decorrelation(Term):
    """Batch decorrelation of the bits on 2b - 1 (this library's addition), weight `decorrelation_weight`."""

    names = ("decorrelation",)

    def loss_terms(self, out, prior=None) -> LossTerms:
        loss = objectives.decorrelation_loss(2.0 * out.codes - 1.0)
        return LossTerms(actor=self.config.decorrelation_weight * loss, logged={"decorrelation": loss})


TERM_ROLES = ("reconstruction", "binary_bottleneck", "continuous_bottleneck", "similarity", "decorrelation")


def build_terms(config: Config, input_dim: int, dataset_size: int) -> dict:
    """Role (TERM_ROLES) -> the Term `config` selects, or None for a term that is off."""
    geco = config.continuous_bottleneck == "geco_vae"
    return {
        "reconstruction": Reconstruction(config, weighted=not geco, name="reconstruction"),
        "binary_bottleneck": (BetaTcvaeBernoulli(config, dataset_size, name="binary_bottleneck")
                              if config.binary_bottleneck == "betatcvae" else AdversarialBinary(config, name="binary")),
        "continuous_bottleneck": (GecoGaussian(config, input_dim, name="geco") if geco
                                  else AdversarialContinuous(config, name="continuous")),
        "similarity": (SimilarityPreserving(config, input_dim, dataset_size, name="similarity")
                       if config.similarity_weight > 0 else None),
        "decorrelation": Decorrelation(config, name="decorrelation") if config.decorrelation_weight > 0 else None,
    }
