"""A second real feature set, for checking that a recommended config is not tuned to the shared one.

The shared file holds EfficientNet-Lite0's 1280-d head features (224 px, ReLU6,
non-negative). This writes another kind from the same JPEGs: the output of
Lite0's last MBConv block (`block15_project_bn`: 320 channels, a linear
projection, so signed and never clipped), average-pooled, with the images
resized to `--size` px (default 128, a coarser view than the head's 224).
`--train_rows` / `--test_rows` take class-stratified samples (a smaller
database). Rows keep their source image index (`train_index` / `test_index`).

  python -m bench.second_features --images ../shared/data/cifar10_jpeg.npz \
      --out ~/.cache/tbhvae/cifar10_lite0_block320_128px.npz
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if not __package__:  # run as `python bench/second_features.py`: the repository root holds `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import progress

LAYER = "block15_project_bn"  # the last MBConv block's projection: 320 channels
BATCH = 250


def block_model(size: int):
    """EfficientNet-Lite0 (ImageNet) up to `LAYER`, average-pooled: float32 [B, size, size, 3] in [-1, 1]
    -> [B, 320], as a tf.function."""
    import keras
    import tensorflow as tf

    from tbhvae.data import efficientnet_lite

    base = efficientnet_lite.efficientnet_lite0(weights="imagenet", input_shape=(size, size, 3))
    model = keras.Model(base.input, keras.layers.GlobalAveragePooling2D()(base.get_layer(LAYER).output))
    return tf.function(lambda x: model(x, training=False), reduce_retracing=True)


def block_features(infer, source, rows: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`infer`'s features float32 [n, 320] and the labels of the `rows` (None: all) of a JpegNpzSource."""
    import tensorflow as tf

    from tbhvae.data import efficientnet_lite

    split = source.description
    labels = source.labels() if rows is None else source.labels()[rows]
    dataset = source.dataset(rows=rows).batch(BATCH)
    parts, started = [], time.perf_counter()
    for images, _ in dataset:
        resized = tf.image.resize(tf.cast(images, tf.float32), (size, size), method="bilinear")
        parts.append(infer(efficientnet_lite.preprocess_input(resized)).numpy())
        done = sum(len(p) for p in parts)
        if len(parts) % 20 == 0 or done == len(labels):
            progress(f"{split}: {done}/{len(labels)} images ({done / (time.perf_counter() - started):.0f}/s)")
    return np.concatenate(parts).astype(np.float32), labels


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="JPEG .npz (e.g. ../shared/data/cifar10_jpeg.npz)")
    parser.add_argument("--out", required=True, help="feature .npz to write")
    parser.add_argument("--size", type=int, default=128, help="square input side, pixels (default %(default)s)")
    parser.add_argument("--train_rows", type=int, default=0, help="class-stratified train sample (0 = all)")
    parser.add_argument("--test_rows", type=int, default=0, help="class-stratified test sample (0 = all)")
    args = parser.parse_args(argv)

    from tbhvae.data import FeatureSet, save_features
    from tbhvae.data.images import JpegNpzSource
    from tbhvae.protocol import stratified_sample

    infer, splits = block_model(args.size), {}
    for split, count in (("train", args.train_rows), ("test", args.test_rows)):
        source = JpegNpzSource(args.images, split)
        rows = stratified_sample(source.labels(), count) if count else None
        splits[split] = (*block_features(infer, source, rows, args.size), rows)
    out = save_features(args.out, FeatureSet(
        splits["train"][0], splits["train"][1], splits["test"][0], splits["test"][1],
        extractor={"backbone": f"efficientnet_lite0:{LAYER}", "weights": "imagenet", "input_size": args.size},
        train_index=splits["train"][2], test_index=splits["test"][2]))
    progress(f"wrote {out}: train {splits['train'][0].shape}, test {splits['test'][0].shape}")
    return out


if __name__ == "__main__":
    main()
