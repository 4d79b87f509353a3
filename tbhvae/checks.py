"""Input checks and safe writes shared by every module: labels, feature arrays, atomic files.

Each check returns the normalised array or raises `error` (ValueError by default,
or a subclass such as DataError) with a one-line message that starts with `name`.
"""
from __future__ import annotations

import contextlib
import os
import re
import zipfile
from pathlib import Path

import numpy as np


def check_labels(labels, count: int, name: str, error: type[Exception] = ValueError) -> np.ndarray:
    """Class ids [count] (non-negative integers) -> int64, or multi-hot 0/1 [count, C] -> uint8."""
    labels = np.asarray(labels)
    if labels.ndim not in (1, 2) or labels.shape[0] != count:
        raise error(f"{name}: expected class ids [{count}] or multi-hot [{count}, C] (one row per item), "
                    f"got shape {labels.shape}")
    if labels.size and labels.dtype.kind not in "biuf":
        raise error(f"{name}: labels must be numeric, got dtype {labels.dtype}")
    if labels.size and labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
        raise error(f"{name}: labels hold NaN or Inf")
    if labels.ndim == 1:
        if labels.size and (labels.min() < 0 or np.any(labels != np.round(labels))):
            raise error(f"{name}: class ids must be non-negative integers")
        return labels.astype(np.int64)
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise error(f"{name}: multi-hot labels must hold only 0 and 1")
    return labels.astype(np.uint8)


def check_count(value, name: str, allow_zero: bool = False) -> int:
    """`value` (a k or a radius) as a positive int, or non-negative with `allow_zero`; ValueError otherwise."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        kind = "a non-negative integer" if allow_zero else "a positive integer"
        raise ValueError(f"{name}: expected {kind}, got {value!r}")
    return int(value)


def check_features(features, name: str, dim: int | None = None, error: type[Exception] = ValueError,
                   ) -> np.ndarray:
    """Non-empty, finite, numeric [n, D] (D == dim when given) -> float32 [n, D]."""
    array = np.asarray(features)
    if array.ndim != 2:
        raise error(f"{name}: expected a 2-D array [n, D], got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise error(f"{name}: expected a numeric array, got dtype {array.dtype}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise error(f"{name}: expected a non-empty array, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise error(f"{name}: has {array.shape[1]} dimensions but {dim} are expected")
    array = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        row = int(np.argwhere(~finite)[0, 0])
        raise error(f"{name} holds {int((~finite).sum())} NaN/Inf values (first in row {row}); "
                    f"clean or drop those rows")
    return array


def split_files(data, offsets, data_key: str, offsets_key: str, allow_empty: bool = False) -> list[bytes]:
    """Files stored as one array: uint8 [total] bytes + int [n + 1] bounds (0, ..., total) -> n files.

    The layout of a JPEG .npz (`{split}_bytes` / `{split}_offsets`) and of an index's image probe;
    raises ValueError naming the keys when the arrays do not hold n >= 1 consecutive files (non-empty
    unless `allow_empty`).
    """
    data, offsets = np.asarray(data), np.asarray(offsets)
    if data.ndim != 1 or data.dtype != np.uint8:
        raise ValueError(f"'{data_key}' must be a 1-D uint8 array, got shape {data.shape} dtype {data.dtype}")
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer) or len(offsets) < 2:
        raise ValueError(f"'{offsets_key}' must be a 1-D integer array of n + 1 >= 2 offsets, got shape "
                         f"{offsets.shape} dtype {offsets.dtype}")
    if offsets[0] != 0 or offsets[-1] != len(data):
        raise ValueError(f"'{offsets_key}' must start at 0 and end at len({data_key}) = {len(data)}, got "
                         f"{offsets[0]} .. {offsets[-1]}")
    sizes = np.diff(offsets)
    bad = np.flatnonzero(sizes < 0 if allow_empty else sizes <= 0)
    if bad.size:
        order = "non-decreasing" if allow_empty else "strictly increasing"
        raise ValueError(f"'{offsets_key}' must be {order}, but image {bad[0]} has {sizes[bad[0]]} bytes")
    buffer = data.tobytes()
    return [buffer[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def join_files(files) -> tuple[np.ndarray, np.ndarray]:
    """n files (bytes) -> (uint8 [total] bytes, int64 [n + 1] bounds): the layout `split_files` reads."""
    offsets = np.concatenate([[0], np.cumsum([len(file) for file in files])]).astype(np.int64)
    return np.frombuffer(b"".join(files), np.uint8), offsets


def check_writable(path: str | os.PathLike, name: str, error: type[Exception] = ValueError,
                   directory: bool = False) -> Path:
    """Raises `error` unless `path` (a file, or a directory when `directory`) can be written.

    Checked before long work, so an unwritable output is found before it costs anything:
    `path` must not be the other kind of entry, and its nearest existing ancestor must be a
    writable directory. Nothing is created.
    """
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        kind = "a file" if directory else "a directory"
        raise error(f"{name} {path}: is {kind}; pass a {'directory' if directory else 'file'} path")
    existing = path if directory else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise error(f"{name} {path}: {existing} is a file, not a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error(f"{name} {path}: {existing} is not writable; choose a writable location")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yields a temporary sibling of `path` to write; it replaces `path` only if the block succeeds.

    Readers see the old file or the new one, never a partial one; a failed block leaves no temporary.
    `suffix` keeps an extension a writer insists on (np.savez appends ".npz" otherwise).
    """
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes text or bytes to `path` atomically (see `atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
    return Path(path)


def open_npz(path: str | os.PathLike):
    """np.load of the .npz archive at `path`, pickles refused (use as a context manager).

    ValueError "not an .npz archive" for any other file: np.load would otherwise take it for a
    pickle and answer with a misleading hint about allow_pickle.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError("not an .npz archive")
    return np.load(path, allow_pickle=False)


def tf_message_lines(message: str) -> list[str]:
    """The non-empty lines of an error message, stripped, TF's {{function_node ...}} / {{node ...}} tags dropped."""
    text = re.sub(r"\{\{[^}]*\}\}", "", message)
    return [line.strip() for line in text.splitlines() if line.strip()]


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of an exception's message, else its type name (for one-line errors).

    TF's {{function_node ...}} / {{node ...}} tags are dropped. limit: at most about this many
    characters, " ... " marking a cut in the middle, so that the end of the line, where the
    operating system's reason stands ("...: No space left on device"), is kept.
    """
    lines = tf_message_lines(str(err))
    line = lines[0] if lines else type(err).__name__
    if limit is None or len(line) <= limit:
        return line
    return f"{line[:limit // 2]} ... {line[-(limit // 2):]}"
