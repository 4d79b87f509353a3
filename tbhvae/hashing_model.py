"""What the trainer, the monitor and the exporter ask of a deep hashing model.

`HashingModel` is a keras.Model over float32 features [B, D] with a binary head
of `config.bits` logits: the deterministic hash is bits = 1[logits > 0]. A model
family implements `hash_logits` (features -> logits [B, M]) and `step_losses`
(one training pass -> named scalars, "loss" among them); the trainer calls
`adapt`, `compile`, `build_all` and `fit`, and checkpoints the model with its
optimisers. Families with critics or optimiser-side state (TBH, TBH-VAE)
override `train_step`.

`create_model(config, ...)` builds the family that `config.model` names.
"""
from __future__ import annotations

import importlib

import keras
import numpy as np
import tensorflow as tf

from tbhvae import layers as tbh_layers
from tbhvae.config import Config


class HashingModel(keras.Model):
    """Features float32 [B, D] -> 0/1 codes uint8 [B, M]; trained by `train_step`."""

    def __init__(self, config: Config, input_dim: int, dataset_size: int, **kwargs):
        super().__init__(name=kwargs.pop("name", config.name), **kwargs)
        self.config = config
        self.input_dim = input_dim
        self.dataset_size = dataset_size
        self.term_trackers = {}
        self.actor_optimizer = None
        self.critic_optimizer = None

    # ----------------------------------------------------------- the hooks
    def hash_logits(self, features) -> tf.Tensor:
        """Binary-head logits float32 [B, M] of features float [B, D] (test time: no sampling)."""
        raise NotImplementedError

    def step_losses(self, features, seed) -> dict:
        """One training pass over a replica's batch: name -> scalar, with "loss" the one minimised
        (a per-replica mean; `train_step` divides it by the replica count) and "bit_mean"."""
        raise NotImplementedError

    def adapt(self, features: np.ndarray) -> None:
        """Sets the constants derived from the training features float [N, D] (none by default). They
        must be variables of the model: a resumed run restores them from its checkpoint and skips this."""

    @property
    def critics(self) -> list:
        """Adversarial critics trained by `critic_optimizer` (none by default)."""
        return []

    @property
    def geco(self):
        """GECO state logged by the monitor, or None."""
        return None

    # ----------------------------------------------------- what is shared
    def logged_names(self) -> list[str]:
        """Names of the scalars `train_step` returns (the keys of `step_losses`)."""
        return ["loss", "bit_mean"]

    @property
    def actor_variables(self):
        critic_ids = {id(v) for c in self.critics for v in c.trainable_variables}
        return [v for v in self.trainable_variables if id(v) not in critic_ids]

    @property
    def critic_variables(self):
        return [v for c in self.critics for v in c.trainable_variables]

    def build_all(self) -> None:
        """Creates every variable (model and optimisers), e.g. before restoring a checkpoint."""
        if not self.built:
            self.build_variables()
            self.built = True
        if self.actor_optimizer is not None and not self.actor_optimizer.built:
            self.actor_optimizer.build(self.actor_variables)
        if self.critic_optimizer is not None and not self.critic_optimizer.built:
            self.critic_optimizer.build(self.critic_variables)

    def build_variables(self) -> None:
        """Creates the model's own variables (a forward pass on a dummy batch)."""
        self.hash_logits(tf.zeros([2, self.input_dim]))

    def compile(self, actor_optimizer, critic_optimizer=None, **kwargs):
        super().compile(**kwargs)
        self.actor_optimizer = actor_optimizer
        self.critic_optimizer = critic_optimizer if self.critics else None
        self.term_trackers = {n: keras.metrics.Mean(name=n) for n in self.logged_names()}

    @property
    def metrics(self):
        return list(self.term_trackers.values())

    def encode(self, features):
        """Deterministic hash: features float [B, D] -> dict(bits uint8 [B, M], probs, logits)."""
        logits = self.hash_logits(features)
        return {"bits": tf.cast(logits > 0.0, tf.uint8), "probs": tf.sigmoid(logits), "logits": logits}

    def call(self, features, training=False):
        return self.encode(features)["bits"]

    def _step_seed(self, step):
        """A per-step, per-replica stateless seed int32 [2]."""
        replica = tf.distribute.get_replica_context()
        replica_id = tf.cast(replica.replica_id_in_sync_group, tf.int64) if replica else tf.constant(0, tf.int64)
        workers = tf.cast(self.distribute_strategy.num_replicas_in_sync, tf.int64)
        mixed = tf.cast(step, tf.int64) * workers + replica_id
        return tf.cast(tf.stack([self.config.seed, tf.math.floormod(mixed, 2 ** 31 - 1)]), tf.int32)

    def _track(self, logged: dict) -> dict:
        for name, tracker in self.term_trackers.items():
            tracker.update_state(logged[name])
        return {name: tracker.result() for name, tracker in self.term_trackers.items()}

    def train_step(self, features):
        """One actor update on `step_losses`' "loss", a per-replica mean divided by the replica
        count once (the optimiser sums the replicas' gradients)."""
        seed = self._step_seed(tf.convert_to_tensor(self.actor_optimizer.iterations))
        with tf.GradientTape() as tape:
            logged = self.step_losses(features, seed)
            scaled = logged["loss"] / self.distribute_strategy.num_replicas_in_sync
        grads = tape.gradient(scaled, self.actor_variables)
        self.actor_optimizer.apply_gradients(zip(grads, self.actor_variables))
        return self._track(logged)

    def training_flops_per_example(self, replica_batch: int) -> float:
        """FLOP of one training step per example from the Dense kernels: 3 x 2 x MACs (forward and
        a backward of about twice the forward). Families add their batch products. Needs a built model."""
        return 6.0 * sum(int(np.prod(v.shape)) for v in self.trainable_variables if len(v.shape) == 2)


