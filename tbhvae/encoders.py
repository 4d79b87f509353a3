"""Runtime hash encoders: open a run, an exported SavedModel or a TFLite file and encode features.

Every encoder maps features float [N, D] to numpy outputs bits uint8 [N, M],
packed uint8 [N, ceil(M / 8)] and probs float32 [N, M] (see `tbhvae.export`);
`open_encoder` picks the kind from the path. retrieval.py and bench/ use them.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tbhvae.export.savedmodel import OUTPUT_NAMES, ExportError, TrainedRun, hash_outputs, load_run, resolve_saved_model
from tbhvae.stderr import TFLITE_NOISE, stderr_without
from tbhvae.train.rundir import RunDirectory


def _check_features(features, dim: int) -> np.ndarray:
    """float [n, dim] -> float32 [n, dim]; ValueError naming the expected shape otherwise."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != dim or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"features: expected a float array [batch, {dim}], got {features.dtype} "
                         f"{list(features.shape)}")
    return features.astype(np.float32, copy=False)


def median_ms(call, repeats: int) -> float:
    """Median milliseconds of `call()` over `repeats` calls, after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _concatenate(parts: list[dict]) -> dict[str, np.ndarray]:
    """The outputs of consecutive batches, joined row-wise per output name."""
    return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUT_NAMES}


class Encoder:
    """Features float [N, D] -> dict of numpy outputs (bits, packed, probs), batched.

    Subclasses run the Keras model, a SavedModel signature or a LiteRT interpreter.
    """

    description: str
    input_dim: int
    bits: int

    def encode(self, features, batch_size: int = 4096) -> dict[str, np.ndarray]:
        features = _check_features(features, self.input_dim)
        parts = [self._run(features[i:i + batch_size]) for i in range(0, len(features), batch_size)]
        return _concatenate(parts or [self._run(features)])

    def latency_ms(self, features, batch_size: int = 1, repeats: int = 200) -> float:
        """Median milliseconds per call on batches of `batch_size` rows (after one warm-up call)."""
        batch = _check_features(features, self.input_dim)[:batch_size]
        return median_ms(lambda: self._run(batch), repeats)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError


class KerasEncoder(Encoder):
    """The restored training model (the reference every export is compared with)."""

    def __init__(self, run: TrainedRun):
        self.run = run
        self.description = f"keras {run.checkpoint}"
        self.input_dim, self.bits = run.input_dim, run.config.bits
        self._function = tf.function(lambda x: hash_outputs(run.model, x, with_logits=True),
                                     input_signature=[tf.TensorSpec([None, run.input_dim], tf.float32)])

    def _run(self, batch):
        return {k: v.numpy() for k, v in self._function(tf.constant(batch)).items()}

    def logits(self, features, batch_size: int = 4096) -> np.ndarray:
        """Binary-head logits float32 [N, M]."""
        features = _check_features(features, self.input_dim)
        return np.concatenate([self._run(features[i:i + batch_size])["logits"]
                               for i in range(0, max(len(features), 1), batch_size)])


class SavedModelEncoder(Encoder):
    """The encode_features signature of an exported SavedModel."""

    def __init__(self, path: str | os.PathLike, signature: str = "encode_features"):
        self.path = resolve_saved_model(path)
        self.loaded = tf.saved_model.load(str(self.path))
        if signature not in self.loaded.signatures:
            raise ExportError(f"{self.path}: has no signature '{signature}' "
                              f"(has {', '.join(self.loaded.signatures)})")
        self.signature = self.loaded.signatures[signature]
        spec = self.signature.structured_input_signature[1]["features"]
        self.input_dim = int(spec.shape[1])
        self.bits = int(self.signature.structured_outputs["bits"].shape[1])
        self.description = f"saved_model {self.path}"

    def _run(self, batch):
        return {k: v.numpy() for k, v in self.signature(features=tf.constant(batch)).items()}

    def encode_jpeg(self, encoded: list[bytes], batch_size: int = 256) -> dict[str, np.ndarray]:
        """Outputs for encoded JPEG/PNG files [N] via the encode_jpeg signature (image exports only)."""
        if "encode_jpeg" not in self.loaded.signatures:
            raise ExportError(f"{self.path}: has no image signatures (exported without a backbone); "
                              f"encode features instead, or export with --backbone")
        signature = self.loaded.signatures["encode_jpeg"]
        return _concatenate([{k: v.numpy() for k, v in signature(
            encoded_jpeg=tf.constant(encoded[i:i + batch_size])).items()} for i in range(0, len(encoded), batch_size)])


class LiteEncoder(Encoder):
    """A TFLite file's serving_default signature run by LiteRT: features in, or (images_*.tflite,
    `image_input`) images uint8 [N, H, W, 3] in through `encode_images`."""

    def __init__(self, model: str | os.PathLike | bytes, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        if isinstance(model, bytes):
            self.description, kwargs = "tflite (in memory)", {"model_content": model}
        else:
            if not Path(model).is_file():
                raise ExportError(f"{model}: no such TFLite file; write one with export.py --tflite_dir")
            self.description, kwargs = f"tflite {model}", {"model_path": str(model)}
        self.interpreter = Interpreter(num_threads=num_threads, **kwargs)
        signatures = self.interpreter.get_signature_list()
        if "serving_default" not in signatures:
            raise ExportError(f"{self.description}: no serving_default signature (has {', '.join(signatures)})")
        self.runner = self.interpreter.get_signature_runner("serving_default")
        inputs = self.runner.get_input_details()
        self.image_input = "images" in inputs
        self.input_dim = None if self.image_input else int(inputs["features"]["shape_signature"][1])
        self.bits = int(self.runner.get_output_details()["bits"]["shape_signature"][1])
        with stderr_without(TFLITE_NOISE):  # the first run creates LiteRT's CPU delegate, which it announces
            if self.image_input:
                self.runner(images=np.zeros([1, 8, 8, 3], np.uint8))
            else:
                self.runner(features=np.zeros([1, self.input_dim], np.float32))

    def encode(self, features, batch_size: int = 4096) -> dict[str, np.ndarray]:
        if self.image_input:
            raise ExportError(f"{self.description}: takes images, not features; use encode_images")
        return super().encode(features, batch_size)

    def _run(self, batch):
        return {k: np.array(v) for k, v in self.runner(features=batch).items()}

    def encode_images(self, images, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Outputs for images uint8 [N, H, W, 3] (any H, W: the file resizes) of an images_*.tflite."""
        images = np.asarray(images)
        if not self.image_input:
            raise ExportError(f"{self.description}: takes features, not images; use encode")
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images: expected uint8 [batch, height, width, 3], got {images.dtype} "
                             f"{list(images.shape)}")
        return _concatenate([{k: np.array(v) for k, v in self.runner(images=images[i:i + batch_size]).items()}
                             for i in range(0, len(images), batch_size)])


def open_encoder(path: str | os.PathLike, num_threads: int | None = None) -> Encoder:
    """An encoder from a `.tflite` file, a SavedModel (or its versions directory) or a run directory."""
    path = Path(path)
    if path.suffix == ".tflite":
        return LiteEncoder(path, num_threads=num_threads)
    if RunDirectory(path).config_path.is_file():
        return KerasEncoder(load_run(path))
    if not path.exists():
        raise ExportError(f"{path}: no such encoder; pass a run directory, an exported SavedModel "
                          f"directory or a .tflite file")
    return SavedModelEncoder(path)
