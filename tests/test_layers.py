import numpy as np
import pytest
import tensorflow as tf

from tbhvae import layers


def test_straight_through_gradient_matches_formula():
    logits = tf.constant([[0.3, -1.2, 2.0], [-0.1, 0.0, 0.7]])
    threshold = tf.constant([[0.5, 0.5, 0.9], [0.2, 0.5, 0.5]])
    w_codes = tf.constant([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]])
    w_probs = tf.constant([[0.2, 0.4, -0.3], [1.0, 0.0, 2.0]])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        codes, probs = layers.stochastic_binary(logits, threshold)
        loss = tf.reduce_sum(w_codes * codes) + tf.reduce_sum(w_probs * probs)
    grad = tape.gradient(loss, logits).numpy()
    p = 1 / (1 + np.exp(-logits.numpy()))
    np.testing.assert_allclose(codes.numpy(), (p > threshold.numpy()).astype(np.float32))
    np.testing.assert_allclose(grad, p * (1 - p) * (w_codes.numpy() + w_probs.numpy()), rtol=1e-6)


@pytest.mark.parametrize("exponent", [1.0, 1.4])
def test_adjacency_and_normalisation_match_numpy(exponent):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2, (7, 16)).astype(np.float32)
    adjacency = layers.hamming_adjacency(tf.constant(codes), exponent).numpy()
    hamming = (codes[:, None, :] != codes[None, :, :]).sum(-1)
    expected = (1 - hamming / 16) ** exponent
    np.testing.assert_allclose(adjacency, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.diag(adjacency), 1.0, rtol=1e-6)
    degree = expected.sum(1)
    normalised = expected / np.sqrt(degree)[:, None] / np.sqrt(degree)[None, :]
    np.testing.assert_allclose(layers.normalize_adjacency(tf.constant(expected)).numpy(), normalised,
                               rtol=1e-5, atol=1e-6)


def test_graph_convolution_is_normalised_propagation():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(5, 3)).astype(np.float32)
    adjacency = layers.hamming_adjacency(tf.constant(rng.integers(0, 2, (5, 8)).astype(np.float32)), 1.0)
    conv = layers.GraphConvolution(4, activation=None)
    out = conv(tf.constant(values), adjacency).numpy()
    kernel, bias = (w.numpy() for w in conv.dense.weights)
    expected = layers.normalize_adjacency(adjacency).numpy() @ (values @ kernel + bias)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_input_scaling_modes():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(200, 6)).astype(np.float32)
    standardize = layers.InputScaling("standardize", 6)
    standardize.adapt(x)
    y = standardize(tf.constant(x)).numpy()
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(y.std(0), 1, atol=1e-2)
    l2 = layers.InputScaling("l2", 6)(tf.constant(x)).numpy()
    np.testing.assert_allclose(np.linalg.norm(l2, axis=1), np.sqrt(6), rtol=1e-5)
    np.testing.assert_array_equal(layers.InputScaling("none", 6)(tf.constant(x)).numpy(), x)


def test_l2_scaling_stays_accurate_in_an_int8_tflite_conversion():
    """The l2 rows of 1280-d ReLU6-like features after full-integer quantisation are within 3% (RMS) of
    float: with tf.math.l2_normalize the converter emits L2_NORMALIZATION, whose fixed 1/128 output step
    leaves ~10% on unit-vector entries of ~1/sqrt(1280)."""
    rng = np.random.default_rng(4)
    x = np.clip(rng.gamma(0.5, 1.0, (300, 1280)), 0, 6).astype(np.float32)
    scaling = layers.InputScaling("l2", 1280)
    function = tf.function(lambda features: {"scaled": scaling(features)},
                           input_signature=[tf.TensorSpec([1, 1280], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], scaling)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[i:i + 1]] for i in range(200))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    run = interpreter.get_signature_runner() if interpreter.get_signature_list() else None
    float_rows = scaling(tf.constant(x[200:])).numpy()
    quantised = np.concatenate([_invoke(interpreter, run, x[i:i + 1]) for i in range(200, 300)])
    error = np.linalg.norm(quantised - float_rows, axis=1) / np.linalg.norm(float_rows, axis=1)
    assert np.sqrt(np.mean(error ** 2)) < 0.03


def _invoke(interpreter, runner, row):
    if runner is not None:
        return next(iter(runner(features=row).values()))
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], row)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.mark.parametrize("scale", [1e-13, 1.0, 1e6])
def test_standardize_is_the_same_at_any_feature_scale(scale):
    """Features of any magnitude (a randomly initialised backbone gives ~1e-13) standardise alike;
    a constant dimension maps to a constant near 0 (float32 rounding of its mean), not to inf or NaN."""
    rng = np.random.default_rng(3)
    x = rng.normal(3.0, 2.0, size=(300, 5))
    x[:, 4] = 7.0
    scaled = layers.InputScaling("standardize", 5)
    scaled.adapt((x * scale).astype(np.float32))
    y = scaled(tf.constant((x * scale).astype(np.float32))).numpy()
    np.testing.assert_allclose(y[:, :4].std(0), 1, atol=2e-3)
    assert np.ptp(y[:, 4]) == 0 and abs(y[0, 4]) < 0.05
