"""Image sources: labelled images for one split ("train" or "test") as a `tf.data.Dataset`.

Every source yields `(image, label)` pairs:
  image  uint8 [H, W, 3]   RGB, size may vary from image to image
  label  int64 []          class id (single-label sources), or
         uint8 [C]         multi-hot over C classes (multi-label sources)

Two kinds of source, chosen by `image_source(spec, split)`:
  "tfds:NAME"       a TensorFlow Datasets dataset, e.g. "tfds:cifar10" or "tfds:coco/2017".
                    Class-id datasets need an "image" and a "label" feature; detection
                    datasets (COCO) an "image" and "objects/label", turned into multi-hot
                    labels. Images with no object are dropped: with "relevant = shares a
                    label" they could never be relevant to any query. COCO's "test" split
                    has no annotations, so split "test" reads COCO's "validation" split.
  path to an .npz   JPEG files stored as bytes (layout of cifar10_jpeg.npz):
                    {split}_bytes uint8 [total] concatenated JPEG files,
                    {split}_offsets int [n + 1] (image i = bytes[off[i]:off[i + 1]]),
                    {split}_labels [n] class ids or [n, C] multi-hot, class_names [C] optional.

Sources read lazily from `start` so that resumed extraction skips images without decoding them.
"""
from __future__ import annotations

import abc
import socket
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tbhvae.checks import check_labels, first_line, split_files
from tbhvae.data.features import DataError

SPLITS = ("train", "test")
TFDS_PREFIX = "tfds:"
# TFDS split read for each of our splits, where the dataset's names differ from ours.
TFDS_SPLIT_NAMES = {"coco/2017": {"train": "train", "test": "validation"}}
LOCAL_DATA_HINT = ("pass precomputed features with --features FILE, a JPEG .npz with --images PATH, "
                   "or a --data_dir where the dataset is already prepared")


