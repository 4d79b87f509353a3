"""Keras's Adam with its update as one fused TensorFlow kernel per variable.

Keras 3's Adam (TensorFlow backend) updates a variable with about ten
element-wise ops, each a pass over the variable and its two moments; on a CPU
they took a fifth of a TBH training step (BENCHMARKS.md, "Where a training step
goes"). `FusedAdam` runs the same update as TensorFlow's ResourceApplyAdam, one
pass (and one XLA op under jit_compile):
  m <- m + (1 - beta_1) (g - m),  v <- v + (1 - beta_2) (g^2 - v),
  var <- var - lr sqrt(1 - beta_2^t) / (1 - beta_1^t) m / (sqrt(v) + epsilon),
which is Keras's update line by line, with the same variables, so checkpoints of
either optimiser restore into the other. Sparse gradients and amsgrad take
Keras's own path.
"""
from __future__ import annotations

import keras
import tensorflow as tf


def _handle(variable):
    """The resource handle of a Keras or TensorFlow variable (the local copy inside a strategy's update)."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


class FusedAdam(keras.optimizers.Adam):
    """keras.optimizers.Adam whose dense update is tf.raw_ops.ResourceApplyAdam."""

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices) or keras.backend.backend() != "tensorflow":
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]), v=_handle(self._velocities[index]),
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype),
            beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))
