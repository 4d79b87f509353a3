"""Quantisation-aware fine-tuning of an image backbone for the int8 TFLite encoder.

Post-training int8 quantisation of EfficientNet-Lite0 flips ~7% of the hash
bits (the per-channel int8 weights, the per-tensor int8 activations and the
int8 input image each flip 2.7-4.2% alone; BENCHMARKS.md). Fine-tuning a copy of the backbone whose forward
pass simulates that arithmetic, so that its hash logits match the float
model's on training images (distillation, as in Jacob et al., CVPR 2018, and
the TF Model Optimization toolkit, which does not support Keras 3), teaches
the weights to sit where int8 rounding costs little.

The copy folds each batch normalisation into the convolution before it, as
the TFLite converter does; weights are fake-quantised per output channel,
symmetric over [-127, 127] (TFLite's scheme), activations per tensor after
each fused convolution + ReLU6, addition and pooling, over moving-average
ranges. The first `tflite.FLOAT_CONVOLUTIONS` convolutions stay float, with their
input and the activations between them: the int8 model keeps that front end in
float (`tflite.convert_tflite(float_front_end=True)`), because an int8 tensor
cannot hold a resized image's in-between pixel values.
The result is a plain float Keras model (the folded convolutions, no fake
quantisation) that the converter then calibrates and quantises as usual.
"""
from __future__ import annotations

import sys
import time

import keras
import numpy as np
import tensorflow as tf

from tbhvae.export.savedmodel import Backbone, ExportError
from tbhvae.export.tflite import FLOAT_CONVOLUTIONS

RANGE_MOMENTUM = 0.99  # per batch: the ranges follow ~100 batches, so they track the weights as they move
SUPPORTED = "Conv2D / DepthwiseConv2D (+ BatchNormalization), ReLU, Add, ZeroPadding2D, GlobalAveragePooling2D"


class ActivationRange(keras.layers.Layer):
    """Per-tensor int8 fake quantisation over a moving [min, max] (always containing 0), updated in training.

    Without `fake_quant` it passes values through but keeps the range weights, so that the float and the
    simulated copy of `folded_copy` hold the same weight list (`set_weights` moves one into the other)."""

    def __init__(self, fake_quant: bool, **kwargs):
        super().__init__(**kwargs)
        self.fake_quant = fake_quant
        self.low = self.add_weight(shape=(), initializer="zeros", trainable=False, name="low")
        self.high = self.add_weight(shape=(), initializer="zeros", trainable=False, name="high")
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False, name="seen")

    def call(self, values, training=False):
        if not self.fake_quant:
            return values
        if training:
            momentum = tf.where(self.seen > 0, RANGE_MOMENTUM, 0.0)  # the first batch sets the range
            self.low.assign(momentum * self.low + (1 - momentum) * tf.minimum(tf.reduce_min(values), 0.0))
            self.high.assign(momentum * self.high + (1 - momentum) * tf.maximum(tf.reduce_max(values), 0.0))
            self.seen.assign(1.0)
        return tf.quantization.fake_quant_with_min_max_vars(values, self.low, self.high, num_bits=8)


class FoldedConvolution(keras.layers.Layer):
    """A convolution with its batch normalisation folded in: y = conv(x, k * s) + (beta - mean * s),
    s = gamma / sqrt(var + eps); with `fake_quant`, the kernel is rounded per output channel to int8."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, strides, padding: str, depthwise: bool,
                 fake_quant: bool, **kwargs):
        super().__init__(**kwargs)
        self.strides, self.padding = tuple(strides), padding.upper()
        self.depthwise, self.fake_quant = depthwise, fake_quant
        self.kernel = self.add_weight(shape=kernel.shape, initializer=keras.initializers.Constant(kernel),
                                      name="kernel")
        self.bias = self.add_weight(shape=bias.shape, initializer=keras.initializers.Constant(bias), name="bias")

    def quantised_kernel(self):
        """The kernel on TFLite's per-channel int8 grid (scale = max |w| / 127); straight-through gradient."""
        kernel = tf.transpose(self.kernel, [0, 1, 3, 2]) if self.depthwise else self.kernel  # channels last
        bound = tf.stop_gradient(tf.maximum(tf.reduce_max(tf.abs(kernel), axis=[0, 1, 2]), 1e-12))
        kernel = tf.quantization.fake_quant_with_min_max_vars_per_channel(kernel, -bound, bound, num_bits=8,
                                                                          narrow_range=True)
        return tf.transpose(kernel, [0, 1, 3, 2]) if self.depthwise else kernel

    def call(self, inputs):
        kernel = self.quantised_kernel() if self.fake_quant else self.kernel
        strides = (1, *self.strides, 1)
        if self.depthwise:
            outputs = tf.nn.depthwise_conv2d(inputs, kernel, strides, self.padding)
        else:
            outputs = tf.nn.conv2d(inputs, kernel, strides, self.padding)
        return outputs + self.bias


