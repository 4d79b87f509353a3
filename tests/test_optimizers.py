"""FusedAdam: Keras's Adam update as one TensorFlow kernel, on one device and under MirroredStrategy."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tbhvae.train.optimizers import FusedAdam


def _train(optimizer_class, strategy, steps=6, **kwargs):
    """A [30, 20] kernel and a [20] bias trained with gradients that depend on the step and the weights."""
    rng = np.random.default_rng(0)
    with strategy.scope():
        kernel = keras.Variable(rng.normal(size=(30, 20)).astype(np.float32))
        bias = keras.Variable(rng.normal(size=(20,)).astype(np.float32))
        optimizer = optimizer_class(learning_rate=0.05, **kwargs)
        optimizer.build([kernel, bias])  # as the trainer does: not lazily inside strategy.run

    def replica_step():
        scale = tf.cast(optimizer.iterations + 1, tf.float32)
        optimizer.apply_gradients([(tf.sin(kernel * scale), kernel), (tf.cos(bias) * scale, bias)])

    step = tf.function(lambda: strategy.run(replica_step))
    for _ in range(steps):
        step()
    return kernel, bias, optimizer


@pytest.mark.parametrize("replicas", [1, 2])
def test_fused_adam_takes_the_same_steps_as_keras_adam(replicas):
    from conftest import two_cpu_replicas
    strategy = two_cpu_replicas() if replicas == 2 else tf.distribute.get_strategy()
    reference = _train(keras.optimizers.Adam, strategy)
    fused = _train(FusedAdam, strategy)
    start = np.random.default_rng(0).normal(size=(30, 20))
    assert np.abs(reference[0].numpy() - start).max() > 0.1  # the weights moved
    for expected, actual in zip([*reference[2].variables, *reference[:2]], [*fused[2].variables, *fused[:2]]):
        np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-5)
    if replicas == 2:  # every replica holds the same copy
        for variable in fused[:2]:
            copies = [np.asarray(v) for v in strategy.experimental_local_results(variable.value)]
            np.testing.assert_array_equal(copies[0], copies[1])


def test_fused_adam_under_xla_and_with_amsgrad_matches_keras_adam():
    for kwargs in ({}, {"amsgrad": True}):
        reference = _train(keras.optimizers.Adam, tf.distribute.get_strategy(), **kwargs)
        fused = _train(FusedAdam, tf.distribute.get_strategy(), **kwargs)
        np.testing.assert_allclose(fused[0].numpy(), reference[0].numpy(), rtol=1e-5, atol=1e-5)

    kernel = keras.Variable(np.ones((4, 3), np.float32))
    optimizer = FusedAdam(learning_rate=0.1)
    compiled = tf.function(lambda: optimizer.apply_gradients([(tf.fill([4, 3], 2.0), kernel)]), jit_compile=True)
    compiled()
    np.testing.assert_allclose(kernel.numpy(), 0.9, rtol=1e-5)  # Adam's first step is lr * sign(g)


def test_checkpoints_of_keras_adam_restore_into_fused_adam(tmp_path):
    kernel, bias, optimizer = _train(keras.optimizers.Adam, tf.distribute.get_strategy())
    path = tf.train.Checkpoint(optimizer=optimizer, kernel=kernel.value).save(str(tmp_path / "ckpt"))
    restored = FusedAdam(learning_rate=0.05)
    target = keras.Variable(np.zeros((30, 20), np.float32))
    bias_target = keras.Variable(np.zeros((20,), np.float32))
    restored.build([target, bias_target])
    tf.train.Checkpoint(optimizer=restored, kernel=target.value).restore(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(target.numpy(), kernel.numpy())
    for expected, actual in zip(optimizer.variables, restored.variables):
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))
