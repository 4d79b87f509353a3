"""TFLite conversion of an exported encoder: float32, float16, dynamic-range and int8 variants.

Each variant holds one SavedModel signature under the key "serving_default", with
its input and output names (bits, packed, probs): `<variant>.tflite` encode_features
(features float32 [B, D]); `images_<variant>.tflite`, for exports with a backbone,
encode_images (images uint8 [B, H, W, 3]: the backbone and the hash head in one file).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

from tbhvae.checks import atomic_write
from tbhvae.export.savedmodel import ExportError
from tbhvae.stderr import TFLITE_NOISE, stderr_without

TFLITE_VARIANTS = ("float32", "float16", "dynamic", "int8")
CONVOLUTION_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
# Convolutions from the input that int8 image encoders keep in float: the stem and the first inverted
# residual block (depthwise + projection) of EfficientNet-Lite / MobileNetV2, ~5% of Lite0's multiply-adds.
# That block's depthwise output has by far the largest int8 error (RMSE / scale) of any convolution
# (BENCHMARKS.md, "The int8 image encoder").
FLOAT_CONVOLUTIONS = 3


def convert_tflite(saved_model_dir: str | os.PathLike, variant: str,
                   representative: np.ndarray | None = None, signature: str = "encode_features",
                   float_front_end: bool | None = None) -> bytes:
    """Converts one signature of a SavedModel (encode_features or encode_images) to a TFLite flatbuffer.

    variant: "float32"; "float16" (weights stored as float16); "dynamic" (int8
    weights, float activations); "int8" (int8 weights and activations calibrated
    on `representative` rows of the signature's input: features float32 [N, D]
    or images uint8 [N, H, W, 3]; the input and the outputs keep their types,
    bits/packed are computed from the int8 logits). Built-in ops only.
    float_front_end (int8; default: for encode_images): keeps every op from the
    input through the first FLOAT_CONVOLUTIONS convolutions in float (`front_end_nodes`):
    an int8 tensor cannot hold a resized image's in-between values, and rounding them
    alone flips ~2.7% of the bits of an EfficientNet-Lite0 encoder (BENCHMARKS.md).
    """
    if variant not in TFLITE_VARIANTS:
        raise ExportError(f"TFLite variant '{variant}': use one of {', '.join(TFLITE_VARIANTS)}")
    loaded = tf.saved_model.load(str(saved_model_dir))
    if signature not in loaded.signatures:
        raise ExportError(f"{saved_model_dir}: has no signature '{signature}' (has {', '.join(loaded.signatures)})")
    converter = tf.lite.TFLiteConverter.from_concrete_functions([loaded.signatures[signature]], loaded)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    front_end = []
    if variant == "int8":
        if representative is None or not len(representative):
            raise ExportError("the int8 TFLite variant needs representative training rows for calibration")
        samples = np.asarray(representative)
        converter.representative_dataset = lambda: ([samples[i:i + 1]] for i in range(len(samples)))
        if float_front_end if float_front_end is not None else signature == "encode_images":
            front_end = front_end_nodes(convert_tflite(saved_model_dir, "float32", signature=signature))
        if not front_end:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings(), stderr_without(TFLITE_NOISE):
        warnings.simplefilter("ignore")  # the calibrator's tf.lite.Interpreter deprecation notice
        if not front_end:
            return converter.convert()
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=lambda: ([samples[i:i + 1]] for i in range(1)),
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=front_end))
        return debugger.get_nondebug_quantized_model()


def front_end_nodes(float_model: bytes, convolutions: int = FLOAT_CONVOLUTIONS) -> list[str]:
    """Output tensor names of a float TFLite model's ops from the input through its `convolutions`-th
    convolution (CONV_2D or DEPTHWISE_CONV_2D; none with fewer), in execution order."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=float_model)
    names = {detail["index"]: detail["name"] for detail in interpreter.get_tensor_details()}
    nodes, seen = [], 0
    for op in interpreter._get_ops_details():  # the public API has no op list
        nodes += [names[index] for index in op["outputs"]]
        seen += op["op_name"] in CONVOLUTION_OPS
        if seen == convolutions:
            return nodes
    return []


def representative_rows(features: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` training rows [min(count, N), D] drawn without replacement (all rows when there are fewer)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(features), size=min(count, len(features)), replace=False))
    return features[rows]


def write_tflite_variants(saved_model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                          representative_features: np.ndarray,
                          variants: tuple[str, ...] = TFLITE_VARIANTS,
                          representative_images: np.ndarray | None = None,
                          int8_images_source: str | os.PathLike | None = None) -> dict[str, Path]:
    """Writes `out_dir/<variant>.tflite` (each atomically) for each variant and, given
    `representative_images` uint8 [N, H, W, 3], `out_dir/images_<variant>.tflite` too,
    images_int8 from the encode_images of `int8_images_source` when given (a SavedModel
    of `savedmodel.write_image_encoder` with a fine-tuned backbone).
    Returns name ("float32", ..., "images_float32", ...) -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(variant, representative_features, "encode_features", saved_model_dir) for variant in variants]
    if representative_images is not None:
        jobs += [(f"images_{variant}", representative_images, "encode_images",
                  int8_images_source if variant == "int8" and int8_images_source else saved_model_dir)
                 for variant in variants]
    return {name: atomic_write(out_dir / f"{name}.tflite",
                               convert_tflite(source, name.removeprefix("images_"), rows, signature))
            for name, rows, signature, source in jobs}
