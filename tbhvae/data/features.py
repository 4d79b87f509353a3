"""Feature sets: the `.npz` format every trainer, baseline and benchmark reads.

Format (one `.npz` file, see README "Your own features"):
  train_features  float [N, D]   database / training features
  train_labels    int [N] class ids, or 0/1 [N, C] multi-hot
  test_features   float [Q, D]   query features
  test_labels     like train_labels, [Q] or [Q, C]
  class_names     str [C]        optional
  extractor       str []         optional: JSON {"backbone", "weights", "input_size"} of the
                                 extractor that made the features (written by tbhvae-extract)
  train_index     int [N]        optional: row of each train feature in its image source (written
  test_index      int [Q]        by tbhvae-extract when --limit samples); absent: rows 0, 1, ...
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from tbhvae.checks import atomic_path, check_features, check_labels

REQUIRED_KEYS = ("train_features", "train_labels", "test_features", "test_labels")
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class DataError(ValueError):
    """Bad input data; the message is one line naming the file/key and the fix."""


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """Train (database) and test (query) features with their labels."""

    train_features: np.ndarray  # float32 [N, D]
    train_labels: np.ndarray  # int64 [N] or uint8 [N, C]
    test_features: np.ndarray  # float32 [Q, D]
    test_labels: np.ndarray  # int64 [Q] or uint8 [Q, C]
    class_names: tuple[str, ...] | None = None
    extractor: dict | None = None  # {"backbone", "weights", "input_size"} that made the features; None: unknown
    train_index: np.ndarray | None = None  # int64 [N] source image row of each train feature; None: 0..N-1
    test_index: np.ndarray | None = None  # int64 [Q], the same for test

    @property
    def multi_label(self) -> bool:
        return self.train_labels.ndim == 2

    @property
    def dim(self) -> int:
        return int(self.train_features.shape[1])

    @property
    def num_classes(self) -> int:
        if self.multi_label:
            return int(self.train_labels.shape[1])
        return int(max(self.train_labels.max(initial=-1), self.test_labels.max(initial=-1)) + 1)


def _check_labels(labels, count: int, key: str, where: str) -> np.ndarray:
    """Class ids -> int64 [count], multi-hot -> uint8 [count, C] (`checks.check_labels`), or DataError."""
    labels = np.asarray(labels)
    if labels.shape[:1] != (count,):
        raise DataError(
            f"{where}: '{key}' has {labels.shape[0] if labels.ndim else 0} rows but the matching "
            f"features have {count}; labels and features must align row by row")
    return check_labels(labels, count, f"{where}: '{key}'", error=DataError)


def _check_features(features, key: str, where: str) -> np.ndarray:
    """Finite numeric [n, D], n >= 1 -> float32 (`checks.check_features`), or DataError."""
    return check_features(features, f"{where}: '{key}'", error=DataError)


def validate(feature_set: FeatureSet, where: str = "features") -> FeatureSet:
    """Checks shapes, dtypes and values; returns a normalised copy or raises DataError."""
    train = _check_features(feature_set.train_features, "train_features", where)
    test = _check_features(feature_set.test_features, "test_features", where)
    if train.shape[1] != test.shape[1]:
        raise DataError(f"{where}: train_features have dim {train.shape[1]} but test_features "
                        f"have dim {test.shape[1]}; both splits must come from the same extractor")
    if np.all(train.max(axis=0) == train.min(axis=0)):
        raise DataError(f"{where}: 'train_features' are constant (every column has zero "
                        f"variance); nothing can be learned from them")
    train_labels = _check_labels(feature_set.train_labels, len(train), "train_labels", where)
    test_labels = _check_labels(feature_set.test_labels, len(test), "test_labels", where)
    if train_labels.ndim != test_labels.ndim or (
            train_labels.ndim == 2 and train_labels.shape[1] != test_labels.shape[1]):
        raise DataError(f"{where}: train_labels {train_labels.shape} and test_labels "
                        f"{test_labels.shape} use different label formats")
    names = feature_set.class_names
    index = {}
    for key, count in (("train_index", len(train)), ("test_index", len(test))):
        rows = getattr(feature_set, key)
        if rows is not None:
            rows = np.asarray(rows)
            if rows.shape != (count,) or rows.dtype.kind not in "iu" or (count and rows.min() < 0):
                raise DataError(f"{where}: '{key}' must hold {count} non-negative integer rows, got "
                                f"{rows.dtype} {rows.shape}")
            index[key] = rows.astype(np.int64)
    return FeatureSet(train, train_labels, test, test_labels,
                      tuple(str(n) for n in names) if names is not None else None, feature_set.extractor, **index)


def _check_member_sizes(path: Path) -> None:
    """DataError for a .npy file or an .npz member whose header claims more bytes than it holds.

    Run before np.load, which would allocate what a header claims (a tiny file can claim terabytes).
    Anything else that is not a zip raises BadZipFile (reported by `load_features`).
    """
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as file:
            if file.read(6) == b"\x93NUMPY":
                raise DataError(f"{path}: a single .npy array, not an .npz feature file; save the splits "
                                f"with tbhvae.data.save_features (see README 'Your own features')")
        raise zipfile.BadZipFile("not a zip archive")
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if not member.filename.endswith(".npy"):
                continue
            with archive.open(member) as file:
                version = np.lib.format.read_magic(file)
                if version not in _HEADER_READERS:
                    continue  # a newer format: np.load checks it
                shape, _, dtype = _HEADER_READERS[version](file)
            claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if claimed > member.file_size:
                raise DataError(f"{path}: '{member.filename[:-4]}' claims shape {shape} ({claimed} bytes) but "
                                f"holds {member.file_size} bytes; the file is corrupt, recreate it")


def load_features(path: str | os.PathLike) -> FeatureSet:
    """Loads and validates a feature `.npz` (format in the module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a feature file; pass --features with the .npz itself")
    if not path.is_file():
        raise DataError(f"{path}: feature file not found; pass --features with an existing .npz "
                        f"(see README 'Your own features')")
    try:
        _check_member_sizes(path)
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in REQUIRED_KEYS if k not in data.files]
            if missing:
                raise DataError(f"{path}: missing key(s) {', '.join(missing)} (has: "
                                f"{', '.join(data.files) or 'nothing'}); expected {', '.join(REQUIRED_KEYS)}")
            arrays = {k: data[k] for k in REQUIRED_KEYS}
            names = tuple(data["class_names"].tolist()) if "class_names" in data.files else None
            extractor = json.loads(str(data["extractor"])) if "extractor" in data.files else None
            index = {k: data[k] for k in ("train_index", "test_index") if k in data.files}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, MemoryError) as err:  # json: ValueError
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__}: {err}); "
                        f"the file may be truncated or corrupt, recreate it") from None
    return validate(FeatureSet(**arrays, class_names=names, extractor=extractor, **index), where=str(path))


def save_features(path: str | os.PathLike, feature_set: FeatureSet, dtype=np.float32) -> Path:
    """Writes a feature set atomically (`checks.atomic_path`); features stored as `dtype`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(feature_set, k) for k in REQUIRED_KEYS}
    arrays["train_features"] = np.asarray(arrays["train_features"], dtype=dtype)
    arrays["test_features"] = np.asarray(arrays["test_features"], dtype=dtype)
    if feature_set.class_names is not None:
        arrays["class_names"] = np.asarray(feature_set.class_names, dtype=str)
    if feature_set.extractor is not None:
        arrays["extractor"] = np.asarray(json.dumps(feature_set.extractor, sort_keys=True))
    for key in ("train_index", "test_index"):
        if getattr(feature_set, key) is not None:
            arrays[key] = np.asarray(getattr(feature_set, key), dtype=np.int64)
    with atomic_path(path, ".tmp.npz") as tmp:
        np.savez(tmp, **arrays)
    return path

