"""The twin-bottleneck hashing model (TBH, TBH-VAE and the two mixed ablations).

  features x [B, D] -> Encoder -> binary logits l [B, M], continuous head
  b = 1[sigmoid(l) > eps] (straight-through), z from the continuous bottleneck
  z' = GraphConvolution(z, A(b)), A from the Hamming similarities of the batch's codes
  Decoder(z') -> reconstruction [B, D]
The loss is the sum of the terms in `tbhvae.bottlenecks` that the config selects.
"""
from __future__ import annotations

import dataclasses
import functools

import keras
import numpy as np
import tensorflow as tf

from tbhvae import bottlenecks, objectives
from tbhvae import layers as tbh_layers
from tbhvae.config import Config
from tbhvae.hashing_model import HashingModel


@dataclasses.dataclass
class Forward:
    """Tensors of one training forward pass (shapes for a batch of B)."""

    target: tf.Tensor  # scaled input features [B, D]
    logits: tf.Tensor  # binary logits [B, M]
    codes: tf.Tensor  # sampled 0/1 codes [B, M] (thresholded at 0.5 when not training)
    z_mean: tf.Tensor | None  # Gaussian posterior mean [B, C] (geco_vae only)
    z_scale: tf.Tensor | None  # Gaussian posterior scale [B, C] (geco_vae only)
    z_graph: tf.Tensor  # graph-convolved code z' [B, C]
    reconstruction: tf.Tensor  # decoder output [B, D]

    @functools.cached_property
    def mse(self) -> tf.Tensor:
        """Mean squared reconstruction error per element (scalar)."""
        return objectives.reconstruction_loss(self.target, self.reconstruction, "mean")


class Encoder(keras.layers.Layer):
    """Scaled features [B, D] -> (binary logits float32 [B, M], continuous head output [B, units])."""

    def __init__(self, config: Config, input_dim: int, continuous_units: int, continuous_activation, **kwargs):
        super().__init__(**kwargs)
        self.scaling = tbh_layers.InputScaling(config.input_scaling, input_dim, name="input_scaling")
        self.hidden = keras.layers.Dense(config.hidden_dim, activation="relu", name="encoder_hidden")
        self.binary_head = keras.layers.Dense(config.bits, name="binary_head")
        self.continuous_head = keras.layers.Dense(continuous_units, activation=continuous_activation,
                                                  name="continuous_head")

    def logits(self, scaled):
        return tf.cast(self.binary_head(self.hidden(scaled)), tf.float32)

    def call(self, scaled):
        hidden = self.hidden(scaled)
        return tf.cast(self.binary_head(hidden), tf.float32), self.continuous_head(hidden)


