"""TFLite conversion of an exported encoder: float32, float16, dynamic-range and int8 variants.

Each variant holds the encode_features signature under the key "serving_default",
with the same input (features float32 [B, D]) and output names (bits, packed, probs).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

from tbhvae.checks import atomic_write
from tbhvae.export.savedmodel import ExportError

TFLITE_VARIANTS = ("float32", "float16", "dynamic", "int8")


def convert_tflite(saved_model_dir: str | os.PathLike, variant: str,
                   representative_features: np.ndarray | None = None) -> bytes:
    """Converts the encode_features signature of a SavedModel to a TFLite flatbuffer.

    variant: "float32"; "float16" (weights stored as float16); "dynamic" (int8
    weights, float activations); "int8" (int8 weights and activations calibrated
    on `representative_features` float32 [N, D]; the float32 input and the
    outputs keep their types, bits/packed are computed from the int8 logits).
    Built-in ops only.
    """
    if variant not in TFLITE_VARIANTS:
        raise ExportError(f"TFLite variant '{variant}': use one of {', '.join(TFLITE_VARIANTS)}")
    loaded = tf.saved_model.load(str(saved_model_dir))
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [loaded.signatures["encode_features"]], loaded)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if variant == "int8":
        if representative_features is None or not len(representative_features):
            raise ExportError("the int8 TFLite variant needs representative training features for calibration")
        samples = np.asarray(representative_features, np.float32)
        converter.representative_dataset = lambda: ([samples[i:i + 1]] for i in range(len(samples)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the calibrator's tf.lite.Interpreter deprecation notice
        return converter.convert()


def representative_rows(features: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` training rows [min(count, N), D] drawn without replacement (all rows when there are fewer)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(features), size=min(count, len(features)), replace=False))
    return features[rows]


def write_tflite_variants(saved_model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                          representative_features: np.ndarray,
                          variants: tuple[str, ...] = TFLITE_VARIANTS) -> dict[str, Path]:
    """Writes `out_dir/<variant>.tflite` (each atomically) for each variant; returns variant -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {variant: atomic_write(out_dir / f"{variant}.tflite",
                                  convert_tflite(saved_model_dir, variant, representative_features))
            for variant in variants}
