"""Hamming-distance retrieval with an exported encoder: build an index, query it, draw examples.

    python -m tbhvae.cli.retrieval build --encoder exported/tbh --features cifar10_effnetlite0.npz \\
        --index cifar10_train.index.npz
    python -m tbhvae.cli.retrieval query --encoder exported/tbh --features cifar10_effnetlite0.npz \\
        --index cifar10_train.index.npz --k 10 --results results.json \\
        --images cifar10_jpeg.npz --figure retrieval.png --logdir runs/retrieval

`--encoder` is an exported SavedModel (its versions directory or one version), a `.tflite`
file or a training run directory. The database is the train split of the feature file
(ids = row numbers, labels stored in the index); queries are rows of its test split.
With `--images` (a JPEG .npz whose rows align with the feature file, e.g.
cifar10_jpeg.npz) and no `--features`, an image export encodes the JPEG files directly.
The figure (`tbhvae.retrieval.retrieval_figure`) shows one query per row, then its top-k.
An index records the encoder that built it (64 of its feature rows or JPEG files with their
codes); `query` refuses an encoder that codes them differently. An index without that record
(written by an older tbhvae) is searched with a warning on stderr: rebuild it to have it checked.
"""
from __future__ import annotations

from pathlib import Path

from absl import flags

from tbhvae.cli import fail, run_main, start_tensorflow

FLAGS = flags.FLAGS
COMMANDS = ("build", "query")


def define_flags() -> None:
    """Defines the flags (called by `run`, so that importing this module defines none)."""
    flags.DEFINE_string("encoder", None, "Exported SavedModel dir, .tflite file or training run dir (required).")
    flags.DEFINE_string("index", None, "Index file (.npz) to write (build) or read (query) (required).")
    flags.DEFINE_string("features", None, "Feature .npz: train split = database, test split = queries.")
    flags.DEFINE_string("images", None, "JPEG .npz aligned with the features (cifar10_jpeg.npz): images for the "
                        "figure, or what to encode when --features is not given.")
    flags.DEFINE_integer("k", 10, "Results per query.", lower_bound=1)
    flags.DEFINE_integer("queries", 0, "Use the first N test rows as queries (0 = all).", lower_bound=0)
    flags.DEFINE_string("results", None, "Write ids and distances here (.json or .npz).")
    flags.DEFINE_integer("show", 5, "Print the results of this many queries.", lower_bound=0)
    flags.DEFINE_bool("map", False, "Also compute mAP@1000 of the queries.")
    flags.DEFINE_string("figure", None, "Write the retrieval-examples PNG here (needs --images).")
    flags.DEFINE_integer("figure_rows", 10, "Queries in the figure (one random query per class in turn).",
                         lower_bound=1)
    flags.DEFINE_integer("figure_cell", 64, "Pixel size of each image in the figure.", lower_bound=8)
    flags.DEFINE_integer("seed", 0, "Seed of the figure's query choice.")
    flags.DEFINE_string("logdir", None, "Also write the figure to TensorBoard here.")


def main(argv) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:  # the command first: "frobnicate" is not a missing flag
        given = f"got {' '.join(argv[1:])!r}" if len(argv) > 1 else "no command given"
        fail(f"usage: python -m tbhvae.cli.retrieval build|query --encoder E --index I [--features F] ... "
             f"({given}); see --help")
    missing = [f"--{name}" for name in ("encoder", "index") if not getattr(FLAGS, name)]
    if missing:
        fail(f"{argv[1]} needs {' and '.join(missing)}; see --help")
    if argv[1] == "query" and (FLAGS.figure or FLAGS.logdir) and not FLAGS.images:  # before the search
        fail("--figure/--logdir need --images (a JPEG .npz aligned with the features)")
    start_tensorflow()
    from tbhvae import retrieval  # after flag parsing: --help stays fast
    from tbhvae.export import ExportError

    try:
        if argv[1] == "build":
            retrieval.build(FLAGS.encoder, FLAGS.features, FLAGS.images, FLAGS.index)
            return
        retrieval.query(FLAGS.encoder, FLAGS.features, FLAGS.images, FLAGS.index, FLAGS.k, FLAGS.queries,
                        FLAGS.results, FLAGS.show, FLAGS.map)
        if FLAGS.figure or FLAGS.logdir:
            retrieval.draw(FLAGS.encoder, FLAGS.features, FLAGS.images, FLAGS.index,
                           FLAGS.figure or str(Path(FLAGS.logdir) / "retrieval.png"), FLAGS.figure_rows,
                           FLAGS.k, FLAGS.figure_cell, FLAGS.seed, FLAGS.logdir)
    except (retrieval.RetrievalError, ExportError) as err:
        fail(str(err))


def run() -> None:
    """Console entry point `tbhvae-retrieval`."""
    define_flags()
    run_main(main, __name__)


if __name__ == "__main__":
    run()