class Decoder(keras.layers.Layer):
    """z' [B, C] -> reconstruction float32 [B, D] (ReLU output as the reference code, or linear).

    Both layers compute in the policy's dtype (the output layer is the model's
    largest); only the reconstruction is cast to float32 for the loss.
    """

    def __init__(self, config: Config, input_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(config.hidden_dim, activation="relu", name="decoder_hidden")
        self.output_layer = keras.layers.Dense(
            input_dim, activation=None if config.decoder_activation == "linear" else "relu",
            name="decoder_output")

    def call(self, z_graph):
        return tf.cast(self.output_layer(self.hidden(z_graph)), tf.float32)


class TwinBottleneckHashing(HashingModel):
    """Feature -> binary code b and continuous code z -> graph conv -> reconstruction.

    `encode(features)` is the deterministic test-time hash: bits = 1[logits > 0].
    Training runs through `train_step` (custom, distribution-aware: critics and GECO).
    """

    def __init__(self, config: Config, input_dim: int, dataset_size: int, **kwargs):
        super().__init__(config, input_dim, dataset_size, **kwargs)
        # one attribute per role (not a list), so that tf.train.Checkpoint tracks every term's state
        terms = bottlenecks.build_terms(config, input_dim, dataset_size)
        self.reconstruction = terms["reconstruction"]
        self.binary_bottleneck = terms["binary_bottleneck"]
        self.continuous_bottleneck = terms["continuous_bottleneck"]
        self.similarity = terms["similarity"]  # None when similarity_weight = 0
        self.decorrelation = terms["decorrelation"]  # None when decorrelation_weight = 0
        self.encoder = Encoder(config, input_dim, *self.continuous_bottleneck.head(), name="encoder")
        self.graph_convolution = tbh_layers.GraphConvolution(config.continuous_dim, name="graph_convolution")
        self.decoder = Decoder(config, input_dim, name="decoder")

    @property
    def terms(self) -> list[bottlenecks.Term]:
        """The loss terms that are on, in the order of bottlenecks.TERM_ROLES."""
        return [term for term in (getattr(self, role) for role in bottlenecks.TERM_ROLES) if term is not None]

    @property
    def geco(self) -> bottlenecks.GecoGaussian | None:
        """The GECO state (TBH-VAE's continuous bottleneck), or None."""
        term = self.continuous_bottleneck
        return term if isinstance(term, bottlenecks.GecoGaussian) else None

    # ------------------------------------------------------------------ build
    def adapt(self, features: np.ndarray) -> None:
        """Sets the constants derived from the training features float [N, D] (numpy).

        The input scaling's statistics and, with the anchor-graph target, the
        anchors (fitted on the scaled features); checkpoints hold both.
        """
        self.encoder.scaling.adapt(features)
        if self.similarity is not None and self.similarity.anchor_graph is not None:
            self.similarity.adapt(np.concatenate([tf.cast(self.encoder.scaling(features[i:i + 8192]),
                                                          tf.float32).numpy()
                                                  for i in range(0, len(features), 8192)]))

    def build_variables(self) -> None:
        self.forward(tf.zeros([2, self.input_dim]), tf.constant([0, 0], tf.int32), training=True)
        for term in self.terms:
            if term.critic is not None:
                term.critic(tf.zeros([2, term.width]))

    @property
    def critics(self):
        return [t.critic for t in self.terms if t.critic is not None]

    def logged_names(self) -> list[str]:
        return ["loss", *(name for term in self.terms for name in term.names),
                *(["critic_loss"] if self.critics else []), "bit_mean"]

    def training_flops_per_example(self, replica_batch: int) -> float:
        """FLOP of one training step per example, counting the matrix products only.

        Trained products cost 3 x 2 x MACs (forward + backward ~ 2 x forward):
        every Dense kernel [in, out] once (critics twice: a real and a fake
        batch), the two batch-graph products b b^T ([B, M] x [M, B]) and A z
        ([B, B] x [B, C]), B (M + C) MACs per example, and with the similarity
        term its two [B, M] x [M, B] products, 2 B M. The similarity target is
        forward only, 2 x MACs: the batch cosine B D and the anchor affinities
        D x anchors. Needs a built model.
        """
        critic_ids = {id(v) for v in self.critic_variables}
        kernels = [v for v in self.trainable_variables if len(v.shape) == 2]
        dense = sum(int(np.prod(v.shape)) * (2 if id(v) in critic_ids else 1) for v in kernels)
        trained = dense + replica_batch * (self.config.bits + self.config.continuous_dim)
        target = 0
        if self.similarity is not None:
            trained += 2 * replica_batch * self.config.bits
            target = replica_batch * self.input_dim
            if self.similarity.anchor_graph is not None:
                target += self.input_dim * self.similarity.anchor_graph.centres.shape[0]
        return 6.0 * trained + 2.0 * target

    # --------------------------------------------------------------- forward
    def hash_logits(self, features):
        return self.encoder.logits(self.encoder.scaling(features))

    def forward(self, features, seed, training=True) -> Forward:
        """Training pass; `seed` int32 [2] drives every random draw (stateless)."""
        seeds = tf.random.experimental.stateless_split(seed, num=2)
        target = self.encoder.scaling(features)
        logits, continuous = self.encoder(target)
        if self.config.binary_threshold == "uniform" and training:
            threshold = tf.random.stateless_uniform(tf.shape(logits), seed=seeds[0])
        else:
            threshold = tf.fill(tf.shape(logits), 0.5)
        codes, _ = tbh_layers.stochastic_binary(logits, threshold)
        z, z_mean, z_scale = self.continuous_bottleneck.posterior(continuous, seeds[1], training)
        adjacency = tbh_layers.hamming_adjacency(codes, self.config.graph_exponent)
        z_graph = self.graph_convolution(tf.cast(z, self.compute_dtype), adjacency)
        return Forward(tf.cast(target, tf.float32), logits, codes, z_mean, z_scale, z_graph,
                       self.decoder(z_graph))

    # ------------------------------------------------------------------ train
    def prior_samples(self, batch, seed) -> dict:
        """Term name -> prior samples [B, width] for the critic of each adversarial bottleneck."""
        seeds = tf.random.experimental.stateless_split(seed + 7919, num=2)  # binary, continuous
        return {t.name: t.sample_prior(batch, seeds[i])
                for i, t in enumerate((self.binary_bottleneck, self.continuous_bottleneck)) if t.critic is not None}

    def loss_terms(self, out: Forward, priors: dict | None = None) -> bottlenecks.LossTerms:
        """Per-replica loss terms, unscaled: the sum of every term's LossTerms."""
        priors = priors or {}
        total = bottlenecks.LossTerms()
        for term in self.terms:
            total += term.loss_terms(out, priors.get(term.name))
        return total

    def train_step(self, features):
        step = tf.convert_to_tensor(self.actor_optimizer.iterations)  # this step's index, before apply
        num_replicas = self.distribute_strategy.num_replicas_in_sync
        seed = self._step_seed(step)
        priors = self.prior_samples(tf.shape(features)[0], seed) if self.critics else {}
        with tf.GradientTape(persistent=bool(self.critics)) as tape:
            out = self.forward(features, seed, training=True)
            losses = self.loss_terms(out, priors)
            # Mean terms are divided by the replica count once; a batch-sum term is already
            # this replica's share of the global sum. The optimiser sums gradients over replicas.
            scaled_actor = losses.actor / num_replicas + losses.actor_sum
            scaled_critic = losses.critic / num_replicas
        grads = tape.gradient(scaled_actor, self.actor_variables)
        self.actor_optimizer.apply_gradients(zip(grads, self.actor_variables))
        logged = dict(losses.logged)
        if self.critics:
            critic_grads = tape.gradient(scaled_critic, self.critic_variables)
            self.critic_optimizer.apply_gradients(zip(critic_grads, self.critic_variables))
            logged["critic_loss"] = losses.critic
        updated = [t for t in self.terms if t.updates]
        if updated:
            replica = tf.distribute.get_replica_context()
            global_mse = replica.all_reduce("sum", out.mse) / num_replicas if replica else out.mse
            for term in updated:
                term.update(step, global_mse)
        logged["loss"] = losses.actor + losses.actor_sum
        logged["bit_mean"] = tf.reduce_mean(tf.cast(out.logits > 0, tf.float32))
        return self._track(logged)

