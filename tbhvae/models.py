"""The twin-bottleneck hashing model (TBH, TBH-VAE and the two mixed ablations).

One Keras subclassed model; the config picks each bottleneck:
  binary_bottleneck      "adversarial" (TBH: critic vs Bernoulli(0.5)^M) or
                         "betatcvae"  (TBH-VAE: Bernoulli VAE, decomposed KL)
  continuous_bottleneck  "adversarial" (TBH: critic on z' vs U(0, 1)^C) or
                         "geco_vae"   (TBH-VAE: Gaussian VAE under GECO)
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
class Forward:
    """Tensors of one training forward pass (shapes for a batch of B)."""

    target: tf.Tensor  # scaled input features [B, D]
    logits: tf.Tensor  # binary logits [B, M]
    codes: tf.Tensor  # sampled 0/1 codes [B, M] (thresholded at 0.5 when not training)
    z: tf.Tensor  # continuous code fed to the graph [B, C]
    z_mean: tf.Tensor | None  # Gaussian posterior mean [B, C] (geco_vae only)
    z_scale: tf.Tensor | None  # Gaussian posterior scale [B, C] (geco_vae only)
    z_graph: tf.Tensor  # graph-convolved code z' [B, C]
    reconstruction: tf.Tensor  # decoder output [B, D]


class Geco(keras.layers.Layer):
    """GECO state (Rezende & Viola 2018): Lagrange multiplier and constraint average.

    The constraint is relative, C = MSE / kappa^2 - 1 (0 when the error meets
    the tolerance), so nu and the bounds mean the same for any feature scale.
    lambda starts at D / 2, the weight that makes lambda * MSE / kappa^2 the
    Gaussian log-likelihood (std kappa) of a D-dimensional reconstruction, and
    stays within e^(+-range) of it. Variables are non-trainable with "mean"
    aggregation and are only assigned values identical on every replica.
    """

    def __init__(self, config: Config, input_dim: int, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.config = config
        self.log_lambda_init = float(np.log(input_dim / 2.0) + config.geco_log_lambda_offset)
        scalar = dict(shape=(), trainable=False, aggregation="mean")
        self.log_lambda = self.add_weight(
            initializer=keras.initializers.Constant(self.log_lambda_init), name="log_lambda", **scalar)
        self.constraint_average = self.add_weight(initializer="zeros", name="constraint_average", **scalar)
        # 0 until calibrated (geco_kappa = 0): the constraint is then relative to the batch's own MSE
        self.kappa_squared = self.add_weight(
            initializer=keras.initializers.Constant(config.geco_kappa ** 2), name="kappa_squared", **scalar)
        self.calibration_sum = self.add_weight(initializer="zeros", name="calibration_sum", **scalar)

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


class TwinBottleneckHashing(keras.Model):
    """Feature -> binary code b and continuous code z -> graph conv -> reconstruction.

    `encode(features)` is the deterministic test-time hash: bits = 1[logits > 0].
    Training runs through `train_step` (custom, distribution-aware).
    """

    def __init__(self, config: Config, input_dim: int, dataset_size: int, **kwargs):
        super().__init__(name=kwargs.pop("name", config.name), **kwargs)
        if config.binary_bottleneck == "betatcvae" and config.tc_estimator == "mss" and \
                dataset_size < config.batch_size:
            raise ValueError(f"the MSS estimator needs dataset_size >= batch_size ({config.batch_size}), "
                             f"got {dataset_size}; use a smaller batch or tc_estimator='mws'")
        self.config = config
        self.input_dim = input_dim
        self.dataset_size = dataset_size
        self.input_scaling = tbh_layers.InputScaling(config.input_scaling, input_dim, name="input_scaling")
        self.encoder_hidden = keras.layers.Dense(config.hidden_dim, activation="relu", name="encoder_hidden")
        self.binary_head = keras.layers.Dense(config.bits, name="binary_head")
        vae = config.continuous_bottleneck == "geco_vae"
        self.continuous_head = keras.layers.Dense(
            config.continuous_dim * (2 if vae else 1),
            activation=None if vae else config.continuous_activation, name="continuous_head")
        self.graph_convolution = tbh_layers.GraphConvolution(config.continuous_dim, name="graph_convolution")
        self.decoder_hidden = keras.layers.Dense(config.hidden_dim, activation="relu", name="decoder_hidden")
        self.decoder_output = keras.layers.Dense(
            input_dim, activation=None if config.decoder_activation == "linear" else "relu",
            name="decoder_output", dtype="float32")
        self.binary_critic = (tbh_layers.Discriminator(config.discriminator, config.discriminator_hidden,
                                                       name="binary_critic")
                              if config.binary_bottleneck == "adversarial" else None)
        self.continuous_critic = (tbh_layers.Discriminator(config.discriminator, config.discriminator_hidden,
                                                           name="continuous_critic")
                                  if config.continuous_bottleneck == "adversarial" else None)
        self.geco = Geco(config, input_dim, name="geco") if vae else None
        # at most one anchor per 10 training rows, so that small datasets keep populated anchors
        anchors = max(config.nearest_anchors + 1, min(config.anchors, dataset_size // 10))
        self.anchor_graph = (tbh_layers.AnchorGraph(anchors, config.nearest_anchors, input_dim,
                                                    name="anchor_graph")
                             if config.similarity_weight > 0 and config.similarity_target == "anchor" else None)
        self.term_trackers = {}
        self.actor_optimizer = None
        self.critic_optimizer = None

    # ------------------------------------------------------------------ build
    def adapt(self, features: np.ndarray) -> None:
        """Sets the constants derived from the training features float [N, D] (numpy).

        The input scaling's statistics and, with the anchor-graph target, the
        anchors (fitted on the scaled features); checkpoints hold both.
        """
        self.input_scaling.adapt(features)
        if self.anchor_graph is not None:
            scaled = np.concatenate([tf.cast(self.input_scaling(features[i:i + 8192]), tf.float32).numpy()
                                     for i in range(0, len(features), 8192)])
            self.anchor_graph.adapt(scaled, self.config.seed)

    def build_all(self) -> None:
        """Creates every variable (model and optimisers), e.g. before restoring a checkpoint."""
        if not self.built:
            self.forward(tf.zeros([2, self.input_dim]), tf.constant([0, 0], tf.int32), training=True)
            if self.binary_critic is not None:
                self.binary_critic(tf.zeros([2, self.config.bits]))
            if self.continuous_critic is not None:
                self.continuous_critic(tf.zeros([2, self.config.continuous_dim]))
            self.built = True
        if self.actor_optimizer is not None and not self.actor_optimizer.built:
            self.actor_optimizer.build(self.actor_variables)
        if self.critic_optimizer is not None and not self.critic_optimizer.built:
            self.critic_optimizer.build(self.critic_variables)

    @property
    def critics(self):
        return [c for c in (self.binary_critic, self.continuous_critic) if c is not None]

    @property
    def actor_variables(self):
        critic_ids = {id(v) for c in self.critics for v in c.trainable_variables}
        return [v for v in self.trainable_variables if id(v) not in critic_ids]

    @property
    def critic_variables(self):
        return [v for c in self.critics for v in c.trainable_variables]

    def compile(self, actor_optimizer, critic_optimizer=None, **kwargs):
        super().compile(**kwargs)
        self.actor_optimizer = actor_optimizer
        self.critic_optimizer = critic_optimizer if self.critics else None
        names = ["loss", "reconstruction", "mse"]
        if self.binary_critic is not None or self.continuous_critic is not None:
            names += ["critic_loss"]
        if self.binary_critic is not None:
            names += ["adversarial_binary"]
        if self.continuous_critic is not None:
            names += ["adversarial_continuous"]
        if self.config.binary_bottleneck == "betatcvae":
            names += ["mutual_information", "total_correlation", "dimensionwise_kl", "binary_kl"]
        if self.geco is not None:
            names += ["continuous_kl", "geco_constraint"]
        if self.config.similarity_weight > 0:
            names += ["similarity"]
        if self.config.decorrelation_weight > 0:
            names += ["decorrelation"]
        names += ["bit_mean"]
        self.term_trackers = {n: keras.metrics.Mean(name=n) for n in names}

    @property
    def metrics(self):
        return list(self.term_trackers.values())

    # --------------------------------------------------------------- forward
    def _hidden(self, features):
        return self.encoder_hidden(self.input_scaling(features))

    def encode(self, features):
        """Deterministic hash: features float [B, D] -> dict(bits uint8 [B, M], probs, logits)."""
        logits = tf.cast(self.binary_head(self._hidden(features)), tf.float32)
        return {"bits": tf.cast(logits > 0.0, tf.uint8), "probs": tf.sigmoid(logits), "logits": logits}

    def call(self, features, training=False):
        return self.encode(features)["bits"]

    def forward(self, features, seed, training=True) -> Forward:
        """Training pass; `seed` int32 [2] drives every random draw (stateless)."""
        config = self.config
        seeds = tf.random.experimental.stateless_split(seed, num=3)
        target = self.input_scaling(features)
        hidden = self.encoder_hidden(target)
        logits = tf.cast(self.binary_head(hidden), tf.float32)
        if config.binary_threshold == "uniform" and training:
            threshold = tf.random.stateless_uniform(tf.shape(logits), seed=seeds[0])
        else:
            threshold = tf.fill(tf.shape(logits), 0.5)
        codes, _ = tbh_layers.stochastic_binary(logits, threshold)
        continuous = self.continuous_head(hidden)
        z_mean = z_scale = None
        if self.geco is not None:
            z_mean, raw_scale = tf.split(tf.cast(continuous, tf.float32), 2, axis=1)
            z_scale = tf.nn.softplus(raw_scale) + 1e-4
            posterior = tfd.Normal(z_mean, z_scale)
            z = posterior.sample(seed=seeds[1]) if training else z_mean
        else:
            z = continuous
        adjacency = tbh_layers.hamming_adjacency(codes, config.graph_exponent)
        z_graph = self.graph_convolution(tf.cast(z, self.compute_dtype), adjacency)
        reconstruction = self.decoder_output(self.decoder_hidden(z_graph))
        return Forward(tf.cast(target, tf.float32), logits, codes, z, z_mean, z_scale,
                       z_graph, reconstruction)

    # ------------------------------------------------------------------ train
    def _step_seed(self, step):
        """A per-step, per-replica stateless seed int32 [2]."""
        replica = tf.distribute.get_replica_context()
        replica_id = tf.cast(replica.replica_id_in_sync_group, tf.int64) if replica else tf.constant(0, tf.int64)
        workers = tf.cast(self.distribute_strategy.num_replicas_in_sync, tf.int64)
        mixed = tf.cast(step, tf.int64) * workers + replica_id
        return tf.cast(tf.stack([self.config.seed, tf.math.floormod(mixed, 2 ** 31 - 1)]), tf.int32)

    def loss_terms(self, out: Forward, critic_inputs):
        """Per-replica loss terms, unscaled.

        Returns (actor mean-type part, actor batch-sum part, critic loss, dict of
        every term), all scalars.
        """
        config = self.config
        terms = {"reconstruction": objectives.reconstruction_loss(out.target, out.reconstruction,
                                                                  config.reconstruction),
                 "mse": objectives.reconstruction_loss(out.target, out.reconstruction, "mean")}
        actor = 0.0
        critic = 0.0
        if self.binary_critic is not None:
            real, fake = critic_inputs[0], out.codes
            adv = objectives.adversarial_loss(self.binary_critic(real), self.binary_critic(fake))
            terms["adversarial_binary"] = adv
            actor -= config.adversarial_weight * adv
            critic += adv
        if self.continuous_critic is not None:
            real, fake = critic_inputs[1], out.z_graph
            adv = objectives.adversarial_loss(self.continuous_critic(real), self.continuous_critic(fake))
            terms["adversarial_continuous"] = adv
            actor -= config.adversarial_weight * adv
            critic += adv
        if config.binary_bottleneck == "betatcvae":
            tc = objectives.tc_decomposition(out.codes, out.logits, self.dataset_size, config.tc_estimator,
                                             config.tc_marginals)
            terms.update(mutual_information=tc["mutual_information"], total_correlation=tc["total_correlation"],
                         dimensionwise_kl=tc["dimensionwise_kl"], binary_kl=tc["kl"])
            support = self.dataset_size if config.tc_estimator == "mss" else tf.shape(out.codes)[0]
            floor = objectives.tc_floor(config.bits, support) if config.tc_hinge else 0.0
            actor += config.binary_kl_weight * objectives.binary_regularizer(
                tc, config.tc_alpha, config.tc_beta, config.tc_gamma, floor)
        if config.similarity_weight > 0:
            terms["similarity"] = objectives.pairwise_similarity_loss(tf.tanh(out.logits / 2.0),
                                                                      self.similarity_target(out.target))
            # As a Gaussian log-likelihood per example: B - 1 pairs, each with the variance 1/M
            # that the similarity of two random codes has; so the weight means the same for any B, M.
            pairs = tf.cast(tf.shape(out.logits)[0] - 1, tf.float32)
            actor += config.similarity_weight * pairs * config.bits / 2.0 * terms["similarity"]
        if config.decorrelation_weight > 0:
            terms["decorrelation"] = objectives.decorrelation_loss(2.0 * out.codes - 1.0)
            actor += config.decorrelation_weight * terms["decorrelation"]
        if self.geco is not None:
            constraint_hat, constraint = self.geco.constraint(terms["mse"])
            terms["continuous_kl"] = objectives.gaussian_kl(out.z_mean, out.z_scale)
            terms["geco_constraint"] = constraint
            actor += tf.stop_gradient(self.geco.multiplier) * constraint_hat + terms["continuous_kl"]
            return actor, 0.0, critic, terms
        reconstruction = config.reconstruction_weight * terms["reconstruction"]
        if config.reconstruction == "sum":
            return actor, reconstruction, critic, terms
        return actor + reconstruction, 0.0, critic, terms

    def similarity_target(self, target):
        """Target code similarity T [B, B] of a batch of scaled features [B, D].

        clip(scale * centred cosine, -1, 1); with the anchor graph, the larger
        of that and the anchor-graph similarity (neighbourhood structure, as in
        AGH); then shifted so that its off-diagonal mean is 0.
        """
        target_similarity = tf.clip_by_value(
            self.config.similarity_scale * tbh_layers.centred_cosine_similarity(target), -1.0, 1.0)
        if self.anchor_graph is not None:
            target_similarity = tf.maximum(target_similarity, self.anchor_graph.similarity(target))
        # Balanced codes have mean similarity 0 over pairs; a target with a positive mean would
        # ask for a constant bit, so only its deviations from the mean over pairs are kept.
        off_diagonal = 1.0 - tf.eye(tf.shape(target_similarity)[0])
        mean = tf.reduce_sum(target_similarity * off_diagonal) / tf.reduce_sum(off_diagonal)
        return tf.stop_gradient(target_similarity - mean * off_diagonal)

    def train_step(self, features):
        config = self.config
        step = tf.convert_to_tensor(self.actor_optimizer.iterations)  # this step's index, before apply
        num_replicas = self.distribute_strategy.num_replicas_in_sync
        seed = self._step_seed(step)
        batch = tf.shape(features)[0]
        critic_inputs = None
        if self.critics:
            prior_seeds = tf.random.experimental.stateless_split(seed + 7919, num=2)
            critic_inputs = (
                tf.cast(tf.random.stateless_uniform([batch, config.bits], seed=prior_seeds[0]) < 0.5, tf.float32),
                tf.random.stateless_uniform([batch, config.continuous_dim], seed=prior_seeds[1]))
        with tf.GradientTape(persistent=bool(self.critics)) as tape:
            out = self.forward(features, seed, training=True)
            actor_mean, actor_sum, critic_loss, terms = self.loss_terms(out, critic_inputs)
            # Mean terms are divided by the replica count once; a batch-sum term is already
            # this replica's share of the global sum. The optimiser sums gradients over replicas.
            scaled_actor = actor_mean / num_replicas + actor_sum
            scaled_critic = critic_loss / num_replicas
        grads = tape.gradient(scaled_actor, self.actor_variables)
        self.actor_optimizer.apply_gradients(zip(grads, self.actor_variables))
        if self.critics:
            critic_grads = tape.gradient(scaled_critic, self.critic_variables)
            self.critic_optimizer.apply_gradients(zip(critic_grads, self.critic_variables))
            terms["critic_loss"] = critic_loss
        if self.geco is not None:
            replica = tf.distribute.get_replica_context()
            global_mse = replica.all_reduce("sum", terms["mse"]) / num_replicas if replica else terms["mse"]
            self.geco.update(step, global_mse)
        terms["loss"] = actor_mean + actor_sum
        terms["bit_mean"] = tf.reduce_mean(tf.cast(out.logits > 0, tf.float32))
        for name, tracker in self.term_trackers.items():
            tracker.update_state(terms[name])
        return {name: tracker.result() for name, tracker in self.term_trackers.items()}


def encode_features(model: TwinBottleneckHashing, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Deterministic codes of a feature matrix: float [N, D] -> 0/1 uint8 [N, M]."""
    encode = _compiled_encoder(model)
    parts = [encode(tf.constant(features[i:i + batch_size], tf.float32)).numpy()
             for i in range(0, len(features), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, model.config.bits), np.uint8)


def _compiled_encoder(model):
    if getattr(model, "_encode_fn", None) is None:
        model._encode_fn = tf.function(lambda x: model.encode(x)["bits"], reduce_retracing=True)
    return model._encode_fn
