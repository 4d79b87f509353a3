"""Retrieval with an exported encoder: index the train split, query it with the test split, draw examples.

`build`, `query` and `draw` are the commands of `tbhvae.cli.retrieval` (its
docstring shows the command lines). An encoder is an exported SavedModel, a
`.tflite` file or a training run directory (`tbhvae.encoders.open_encoder`).
In the figure, retrieved images relevant to the query (`tbhvae.protocol.relevant`)
are framed green, the others red.

`build` records the encoder in the index (`index.EncoderProbe`: 64 of the feature
rows, or of the JPEG files when built from images, with their codes);
`check_same_encoder` (query, draw, the search service) encodes them again and
refuses an encoder that agrees on fewer than MIN_PROBE_AGREEMENT of the bits. An
index without a probe (an older tbhvae) gets one warning line on stderr instead.
"""
from __future__ import annotations

import functools
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from tbhvae import protocol
from tbhvae.checks import atomic_path, atomic_write, check_count, check_writable, open_npz
from tbhvae.index import EncoderProbe

FRAME_QUERY = (90, 90, 90)
FRAME_CORRECT = (0, 170, 0)
FRAME_WRONG = (220, 0, 0)
BACKGROUND = (255, 255, 255)
HEADER = 16  # pixels of title text above the grid
SPACING = 2  # pixels between tiles
QUERY_GAP = 12  # extra pixels between the query column and the results
PROBE_ROWS = 64  # database rows (features or JPEG files) an index keeps to recognise its encoder
# The TFLite variants of one model keep >= 98% of its bits (the export parity limits); two models ~50%.
MIN_PROBE_AGREEMENT = 0.9


class RetrievalError(ValueError):
    """Bad retrieval input; the message names the file or flag and the fix."""


# ------------------------------------------------------------------ images
def jpeg_rows(path: str | Path, split: str, rows) -> list[bytes]:
    """The encoded images `rows` of `split` in a JPEG .npz (layout of cifar10_jpeg.npz)."""
    encoded, offsets = _jpeg_split(path, split)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(offsets) - 1):
        raise RetrievalError(f"{path}: '{split}' has {len(offsets) - 1} images but row {rows.max()} was "
                             f"asked for; the image file must align row by row with the features")
    return [encoded[offsets[r]:offsets[r + 1]].tobytes() for r in rows]