def _folded(conv, batch_norm) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) of `conv` with `batch_norm` (or None) folded in."""
    weights = conv.get_weights()
    kernel = weights[0]
    bias = weights[1] if conv.use_bias else np.zeros(kernel.shape[-2] if _is_depthwise(conv) else kernel.shape[-1])
    if batch_norm is None:
        return kernel.astype(np.float32), bias.astype(np.float32)
    gamma, beta, mean, variance = (batch_norm.gamma.numpy() if batch_norm.scale else 1.0,
                                   batch_norm.beta.numpy() if batch_norm.center else 0.0,
                                   batch_norm.moving_mean.numpy(), batch_norm.moving_variance.numpy())
    scale = gamma / np.sqrt(variance + batch_norm.epsilon)
    kernel = kernel * (scale[None, None, :, None] if _is_depthwise(conv) else scale)
    return kernel.astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)


def _is_depthwise(layer) -> bool:
    return isinstance(layer, keras.layers.DepthwiseConv2D)


def folded_copy(model: keras.Model, fake_quant: bool, float_convolutions: int = FLOAT_CONVOLUTIONS) -> keras.Model:
    """The backbone `model` [B, S, S, 3] -> [B, D] rebuilt with folded convolutions and, with `fake_quant`,
    int8 simulation after the first `float_convolutions` convolutions (the last of them has an int8
    output); ExportError for layers other than those in SUPPORTED."""
    consumers: dict[int, list] = {}
    for layer in model.layers:
        for tensor in tf.nest.flatten(layer.input) if not isinstance(layer, keras.layers.InputLayer) else []:
            consumers.setdefault(id(tensor), []).append(layer)

    def only_consumer(layer, kind):
        users = consumers.get(id(layer.output), [])
        return users[0] if len(users) == 1 and isinstance(users[0], kind) else None

    values, convolutions = {}, 0

    def output_range(name):  # int8 once the float front end's last convolution has run
        return ActivationRange(fake_quant and convolutions >= float_convolutions, name=name)

    inputs = keras.Input(model.input_shape[1:], name="image")
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            values[id(layer.output)] = inputs
            continue
        source = [values.get(id(t)) for t in tf.nest.flatten(layer.input)]
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            batch_norm = only_consumer(layer, keras.layers.BatchNormalization)
            if (layer.activation not in (keras.activations.linear, None) or tuple(layer.dilation_rate) != (1, 1)
                    or getattr(layer, "depth_multiplier", 1) != 1 or getattr(layer, "groups", 1) != 1):
                raise ExportError(f"quantisation-aware fine-tuning: {layer.name} has a fused activation, dilation, "
                                  f"groups or a depth multiplier")
            kernel, bias = _folded(layer, batch_norm)
            convolutions += 1
            output = FoldedConvolution(kernel, bias, layer.strides, layer.padding, _is_depthwise(layer),
                                       fake_quant and convolutions > float_convolutions,
                                       name=f"{layer.name}_folded")(source[0])
            end = batch_norm or layer
            if only_consumer(end, keras.layers.ReLU) is None:  # else the ReLU quantises the fused output
                output = output_range(f"{layer.name}_range")(output)
            values[id(end.output)] = output
        elif isinstance(layer, keras.layers.BatchNormalization):
            if id(layer.output) not in values:
                raise ExportError(f"quantisation-aware fine-tuning: {layer.name} does not follow a convolution")
        elif isinstance(layer, keras.layers.ReLU) and not layer.negative_slope and not layer.threshold:
            activated = keras.layers.ReLU(layer.max_value, name=layer.name)(source[0])
            values[id(layer.output)] = output_range(f"{layer.name}_range")(activated)
        elif isinstance(layer, keras.layers.Add):
            added = keras.layers.Add(name=layer.name)(source)
            values[id(layer.output)] = output_range(f"{layer.name}_range")(added)
        elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
            pooled = keras.layers.GlobalAveragePooling2D(name=layer.name)(source[0])
            values[id(layer.output)] = output_range(f"{layer.name}_range")(pooled)
        elif isinstance(layer, keras.layers.ZeroPadding2D):
            values[id(layer.output)] = keras.layers.ZeroPadding2D(layer.padding, name=layer.name)(source[0])
        else:
            raise ExportError(f"quantisation-aware fine-tuning supports backbones of {SUPPORTED}; "
                              f"{layer.name} is a {type(layer).__name__}")
    return keras.Model(inputs, values[id(model.output)], name=f"{model.name}_folded")


def fine_tune_for_int8(backbone: Backbone, model, images: np.ndarray, steps: int, batch_size: int = 16,
                       learning_rate: float = 1e-5, seed: int = 0, log=None) -> Backbone:
    """The backbone fine-tuned so that its int8 TFLite encoder matches the float codes.

    backbone: the float image backbone; model: the trained HashingModel (its hash
    logits are the distillation targets, from the float backbone's features);
    images: uint8 [N, H, W, 3] training images of one size. Minimises the mean
    squared difference of the int8-simulated and the float hash logits with Adam
    (learning rate decayed to 0 on a cosine) for `steps` batches, logging every
    100 steps. Returns a Backbone whose model is the float folded copy with the
    fine-tuned weights (same preprocessing).
    """
    if steps < 1 or len(images) < 1:
        raise ExportError("quantisation-aware fine-tuning needs steps >= 1 and training images")
    student = folded_copy(backbone.model, fake_quant=True)
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps))

    @tf.function
    def step(batch):
        pixels = backbone.preprocess(batch)
        target = model.hash_logits(backbone.model(pixels, training=False))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model.hash_logits(student(pixels, training=True)) - target))
        optimizer.apply_gradients(zip(tape.gradient(loss, student.trainable_variables), student.trainable_variables))
        return loss

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    rng = np.random.default_rng(seed)
    started, losses = time.perf_counter(), []
    for done in range(1, steps + 1):
        losses.append(float(step(images[rng.choice(len(images), min(batch_size, len(images)), replace=False)])))
        if done % 100 == 0 or done == steps:
            log(f"int8 fine-tuning: step {done}/{steps}, logit MSE {np.mean(losses[-100:]):.4f} "
                f"({time.perf_counter() - started:.0f} s)")
    folded = folded_copy(backbone.model, fake_quant=False)
    folded.set_weights(student.get_weights())
    return Backbone(backbone.name, backbone.weights, folded, backbone.preprocess, backbone.input_size)
