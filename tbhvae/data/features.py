"""Feature sets: the `.npz` format every trainer, baseline and benchmark reads.

Format (one `.npz` file, see README "Your own features"):
  train_features  float [N, D]   database / training features
  train_labels    int [N] class ids, or 0/1 [N, C] multi-hot
  test_features   float [Q, D]   query features
  test_labels     like train_labels, [Q] or [Q, C]
  class_names     str [C]        optional
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np

REQUIRED_KEYS = ("train_features", "train_labels", "test_features", "test_labels")


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


def _check_labels(labels: np.ndarray, count: int, key: str, where: str) -> np.ndarray:
    if labels.shape[:1] != (count,):
        raise DataError(
            f"{where}: '{key}' has {labels.shape[0] if labels.ndim else 0} rows but the matching "
            f"features have {count}; labels and features must align row by row")
    if labels.ndim == 1:
        if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
            raise DataError(f"{where}: '{key}' must hold non-negative integer class ids, "
                            f"got dtype {labels.dtype}")
        return labels.astype(np.int64)
    if labels.ndim == 2 and labels.size and np.isin(labels, (0, 1)).all():
        return labels.astype(np.uint8)
    if labels.ndim == 2 and not labels.size:
        return labels.astype(np.uint8)
    raise DataError(f"{where}: '{key}' must be class ids [n] or 0/1 multi-hot [n, C], "
                    f"got shape {labels.shape} dtype {labels.dtype}")


def _check_features(features: np.ndarray, key: str, where: str) -> np.ndarray:
    if features.ndim != 2:
        raise DataError(f"{where}: '{key}' must be a 2-D float array [n, dim], got shape {features.shape}")
    if features.shape[0] == 0:
        raise DataError(f"{where}: '{key}' is empty (0 rows); both splits need at least one example")
    if not np.issubdtype(features.dtype, np.floating) and not np.issubdtype(features.dtype, np.integer):
        raise DataError(f"{where}: '{key}' must be numeric, got dtype {features.dtype}")
    features = features.astype(np.float32)
    finite = np.isfinite(features)
    if not finite.all():
        row = int(np.argwhere(~finite)[0, 0])
        raise DataError(f"{where}: '{key}' holds {int((~finite).sum())} NaN/Inf values "
                        f"(first in row {row}); clean or drop those rows")
    return features


def validate(feature_set: FeatureSet, where: str = "features") -> FeatureSet:
    """Checks shapes, dtypes and values; returns a normalised copy or raises DataError."""
    train = _check_features(np.asarray(feature_set.train_features), "train_features", where)
    test = _check_features(np.asarray(feature_set.test_features), "test_features", where)
    if train.shape[1] != test.shape[1]:
        raise DataError(f"{where}: train_features have dim {train.shape[1]} but test_features "
                        f"have dim {test.shape[1]}; both splits must come from the same extractor")
    if np.all(train.max(axis=0) == train.min(axis=0)):
        raise DataError(f"{where}: 'train_features' are constant (every column has zero "
                        f"variance); nothing can be learned from them")
    train_labels = _check_labels(np.asarray(feature_set.train_labels), len(train), "train_labels", where)
    test_labels = _check_labels(np.asarray(feature_set.test_labels), len(test), "test_labels", where)
    if train_labels.ndim != test_labels.ndim or (
            train_labels.ndim == 2 and train_labels.shape[1] != test_labels.shape[1]):
        raise DataError(f"{where}: train_labels {train_labels.shape} and test_labels "
                        f"{test_labels.shape} use different label formats")
    names = feature_set.class_names
    return FeatureSet(train, train_labels, test, test_labels,
                      tuple(str(n) for n in names) if names is not None else None)


def load_features(path: str | os.PathLike) -> FeatureSet:
    """Loads and validates a feature `.npz` (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature file not found; pass --features with an existing .npz "
                        f"(see README 'Your own features')")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in REQUIRED_KEYS if k not in data.files]
            if missing:
                raise DataError(f"{path}: missing key(s) {', '.join(missing)} (has: "
                                f"{', '.join(data.files) or 'nothing'}); expected {', '.join(REQUIRED_KEYS)}")
            arrays = {k: data[k] for k in REQUIRED_KEYS}
            names = tuple(data["class_names"].tolist()) if "class_names" in data.files else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__}: {err}); "
                        f"the file may be truncated or corrupt, recreate it") from None
    return validate(FeatureSet(**arrays, class_names=names), where=str(path))


def save_features(path: str | os.PathLike, feature_set: FeatureSet, dtype=np.float32) -> Path:
    """Writes a feature set atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(feature_set, k) for k in REQUIRED_KEYS}
    arrays["train_features"] = np.asarray(arrays["train_features"], dtype=dtype)
    arrays["test_features"] = np.asarray(arrays["test_features"], dtype=dtype)
    if feature_set.class_names is not None:
        arrays["class_names"] = np.asarray(feature_set.class_names, dtype=str)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def per_class_queries(labels: np.ndarray, per_class: int = 100) -> np.ndarray:
    """Indices of the first `per_class` examples of each class ("q1k" for CIFAR-10).

    For multi-hot labels an example counts for its first label.
    """
    ids = labels if labels.ndim == 1 else np.argmax(labels, axis=1)
    picks = [np.flatnonzero(ids == c)[:per_class] for c in np.unique(ids)]
    return np.sort(np.concatenate(picks))
