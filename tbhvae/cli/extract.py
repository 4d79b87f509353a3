"""Extract backbone features of a labelled image source into a feature `.npz`.

    python -m tbhvae.cli.extract --images tfds:cifar10 --out cifar10_vgg16_fc7.npz \\
        [--backbone vgg16_fc7] [--weights imagenet|none|FILE] [--limit N]

Chunked and resumable (`tbhvae.data.extraction`): rerunning the same command
after a crash goes on from the last chunk written to OUT.partial/.
"""
from __future__ import annotations

from absl import flags

from tbhvae.cli import expect_no_arguments, fail, run_main, start_tensorflow

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the flags (called by `run`, so that importing this module defines none)."""
    from tbhvae.data.extraction import BACKBONES, CHUNK_SIZE, DEFAULT_BACKBONE

    flags.DEFINE_string("images", "tfds:cifar10", "Image source: tfds:NAME or a JPEG .npz path.")
    flags.DEFINE_string("out", None, "Output feature .npz.", required=True)
    flags.DEFINE_enum("backbone", DEFAULT_BACKBONE, list(BACKBONES), "Feature extractor.")
    flags.DEFINE_string("weights", "imagenet", "imagenet, none, or a path to a keras weights file.")
    flags.DEFINE_integer("batch_size", 64, "Images per backbone call.")
    flags.DEFINE_integer("chunk_size", CHUNK_SIZE, "Images per resumable chunk.")
    flags.DEFINE_integer("limit", None, "Extract only N images of each split, a class-stratified sample (seed 0); "
                         "the output records their rows as train_index / test_index.")
    flags.DEFINE_integer("input_size", None, "Square input side in pixels (default: the backbone's).")
    flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Stored feature dtype.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory.")
    flags.DEFINE_boolean("download", True, "Let TFDS download and prepare the dataset.")


def main(argv: list[str]) -> None:
    expect_no_arguments(argv)
    from tbhvae.data import DataError
    start_tensorflow()
    from tbhvae.data.extraction import extract_features

    try:
        extract_features(FLAGS.images, FLAGS.out, FLAGS.backbone, FLAGS.weights,
                         data_dir=FLAGS.data_dir, download=FLAGS.download,
                         batch_size=FLAGS.batch_size, chunk_size=FLAGS.chunk_size,
                         limit=FLAGS.limit, input_size=FLAGS.input_size, dtype=FLAGS.dtype)
    except DataError as err:
        fail(str(err))


def run() -> None:
    """Console entry point `tbhvae-extract`."""
    define_flags()
    run_main(main, __name__)


if __name__ == "__main__":
    run()
