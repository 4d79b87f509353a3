"""The database codes in TensorBoard's projector: a class-stratified sample, its labels, thumbnails.

Written by the final evaluation to `logs/projector/`: the codes as +-1 vectors
(Euclidean distance 2 sqrt(Hamming distance), so neighbours in the projector
are Hamming neighbours), `metadata.tsv` with each row's class names and, when
the run's features were extracted from a JPEG .npz (rows aligned with the
images), `sprite.png` with a thumbnail of each row.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from tbhvae import protocol

SAMPLE = 2000  # rows shown (the projector stays responsive at this size)
THUMBNAIL = 32  # pixels per sprite image side


def write_projector(directory: str | Path, codes: np.ndarray, labels: np.ndarray,
                    class_names: tuple[str, ...] | None = None, images: str | None = None, seed: int = 0) -> Path:
    """Writes the projector files for database codes 0/1 [n, M] with labels [n] or [n, C]; returns the folder.

    images: a JPEG .npz whose train split is aligned with `codes` (thumbnails), or None.
    """
    from tensorboard.plugins import projector

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = protocol.stratified_sample(labels, SAMPLE, seed)
    embedding = tf.Variable(2.0 * codes[rows].astype(np.float32) - 1.0, name="codes")
    tf.train.Checkpoint(embedding=embedding).save(str(directory / "embedding"))
    (directory / "metadata.tsv").write_text("".join(f"{_label_text(labels[r], class_names)}\n" for r in rows))
    config = projector.ProjectorConfig()
    entry = config.embeddings.add()
    entry.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    entry.metadata_path = "metadata.tsv"
    if images is not None:
        _write_sprite(directory / "sprite.png", images, rows)
        entry.sprite.image_path = "sprite.png"
        entry.sprite.single_image_dim.extend([THUMBNAIL, THUMBNAIL])
    projector.visualize_embeddings(str(directory), config)
    return directory


def _label_text(label: np.ndarray, class_names: tuple[str, ...] | None) -> str:
    """A class id or a multi-hot row as names ("cat", "person+dog"); ids when there are no names."""
    ids = [int(label)] if np.ndim(label) == 0 else np.flatnonzero(label).tolist()
    return "+".join(class_names[i] if class_names else str(i) for i in ids) or "(none)"


def _write_sprite(path: Path, images: str, rows: np.ndarray) -> None:
    """A square grid of THUMBNAIL-pixel thumbnails of the train images `rows`, row-major (the projector's order)."""
    from PIL import Image

    from tbhvae.data.images import decode_rgb
    from tbhvae.retrieval import jpeg_rows

    side = int(np.ceil(np.sqrt(len(rows))))
    sprite = Image.new("RGB", (side * THUMBNAIL, side * THUMBNAIL), (255, 255, 255))
    for position, encoded in enumerate(jpeg_rows(images, "train", rows)):
        thumbnail = tf.image.resize(decode_rgb(encoded),
                                    [THUMBNAIL, THUMBNAIL]).numpy().clip(0, 255).astype(np.uint8)
        sprite.paste(Image.fromarray(thumbnail), ((position % side) * THUMBNAIL, (position // side) * THUMBNAIL))
    sprite.save(path)
