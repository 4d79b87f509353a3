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
    codes: tf.Tensor  # sampled codes [B, M] (0/1, or relaxed in (0, 1))
    z: tf.Tensor  # continuous code fed to the graph [B, C]
    z_mean: tf.Tensor | None  # Gaussian posterior mean [B, C] (geco_vae only)
    z_scale: tf.Tensor | None  # Gaussian posterior scale [B, C] (geco_vae only)
    z_graph: tf.Tensor  # graph-convolved code z' [B, C]
    reconstruction: tf.Tensor  # decoder output [B, D]


class Geco(keras.layers.Layer):
    """GECO state (Rezende & Viola 2018): Lagrange multiplier and constraint average.

    Variables are non-trainable with "mean" aggregation; they are only
    assigned values that are already identical on every replica.
    """

    def __init__(self, config: Config, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.config = config
        scalar = dict(shape=(), trainable=False, aggregation="mean")
        self.log_lambda = self.add_weight(
            initializer=keras.initializers.Constant(config.geco_log_lambda_init), name="log_lambda", **scalar)
        self.constraint_average = self.add_weight(initializer="zeros", name="constraint_average", **scalar)
        self.kappa_squared = self.add_weight(
            initializer=keras.initializers.Constant(config.geco_kappa ** 2), name="kappa_squared", **scalar)
        self.calibration_sum = self.add_weight(initializer="zeros", name="calibration_sum", **scalar)

    @property
    def multiplier(self):
        return tf.exp(tf.convert_to_tensor(self.log_lambda))

    def constraint(self, mse):
        """C = MSE - kappa^2 (feature units^2), with the value/gradient trick of GECO.

        Returns (C_hat, C): C_hat has C's gradient and C_ma's value once the
        moving average has started.
        """
        constraint = mse - tf.convert_to_tensor(self.kappa_squared)
        average = tf.convert_to_tensor(self.constraint_average)
        return constraint + tf.stop_gradient(average - constraint), constraint

    def update(self, step, global_mse):
        """One GECO update from the all-reduced MSE of this step (same on every replica)."""
        config = self.config
        step = tf.cast(step, tf.float32)
        if config.geco_kappa == 0.0:
            calibrating = step < config.geco_calibration_steps
            self.calibration_sum.assign_add(tf.where(calibrating, global_mse, 0.0))
            calibrated = config.geco_kappa_factor ** 2 * self.calibration_sum / config.geco_calibration_steps
            self.kappa_squared.assign(tf.where(
                step + 1 >= config.geco_calibration_steps, calibrated, tf.convert_to_tensor(self.kappa_squared)))
        constraint = tf.stop_gradient(global_mse) - self.kappa_squared
        average = tf.where(step < config.geco_warmup, constraint,
                           config.geco_alpha * self.constraint_average + (1.0 - config.geco_alpha) * constraint)
        self.constraint_average.assign(average)
        log_lambda = tf.clip_by_value(self.log_lambda + config.geco_rate * average,
                                      -config.geco_log_lambda_max, config.geco_log_lambda_max)
        self.log_lambda.assign(tf.where(step >= config.geco_warmup, log_lambda,
                                        tf.convert_to_tensor(self.log_lambda)))


class TwinBottleneckHashing(keras.Model):
    """Feature -> binary code b and continuous code z -> graph conv -> reconstruction.

    `encode(features)` is the deterministic test-time hash: bits = 1[logits > 0].
    Training runs through `train_step` (custom, distribution-aware).
    """

    def __init__(self, config: Config, input_dim: int, dataset_size: int = 1, **kwargs):
        super().__init__(name=kwargs.pop("name", config.name), **kwargs)
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
        self.geco = Geco(config, name="geco") if vae else None
        self.term_trackers = {}
        self.actor_optimizer = None
        self.critic_optimizer = None

    # ------------------------------------------------------------------ build
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
        if config.binary_sampling == "relaxed":
            codes = tfd.RelaxedBernoulli(config.relaxed_temperature, logits=logits).sample(seed=seeds[0])
        else:
            if config.binary_threshold == "uniform":
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
            tc = objectives.tc_decomposition(out.codes, out.logits, self.dataset_size, config.tc_estimator)
            terms.update(mutual_information=tc["mutual_information"], total_correlation=tc["total_correlation"],
                         dimensionwise_kl=tc["dimensionwise_kl"], binary_kl=tc["kl"])
            actor += config.binary_kl_weight * (config.tc_alpha * tc["mutual_information"]
                                                + config.tc_beta * tc["total_correlation"]
                                                + config.tc_gamma * tc["dimensionwise_kl"])
        if self.geco is not None:
            constraint_hat, constraint = self.geco.constraint(terms["mse"])
            terms["continuous_kl"] = objectives.gaussian_kl(out.z_mean, out.z_scale)
            terms["geco_constraint"] = constraint
            actor += tf.stop_gradient(self.geco.multiplier) * constraint_hat + terms["continuous_kl"]
            return actor, 0.0, critic, terms
        if config.reconstruction == "sum":
            return actor, terms["reconstruction"], critic, terms
        return actor + terms["reconstruction"], 0.0, critic, terms

    def train_step(self, features):
        config = self.config
        step = self.actor_optimizer.iterations
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