class LinearHashModel(HashingModel):
    """A hash head on fixed features: the input scaling, then one Dense layer of M logits; bits = 1[h > 0].

    The families whose papers fine-tune a CNN under such a head (GreedyHash, PseudoLabel, DistillHash)
    train it here on frozen features; they add their losses (and any constants of their own).
    """

    def __init__(self, config: Config, input_dim: int, dataset_size: int, **kwargs):
        super().__init__(config, input_dim, dataset_size, **kwargs)
        self.scaling = tbh_layers.InputScaling(config.input_scaling, input_dim, name="input_scaling")
        self.hash_layer = keras.layers.Dense(config.bits, name="hash_layer")  # h = x W + c

    def adapt(self, features: np.ndarray) -> None:
        self.scaling.adapt(features)

    def hash_logits(self, features):
        return tf.cast(self.hash_layer(self.scaling(features)), tf.float32)

    def batch_cosine_flops(self, replica_batch: int) -> float:
        """Per example, for families matching code to feature similarities within the batch: the code
        products [B, M] x [M, B] (trained, 3 x 2 x B M) and the feature cosines [B, D] x [D, B] (forward
        only, 2 x B D)."""
        return 6.0 * replica_batch * self.config.bits + 2.0 * replica_batch * self.input_dim


# config.model -> (module, class) of the family; imported on use (the families import this module)
FAMILIES = {
    "twin_bottleneck": ("tbhvae.models", "TwinBottleneckHashing"),
    "greedyhash": ("tbhvae.greedyhash", "GreedyHash"),
    "sgh": ("tbhvae.sgh", "StochasticGenerativeHashing"),
    "pseudolabel": ("tbhvae.pseudolabel", "PseudoLabelHashing"),
    "distillhash": ("tbhvae.distillhash", "DistillHash"),
}


def create_model(config: Config, input_dim: int, dataset_size: int) -> HashingModel:
    """The model family `config.model` for D = `input_dim` features and N = `dataset_size` training rows."""
    module, name = FAMILIES[config.model]
    return getattr(importlib.import_module(module), name)(config, input_dim, dataset_size)


def encode_features(model: HashingModel, features: np.ndarray, batch_size: int = 4096,
                    output: str = "bits") -> np.ndarray:
    """Deterministic codes of a feature matrix: float [N, D] -> 0/1 uint8 [N, M], or with `output`
    "logits" / "probs" that output of `HashingModel.encode`, float32 [N, M]."""
    encode = _compiled_encoder(model, output)
    parts = [encode(tf.constant(features[i:i + batch_size], tf.float32)).numpy()
             for i in range(0, len(features), batch_size)]
    empty_dtype = np.uint8 if output == "bits" else np.float32
    return np.concatenate(parts) if parts else np.zeros((0, model.config.bits), empty_dtype)


def _compiled_encoder(model, output: str):
    """`model.encode(x)[output]` as a tf.function, made once per model and output."""
    if getattr(model, "_encode_fns", None) is None:
        model._encode_fns = {}
    if output not in model._encode_fns:
        model._encode_fns[output] = tf.function(lambda x: model.encode(x)[output], reduce_retracing=True)
    return model._encode_fns[output]