def _jpeg_split(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(concatenated JPEG bytes uint8 [total], offsets int [n + 1]) of `split`, read once per file version."""
    stat = Path(path).stat() if Path(path).is_file() else None
    return _read_jpeg_split(str(path), split, stat and (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=2)
def _read_jpeg_split(path: str, split: str, version) -> tuple[np.ndarray, np.ndarray]:
    with _open_jpeg_npz(path) as data:
        keys = (f"{split}_bytes", f"{split}_offsets")
        if any(k not in data.files for k in keys):
            raise RetrievalError(f"{path}: missing {' or '.join(keys)}; expected the layout of cifar10_jpeg.npz")
        return data[keys[0]], data[keys[1]]


def image_count(path: str | Path, split: str) -> int:
    """Number of images of `split` in a JPEG .npz; RetrievalError when it is missing or not one."""
    with _open_jpeg_npz(path) as data:
        key = f"{split}_offsets"
        if key not in data.files:
            raise RetrievalError(f"{path}: missing {key}; expected the layout of cifar10_jpeg.npz")
        return len(data[key]) - 1


def _open_jpeg_npz(path: str | Path):
    """The opened .npz at `path` (use as a context manager); RetrievalError when it is missing or not an .npz."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"{path}: JPEG .npz not found; pass --images with e.g. ../shared/data/cifar10_jpeg.npz")
    try:
        return open_npz(path)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise RetrievalError(f"{path}: not a JPEG .npz ({err})") from None


def _tile(encoded: bytes, cell: int, border: int, colour) -> np.ndarray:
    """A decoded image scaled (centre-cropped to a square) to cell x cell, framed: uint8 [T, T, 3]."""
    import io

    from PIL import Image, ImageOps

    image = ImageOps.fit(Image.open(io.BytesIO(encoded)).convert("RGB"), (cell, cell), Image.Resampling.BILINEAR)
    tile = np.empty((cell + 2 * border, cell + 2 * border, 3), np.uint8)
    tile[:] = colour
    tile[border:border + cell, border:border + cell] = np.asarray(image)
    return tile


def figure_size(rows: int, k: int, cell: int, border: int) -> tuple[int, int]:
    """(height, width) in pixels of `retrieval_figure` for `rows` queries and top-`k`."""
    tile = cell + 2 * border
    return HEADER + rows * (tile + SPACING) + SPACING, SPACING + tile + QUERY_GAP + k * (tile + SPACING)


def retrieval_figure(query_images: list[bytes], result_images: list[list[bytes]], correct: np.ndarray,
                     cell: int = 64, border: int = 4, title: str = "") -> np.ndarray:
    """Paper-style retrieval examples: uint8 [H, W, 3] (size from `figure_size`).

    query_images: encoded images [rows]; result_images: encoded images [rows][k];
    correct: bool [rows, k], whether each result is relevant to its query (green
    frame) or not (red frame).
    """
    from PIL import Image, ImageDraw

    correct = np.asarray(correct, bool)
    rows, k = correct.shape
    if len(query_images) != rows or len(result_images) != rows or any(len(r) != k for r in result_images):
        raise ValueError(f"retrieval_figure: need {rows} query images and {rows} x {k} results")
    tile = cell + 2 * border
    height, width = figure_size(rows, k, cell, border)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = BACKGROUND
    for r in range(rows):
        top = HEADER + SPACING + r * (tile + SPACING)
        canvas[top:top + tile, SPACING:SPACING + tile] = _tile(query_images[r], cell, border, FRAME_QUERY)
        for j in range(k):
            left = SPACING + tile + QUERY_GAP + j * (tile + SPACING)
            colour = FRAME_CORRECT if correct[r, j] else FRAME_WRONG
            canvas[top:top + tile, left:left + tile] = _tile(result_images[r][j], cell, border, colour)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    draw.text((SPACING, 2), "query", fill=(0, 0, 0))
    draw.text((SPACING + tile + QUERY_GAP, 2), title or f"top {k} by Hamming distance "
              f"(green: relevant, red: not)", fill=(0, 0, 0))
    return np.asarray(picture)


def figure_queries(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` query rows: one random query per class in turn (single-label), else random rows."""
    rng = np.random.default_rng(seed)
    if labels.ndim == 1:
        classes = np.unique(labels)
        picks = [rng.choice(np.flatnonzero(labels == classes[i % len(classes)])) for i in range(count)]
        return np.asarray(picks, dtype=np.int64)
    return np.sort(rng.choice(len(labels), size=min(count, len(labels)), replace=False))


# ------------------------------------------------------------------ commands
@functools.lru_cache(maxsize=1)
def _encoder(path: str):
    from tbhvae.encoders import open_encoder

    return open_encoder(path)


@functools.lru_cache(maxsize=1)
def _feature_set(path: str):
    from tbhvae.data import DataError, load_features

    try:
        return load_features(path)
    except DataError as err:
        raise RetrievalError(str(err)) from None


def encode_split(encoder_path: str, features_path: str | None, images_path: str | None, split: str,
                 rows=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes 0/1 uint8 [n, M] and labels of a split (all rows, or `rows`).

    From `features_path` (any encoder) or, without it, from the JPEG files of
    `images_path` (an exported SavedModel with image signatures).
    """
    from tbhvae.encoders import SavedModelEncoder

    encoder = _encoder(encoder_path)
    if features_path:
        feature_set = _feature_set(features_path)
        features = getattr(feature_set, f"{split}_features")
        labels = getattr(feature_set, f"{split}_labels")
        if feature_set.dim != encoder.input_dim:
            raise RetrievalError(f"{features_path}: features have dimension {feature_set.dim} but the encoder "
                                 f"takes {encoder.input_dim}; use the features the model was trained on")
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size and rows.max() >= len(features):
                raise RetrievalError(f"{features_path}: the {split} split has {len(features)} rows, fewer than "
                                     f"the {rows.max() + 1} asked for (lower --queries)")
            features, labels = features[rows], labels[rows]
        return encoder.encode(features)["bits"], labels
    if not images_path:
        raise RetrievalError("pass --features FILE.npz (or --images FILE.npz with an image export)")
    if not isinstance(encoder, SavedModelEncoder):
        raise RetrievalError("encoding images needs an exported SavedModel with image signatures as --encoder")
    count = image_count(images_path, split)
    rows = np.arange(count) if rows is None else np.asarray(rows)
    with np.load(images_path, allow_pickle=False) as data:
        labels = data[f"{split}_labels"][rows] if f"{split}_labels" in data.files else None
    return encoder.encode_jpeg(jpeg_rows(images_path, split, rows))["bits"], labels


def _probe_codes(encoder, probe: EncoderProbe) -> np.ndarray | None:
    """`encoder`'s codes 0/1 [P, M] of the probe's inputs, or None when it takes no such inputs.

    JPEG probes go through the SavedModel's encode_jpeg, or, for an images_*.tflite,
    through its image input after decoding as encode_jpeg does; feature-only encoders
    cannot encode them.
    """
    from tbhvae.encoders import LiteEncoder, SavedModelEncoder

    if probe.kind == "features":
        return None if encoder.input_dim is None else encoder.encode(probe.inputs)["bits"]
    if isinstance(encoder, SavedModelEncoder) and "encode_jpeg" in encoder.loaded.signatures:
        return encoder.encode_jpeg(list(probe.inputs))["bits"]
    if isinstance(encoder, LiteEncoder) and encoder.image_input:
        from tbhvae.data.images import decode_rgb_list
        from tbhvae.export.parity import encode_images_by_size

        return encode_images_by_size(encoder, decode_rgb_list(list(probe.inputs)))["bits"]
    return None


def check_same_encoder(index, encoder_path: str, index_path: str) -> None:
    """Refuses an encoder other than the one that built `index`, by the index's probe (`EncoderProbe`).

    Where the check cannot be made (an index without a probe, written by a tbhvae
    older than the probe, or a probe of images and an encoder that takes only
    features) it prints one warning line on stderr and lets the search go on.
    """
    probe = index.encoder_probe
    if probe is None:
        print(f"warning: {index_path} does not record which encoder built it (written by an older tbhvae), so "
              f"{encoder_path} cannot be checked against it; rebuild the index to have it checked",
              file=sys.stderr)
        return
    encoder = _encoder(encoder_path)
    if probe.kind == "features" and encoder.input_dim not in (None, probe.inputs.shape[1]):
        raise RetrievalError(f"{index_path} was built by an encoder of {probe.inputs.shape[1]}-d features but "
                             f"{encoder_path} takes {encoder.input_dim}-d ones; use the encoder that built it")
    codes = _probe_codes(encoder, probe)
    if codes is None:
        built_from, takes = ("features", "images") if probe.kind == "features" else ("images", "features")
        print(f"warning: {index_path} was built from {built_from} but {encoder_path} takes only {takes}, so it "
              f"cannot be checked against the encoder that built the index; pass that encoder, or rebuild "
              f"the index from {takes} with this one", file=sys.stderr)
        return
    if codes.shape[1] != probe.codes.shape[1]:
        raise RetrievalError(f"{index_path} holds {probe.codes.shape[1]}-bit codes but {encoder_path} makes "
                             f"{codes.shape[1]}-bit codes; build the index with this encoder")
    agreement = probe.agreement(codes)
    if agreement < MIN_PROBE_AGREEMENT:
        inputs = "rows" if probe.kind == "features" else "images"
        raise RetrievalError(f"{index_path} was built by another encoder: on its {len(probe.inputs)} probe {inputs} "
                             f"{encoder_path} agrees on {agreement:.0%} of the bits (the same model in any "
                             f"format: >= {MIN_PROBE_AGREEMENT:.0%}); rebuild the index with this encoder")


def build(encoder: str, features: str | None, images: str | None, index_path: str):
    """Encodes the train split and saves a HammingIndex (ids = rows, with labels) to `index_path`."""
    from tbhvae.index import HammingIndex

    check_writable(index_path, "--index", RetrievalError)  # before the encoding, which can take long
    start = time.perf_counter()
    codes, labels = encode_split(encoder, features, images, "train")
    index = HammingIndex(codes, labels=labels)
    # remember which encoder made the codes: its codes of a few of the inputs
    rows = np.sort(np.random.default_rng(0).choice(len(codes), min(PROBE_ROWS, len(codes)), replace=False))
    if features:
        index.encoder_probe = EncoderProbe(_feature_set(features).train_features[rows], codes[rows])
    else:
        index.encoder_probe = EncoderProbe(tuple(jpeg_rows(images, "train", rows)), codes[rows], kind="jpeg")
    try:
        Path(index_path).parent.mkdir(parents=True, exist_ok=True)
        index.save(index_path)
    except OSError as err:
        raise RetrievalError(f"--index {index_path}: cannot write it ({err.strerror or err}); nothing was "
                             f"written, free disk space or choose another path") from None
    print(f"indexed {len(index)} codes of {index.bits} bits in {time.perf_counter() - start:.1f} s "
          f"-> {index_path} ({Path(index_path).stat().st_size / 2**20:.2f} MiB)")
    return index


def query(encoder: str, features: str | None, images: str | None, index_path: str, k: int,
          num_queries: int, results_path: str | None, show: int, compute_map: bool) -> dict:
    """Top-k search for the first `num_queries` test rows (0 = all); prints and saves results."""
    from tbhvae.index import HammingIndex

    try:  # before any work: a negative count would search no query and report precision nan
        check_count(k, "--k")
        check_count(num_queries, "--queries", allow_zero=True)
    except ValueError as err:
        raise RetrievalError(str(err)) from None
    if results_path:
        check_writable(results_path, "--results", RetrievalError)
    try:
        index = HammingIndex.load(index_path)
    except (OSError, ValueError) as err:
        raise RetrievalError(f"--index: {err}") from None
    check_same_encoder(index, encoder, index_path)
    rows = None if not num_queries else np.arange(num_queries)
    codes, labels = encode_split(encoder, features, images, "test", rows)
    if codes.shape[1] != index.bits:
        raise RetrievalError(f"{index_path} holds {index.bits}-bit codes but the encoder makes "
                             f"{codes.shape[1]}-bit codes; build the index with the same encoder")
    start = time.perf_counter()
    distances, ids = index.search(codes, k)
    seconds = time.perf_counter() - start
    summary = {"queries": len(codes), "k": int(ids.shape[1]), "search_seconds": seconds}
    print(f"searched {len(codes)} queries, top {ids.shape[1]} of {len(index)} in {seconds:.3f} s")
    db_labels = index.labels
    if labels is not None and db_labels is not None:
        hits = protocol.relevant(labels, db_labels[ids])
        summary[f"precision@{ids.shape[1]}"] = float(hits.mean())
        print(f"precision@{ids.shape[1]}: {hits.mean():.4f}")
        if compute_map:
            from tbhvae.evaluation import mean_average_precision
            summary["map@1000"] = mean_average_precision(codes, index.codes, labels, db_labels, top_k=1000)
            print(f"mAP@1000: {summary['map@1000']:.4f}")
    for q in range(min(show, len(codes))):
        detail = f" labels {db_labels[ids[q]].tolist()} (query {labels[q].tolist()})" if (
            labels is not None and db_labels is not None and labels.ndim == 1) else ""
        print(f"query {q}: ids {ids[q].tolist()} distances {distances[q].tolist()}{detail}")
    if results_path:
        path = Path(results_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".npz":
                with atomic_path(path, ".tmp.npz") as tmp:
                    np.savez(tmp, ids=ids, distances=distances, query_rows=np.arange(len(codes)))
            else:
                atomic_write(path, json.dumps({**summary, "ids": ids.tolist(), "distances": distances.tolist()}))
        except OSError as err:
            raise RetrievalError(f"--results {path}: cannot write it ({err.strerror or err})") from None
        print(f"results written to {path}")
    return summary


def draw(encoder: str, features: str | None, images: str, index_path: str, figure_path: str, rows: int,
         k: int, cell: int, seed: int, logdir: str | None) -> np.ndarray:
    """Writes the retrieval-examples PNG (and a TensorBoard image when `logdir`)."""
    from tbhvae.index import HammingIndex

    index = HammingIndex.load(index_path)
    check_same_encoder(index, encoder, index_path)
    if index.labels is None:
        raise RetrievalError(f"{index_path}: the index has no labels, so results cannot be marked right or wrong")
    if image_count(images, "train") != len(index) or index.ids.min() < 0 or index.ids.max() >= len(index):
        raise RetrievalError(f"{images}: its {image_count(images, 'train')} train images do not align with the "
                             f"{len(index)} codes of {index_path} (ids must be feature rows)")
    if features:
        test_labels = _feature_set(features).test_labels
    else:
        with np.load(images, allow_pickle=False) as data:
            test_labels = data["test_labels"]
    picks = figure_queries(test_labels, rows, seed)
    codes, labels = encode_split(encoder, features, images, "test", picks)
    _, ids = index.search(codes, k)
    order = np.argsort(index.ids)
    positions = order[np.searchsorted(index.ids, ids, sorter=order)]
    hits = protocol.relevant(labels, index.labels[positions])
    query_images = jpeg_rows(images, "test", picks)
    result_images = [jpeg_rows(images, "train", row_ids) for row_ids in ids]
    picture = retrieval_figure(query_images, result_images, hits, cell=cell)
    from PIL import Image

    Path(figure_path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(figure_path)
    print(f"figure written to {figure_path} ({picture.shape[1]} x {picture.shape[0]} px, "
          f"{hits.mean():.0%} of shown results relevant)")
    if logdir:
        import tensorflow as tf

        with tf.summary.create_file_writer(logdir).as_default():
            tf.summary.image("retrieval/examples", picture[None], step=0,
                             description=f"queries from {features or images} against {index_path}")
        print(f"TensorBoard image written to {logdir} (tensorboard --logdir {logdir})")
    return picture


if __name__ == "__main__":  # python -m tbhvae.retrieval: the same command as tbhvae-retrieval
    from tbhvae.cli.retrieval import run

    run()