class ImageSource(abc.ABC):
    """Labelled images of one split; `dataset(start, rows)` yields (uint8 [H, W, 3], label)."""

    def __init__(self, description: str, class_names: tuple[str, ...] | None, num_classes: int,
                 multi_label: bool, num_examples: int | None):
        self.description = description  # names the source in messages, e.g. "tfds:cifar10 (train)"
        self.class_names = class_names
        self.num_classes = num_classes
        self.multi_label = multi_label  # True: labels uint8 [C] multi-hot; False: int64 class ids
        self.num_examples = num_examples  # None when unknown before reading

    @abc.abstractmethod
    def encoded(self) -> tf.data.Dataset:
        """(encoded image bytes, label) of every example, in a fixed order, nothing decoded."""

    def labels(self) -> np.ndarray:
        """Labels of every example: int64 [n] class ids or uint8 [n, C] multi-hot (reads no image)."""
        batches = self.encoded().map(lambda _, label: label).batch(8192).as_numpy_iterator()
        return np.concatenate(list(batches))

    def dataset(self, start: int = 0, rows: np.ndarray | None = None) -> tf.data.Dataset:
        """(uint8 [H, W, 3], label) of examples `start`, `start + 1`, ... (of `rows`, sorted indices,
        when given), in a fixed order; the examples before are skipped undecoded."""
        examples = self.encoded()
        if rows is not None:  # take() stops at the last row, so no index past `keep` is looked up
            keep = np.zeros(int(rows.max(initial=-1)) + 1, bool)
            keep[rows] = True
            keep = tf.constant(keep)
            examples = (examples.enumerate().filter(lambda i, _: tf.gather(keep, i))
                        .map(lambda _, example: example).take(len(rows)))
        return examples.skip(start).map(lambda data, label: (decode_rgb(data), label),
                                        num_parallel_calls=tf.data.AUTOTUNE)


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP string [] -> uint8 [H, W, 3].

    JPEGs use libjpeg's accurate integer DCT (PIL's and libjpeg's default), not
    TF's default fast one: the fast DCT changes pixels by up to 5 levels, which
    moves EfficientNet-Lite0 features to cosine 0.98 of those of the same images
    decoded by PIL (the shared CIFAR-10 features are reproduced only with the accurate one).
    """
    image = tf.cond(tf.io.is_jpeg(encoded),
                    lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
                    lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    return image


def decode_rgb_arrays(encoded: list[bytes], size: int | None = None) -> np.ndarray:
    """Encoded images [N] -> uint8 [N, H, W, 3] (`decode_rgb` each).

    Images of several sizes need `size`: those not already [size, size] are resized
    (bilinear, rounded to uint8), for uses such as int8 calibration that need one batch;
    without it they are a ValueError naming the sizes (group them with `decode_rgb_list`).
    """
    images = decode_rgb_list(encoded)
    sizes = sorted({image.shape[:2] for image in images})
    if len(sizes) > 1:
        if size is None:
            raise ValueError(f"the images have {len(sizes)} sizes ({sizes[0][1]}x{sizes[0][0]} ... "
                             f"{sizes[-1][1]}x{sizes[-1][0]} pixels), not one")
        images = [image if image.shape[:2] == (size, size) else
                  np.clip(np.round(tf.image.resize(image, [size, size]).numpy()), 0, 255).astype(np.uint8)
                  for image in images]
    return np.stack(images)


def decode_rgb_list(encoded: list[bytes]) -> list[np.ndarray]:
    """Encoded images [N] -> N uint8 arrays [H_i, W_i, 3] (`decode_rgb` each), sizes kept."""
    return [decode_rgb(tf.constant(data)).numpy() for data in encoded]


class JpegNpzSource(ImageSource):
    """Images stored as concatenated JPEG bytes in an `.npz` (layout in the module docstring)."""

    def __init__(self, path: str | Path, split: str):
        path = Path(path)
        if split not in SPLITS:
            raise DataError(f"{path}: unknown split '{split}'; use one of {', '.join(SPLITS)}")
        if not path.is_file():
            raise DataError(f"{path}: JPEG image file not found; pass an existing .npz to --images "
                            f"or a TFDS name such as tfds:cifar10")
        keys = (f"{split}_bytes", f"{split}_offsets", f"{split}_labels")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in keys if k not in data.files]
                if missing:
                    raise DataError(f"{path}: missing key(s) {', '.join(missing)} (has: "
                                    f"{', '.join(data.files) or 'nothing'}); a JPEG .npz needs "
                                    f"{', '.join(keys)}")
                encoded, offsets, labels = (data[k] for k in keys)
                names = (tuple(str(n) for n in data["class_names"].tolist())
                         if "class_names" in data.files else None)
        except DataError:
            raise
        except (OSError, ValueError, EOFError, KeyError) as err:
            raise DataError(f"{path}: not a readable .npz file ({type(err).__name__}: {err}); "
                            f"recreate it") from None
        self._images = _split_jpeg_bytes(path, split, encoded, offsets)
        self._labels = _check_image_labels(path, split, labels, len(self._images), names)
        multi_label = self._labels.ndim == 2
        num_classes = (self._labels.shape[1] if multi_label
                       else len(names) if names is not None else int(self._labels.max(initial=-1)) + 1)
        super().__init__(f"{path} ({split})", names, int(num_classes), multi_label, len(self._images))

    def encoded(self) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((self._images, self._labels))

    def labels(self) -> np.ndarray:
        return self._labels


def _split_jpeg_bytes(path: Path, split: str, encoded: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """uint8 [total] bytes + int [n + 1] offsets -> object array [n] of one JPEG file each."""
    try:
        files = split_files(encoded, offsets, f"{split}_bytes", f"{split}_offsets")
    except ValueError as err:
        raise DataError(f"{path}: {err}") from None
    return np.array(files, dtype=object)


def _check_image_labels(path: Path, split: str, labels: np.ndarray, count: int,
                        names: tuple[str, ...] | None) -> np.ndarray:
    """Returns int64 [n] class ids or uint8 [n, C] multi-hot (`checks.check_labels`), or raises DataError."""
    key = f"{split}_labels"
    if labels.shape[:1] != (count,):
        raise DataError(f"{path}: '{key}' has {labels.shape[0] if labels.ndim else 0} rows but "
                        f"'{split}_offsets' describe {count} images; they must align")
    labels = check_labels(labels, count, f"{path}: '{key}'", error=DataError)
    if names is not None and labels.ndim == 1 and labels.max(initial=-1) >= len(names):
        raise DataError(f"{path}: '{key}' has class id {labels.max()} but 'class_names' "
                        f"lists only {len(names)} classes")
    if names is not None and labels.ndim == 2 and labels.shape[1] != len(names):
        raise DataError(f"{path}: '{key}' has {labels.shape[1]} classes but 'class_names' "
                        f"lists {len(names)}")
    return labels


# Where TFDS and Keras fetch datasets and weights; one connection attempt tells "offline" in seconds,
# where TFDS's own retries take minutes.
DOWNLOAD_HOST = ("storage.googleapis.com", 443)
PROBE_SECONDS = 5.0


def _check_online(what: str) -> None:
    """Raises DataError at once (one short connection attempt) when downloads cannot work."""
    try:
        socket.create_connection(DOWNLOAD_HOST, timeout=PROBE_SECONDS).close()
    except OSError as err:
        raise DataError(f"{what}: needs a download, but {DOWNLOAD_HOST[0]} is unreachable "
                        f"({err.strerror or type(err).__name__}); {LOCAL_DATA_HINT}") from None


class TfdsSource(ImageSource):
    """A TensorFlow Datasets dataset (prepared in `data_dir`, downloaded first if `download`)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None, download: bool = True):
        if split not in SPLITS:
            raise DataError(f"{TFDS_PREFIX}{name}: unknown split '{split}'; use one of {', '.join(SPLITS)}")
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as err:  # tfds raises several types for unknown or broken names
            raise DataError(f"{TFDS_PREFIX}{name}: not a usable TFDS dataset "
                            f"({type(err).__name__}: {first_line(err)})") from None
        where = data_dir or "the default TFDS data_dir"
        if download and not builder.is_prepared():
            _check_online(f"{TFDS_PREFIX}{name}")
        if download:
            try:
                builder.download_and_prepare()
            except Exception as err:  # offline: network, missing-module and checksum errors all land here
                raise DataError(f"{TFDS_PREFIX}{name}: download/preparation into {where} failed "
                                f"({type(err).__name__}: {first_line(err)}); {LOCAL_DATA_HINT}") from None
        elif not builder.is_prepared():
            raise DataError(f"{TFDS_PREFIX}{name}: not prepared in {where} and downloading is off; "
                            f"{LOCAL_DATA_HINT}")
        features = builder.info.features
        if "image" not in features:
            raise DataError(f"{TFDS_PREFIX}{name}: has no 'image' feature; only image datasets work")
        if "label" in features:
            label_feature, multi_label = features["label"], False
        elif "objects" in features and "label" in features["objects"]:
            label_feature, multi_label = features["objects"]["label"], True
        else:
            raise DataError(f"{TFDS_PREFIX}{name}: has neither a 'label' nor an 'objects/label' "
                            f"feature; cannot make labels")
        self._builder = builder
        self._split = TFDS_SPLIT_NAMES.get(name, {}).get(split, split)
        split_info = builder.info.splits.get(self._split)
        num_examples = split_info.num_examples if split_info is not None and not multi_label else None
        super().__init__(f"{TFDS_PREFIX}{name} ({self._split})", tuple(label_feature.names),
                         int(label_feature.num_classes), multi_label, num_examples)

    def encoded(self) -> tf.data.Dataset:
        examples = self._builder.as_dataset(split=self._split, shuffle_files=False,
                                            decoders={"image": tfds.decode.SkipDecoding()})
        if self.multi_label:
            num_classes = self.num_classes
            examples = examples.map(lambda ex: (ex["image"], _multi_hot(ex["objects"]["label"], num_classes)))
            return examples.filter(lambda _, label: tf.reduce_any(label > 0))
        return examples.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int64)))


def _multi_hot(class_ids: tf.Tensor, num_classes: int) -> tf.Tensor:
    """int [k] class ids (repeats allowed) -> uint8 [num_classes] 0/1."""
    counts = tf.math.bincount(tf.cast(class_ids, tf.int32), minlength=num_classes, maxlength=num_classes)
    return tf.cast(counts > 0, tf.uint8)


def image_source(spec: str, split: str, data_dir: str | None = None, download: bool = True) -> ImageSource:
    """"tfds:NAME" or a path to a JPEG .npz -> the ImageSource of `split` ("train" or "test")."""
    if spec.startswith(TFDS_PREFIX):
        return TfdsSource(spec[len(TFDS_PREFIX):], split, data_dir=data_dir, download=download)
    return JpegNpzSource(spec, split)
