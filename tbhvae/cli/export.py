"""Export a trained run as a deployable hash encoder.

    python export.py --model_dir runs/cifar10_tbh_32b --out exported --name tbh \\
        [--tflite_dir exported/tbh_tflite]

writes the SavedModel `exported/tbh/<next version>/` (TF Serving layout; signatures in
`tbhvae.export`; warmup requests in its assets.extra/), the TF Serving config file
`exported/models.config` (every model of --out) and, with --tflite_dir,
`float32.tflite`, `float16.tflite`, `dynamic.tflite` and `int8.tflite` in its own
next version `<tflite_dir>/<version>/`
(so an earlier export is never replaced), with a parity report against the Keras
model over the test features (`parity.json` next to the TFLite files, and a table on stdout).
With a backbone and `--images IMAGES.npz`, also `images_<variant>.tflite` (pixels in,
codes out) and a report of codes from images against the feature path of the same rows.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from absl import flags, logging

from tbhvae.cli import expect_no_arguments, fail, run_main, start_tensorflow

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the flags (called by `run`, so that importing this module defines none)."""
    flags.DEFINE_string("model_dir", None, "Run directory written by train.py.", required=True)
    flags.DEFINE_string("out", None, "Base directory; the SavedModel goes to OUT/NAME/<version>/.", required=True)
    flags.DEFINE_string("name", "tbh_encoder", "Model name (a directory under --out; TF Serving's model_name).")
    flags.DEFINE_string("tflite_dir", None, "Also write the TFLite variants and the parity report to "
                        "TFLITE_DIR/<next version>/.")
    flags.DEFINE_string("features", None, "Feature .npz for int8 calibration (train split) and the parity "
                        "report (test split); default: the run's config.features.")
    flags.DEFINE_string("images", None, "JPEG .npz aligned with --features (row i, or the feature file's "
                        "train_index / test_index): with a backbone and --tflite_dir, also write images_*.tflite "
                        "(pixels in, codes out) and compare codes from images with the feature path.")
    flags.DEFINE_integer("image_parity_examples", 2000, "Test images in the image parity report.", lower_bound=1)
    flags.DEFINE_string("backbone", None, "Add image signatures with this backbone (default: the extractor "
                        "recorded for the run's features, when known).")
    flags.DEFINE_string("backbone_weights", None, "imagenet, none or a weights file (default: the run's).")
    flags.DEFINE_bool("allow_backbone_mismatch", False, "Export image signatures with a --backbone other than the "
                      "extractor recorded for the run's features (experts: e.g. a backbone with compatible features).")
    flags.DEFINE_integer("backbone_input_size", None, "Square backbone input side in pixels "
                         "(default: the backbone's own).")
    flags.DEFINE_string("serving_root", "/models", "Where TF Serving sees --out (the Docker mount target); "
                        "OUT/models.config lists each model at SERVING_ROOT/<name>.")
    flags.DEFINE_enum("serving_default", "features", ["features", "images"], "Signature served as serving_default.")
    flags.DEFINE_integer("representative_examples", 1000, "Training rows used to calibrate the int8 variant.",
                         lower_bound=1)
    flags.DEFINE_integer("int8_fine_tune_steps", 1000, "With --images: quantisation-aware fine-tuning steps "
                         "(batch 16) of a copy of the backbone for images_int8.tflite (0 = post-training "
                         "quantisation only); about 0.7 s per step on one CPU core at 224 px.", lower_bound=0)
    flags.DEFINE_integer("int8_fine_tune_images", 5000, "Training images (class-stratified rows of --images) the "
                         "int8 fine-tuning distils on.", lower_bound=1)
    flags.DEFINE_integer("parity_examples", 0, "Test rows in the parity report (0 = all).", lower_bound=0)
    flags.DEFINE_integer("latency_repeats", 200, "Timed single-example calls per encoder in the parity report.",
                         lower_bound=1)
    flags.DEFINE_integer("num_threads", 1, "LiteRT interpreter threads in the parity report.", lower_bound=1)


def parity_features(run, path: str | None):
    """The feature set for calibration and parity: --features, else the run's config.features."""
    from tbhvae.data import DataError, load_features
    from tbhvae.export import ExportError

    path = path or run.config.features
    if not path:
        raise ExportError(f"--tflite_dir needs features for int8 calibration and the parity report: the run "
                          f"in {run.path} extracted its own, so pass --features FILE.npz")
    try:
        feature_set = load_features(path)
    except DataError as err:
        raise ExportError(str(err)) from None
    if feature_set.dim != run.input_dim:
        raise ExportError(f"{path}: features have dimension {feature_set.dim} but the run was trained on "
                          f"{run.input_dim}; pass the --features the run was trained on")
    return feature_set


def image_rows(feature_set, split: str, count: int | None = None):
    """(feature rows, image rows) of `split`: a class-stratified sample of `count` (all when None);
    image rows from the feature file's `<split>_index`, else equal to the feature rows."""
    import numpy as np

    from tbhvae.protocol import stratified_sample

    labels = getattr(feature_set, f"{split}_labels")
    rows = stratified_sample(labels, count) if count else np.arange(len(labels))
    index = getattr(feature_set, f"{split}_index")
    return rows, (index[rows] if index is not None else rows)


def write_tflite(run, path, representative, test, feature_set, calibration_images=None, backbone=None):
    """The TFLite variants and parity.json in a new version of --tflite_dir: (files, report, version dir).

    calibration_images: rows of --images' train split aligned with `representative` (the
    int8 image variant calibrates on the pixels of the rows the feature one calibrates on,
    images of several sizes resized to the backbone's input side), or None for the
    feature variants only; images_int8 then comes from a copy of `backbone` fine-tuned
    for int8 (--int8_fine_tune_steps)."""
    from tbhvae import encoders, export
    from tbhvae.data.images import decode_rgb_arrays
    from tbhvae.retrieval import jpeg_rows

    pixels = (decode_rgb_arrays(jpeg_rows(FLAGS.images, "train", calibration_images), size=backbone.input_size)
              if calibration_images is not None else None)
    with export.new_version(FLAGS.tflite_dir) as version, tempfile.TemporaryDirectory() as scratch:
        int8_source = None
        if pixels is not None and FLAGS.int8_fine_tune_steps:
            _, source_rows = image_rows(feature_set, "train", FLAGS.int8_fine_tune_images)
            images = decode_rgb_arrays(jpeg_rows(FLAGS.images, "train", source_rows), size=backbone.input_size)
            try:
                tuned = export.fine_tune_for_int8(backbone, run.model, images, FLAGS.int8_fine_tune_steps)
            except export.ExportError as err:  # a backbone it cannot rebuild: quantise the original
                print(f"warning: {err}; images_int8.tflite is quantised after training only", file=sys.stderr)
            else:
                int8_source = export.write_image_encoder(run, tuned, Path(scratch) / "int8_backbone")
        files = export.write_tflite_variants(path, version.staging, representative, representative_images=pixels,
                                             int8_images_source=int8_source)
        lite = {k: encoders.LiteEncoder(p, num_threads=FLAGS.num_threads) for k, p in files.items()}
        image_lite = {k: v for k, v in lite.items() if k.startswith("images_")}
        reference, saved_model = encoders.KerasEncoder(run), encoders.SavedModelEncoder(path)
        candidates = {"saved_model": saved_model, **{k: v for k, v in lite.items() if k not in image_lite}}
        report = export.parity_report(reference, candidates, test,
                                      {k: p for k, p in files.items() if k not in image_lite}, FLAGS.latency_repeats)
        report.update(saved_model=str(path), features=str(FLAGS.features or run.config.features),
                      representative_examples=len(representative), num_threads=FLAGS.num_threads)
        if image_lite:
            rows, source_rows = image_rows(feature_set, "test", FLAGS.image_parity_examples)
            report["images"] = export.image_parity_report(
                reference, feature_set.test_features[rows], jpeg_rows(FLAGS.images, "test", source_rows),
                saved_model, image_lite, files)
            report["images"]["source"] = str(FLAGS.images)
        (version.staging / "parity.json").write_text(json.dumps(report, indent=2))
    return files, report, version.final


def check_images_flag(run, backbone) -> None:
    """--images is used only with --tflite_dir and image signatures, and must be a JPEG .npz: else ExportError."""
    from tbhvae.export import ExportError
    from tbhvae.retrieval import image_count

    if not FLAGS.tflite_dir:
        raise ExportError("--images feeds the image TFLite variants and their parity report: pass --tflite_dir too")
    if backbone is None:
        raise ExportError(f"--images needs image signatures, but the run in {run.path} records no feature "
                          f"extractor that the export can rebuild; pass --backbone NAME (see --help)")
    image_count(FLAGS.images, "train")  # a missing file or another layout fails here, before any export
    image_count(FLAGS.images, "test")


def main(argv):
    expect_no_arguments(argv)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's saver chatter; --verbosity=0 shows it
    start_tensorflow()
    from tbhvae import export  # after flag parsing: --help stays fast
    from tbhvae.checks import check_writable
    from tbhvae.retrieval import RetrievalError

    try:  # both outputs before any work: a TFLite dir that fails must not leave a SavedModel behind
        check_writable(FLAGS.out, "--out", export.ExportError, directory=True)
        if FLAGS.tflite_dir:
            check_writable(FLAGS.tflite_dir, "--tflite_dir", export.ExportError, directory=True)
        run = export.load_run(FLAGS.model_dir)
        backbone = export.run_backbone(run, FLAGS.backbone, FLAGS.backbone_weights, FLAGS.backbone_input_size,
                                       FLAGS.allow_backbone_mismatch)
        if FLAGS.images:
            check_images_flag(run, backbone)
        feature_set = parity_features(run, FLAGS.features) if FLAGS.tflite_dir else None
        path = export.export_saved_model(run, FLAGS.out, FLAGS.name, backbone, FLAGS.serving_default,
                                         FLAGS.serving_root)
    except (export.ExportError, RetrievalError) as err:
        fail(str(err))
    signatures = ["serving_default", "encode_features"] + (["encode_images", "encode_jpeg"] if backbone else [])
    print(f"SavedModel written to {path} (signatures: {', '.join(signatures)}; "
          f"serving_default = {FLAGS.serving_default})")
    print(f"TF Serving: warmup requests in {path / export.WARMUP_FILE}, model config "
          f"{path.parent.parent / export.MODELS_CONFIG_FILE} (models under {FLAGS.serving_root})")
    if not FLAGS.tflite_dir:
        return
    calibration_images = None
    if FLAGS.images:
        rows, source_rows = image_rows(feature_set, "train", FLAGS.representative_examples)
        representative = feature_set.train_features[rows]
        calibration_images = source_rows
    else:
        representative = export.representative_rows(feature_set.train_features, FLAGS.representative_examples)
    test = feature_set.test_features[:FLAGS.parity_examples or None]
    try:
        files, report, version_dir = write_tflite(run, path, representative, test, feature_set, calibration_images,
                                                  backbone)
    except (export.ExportError, RetrievalError) as err:
        fail(f"{err} (the SavedModel {path} was written)")
    print("TFLite files: " + ", ".join(str(version_dir / p.name) for p in files.values()))
    print(export.format_parity_table(report))
    if "images" in report:
        print("from images: " + export.format_parity_table(report["images"]))
    print(f"parity report written to {version_dir / 'parity.json'}")
    int8 = report["rows"]["int8"]["bit_agreement"]
    if int8 < 0.98:
        print(f"warning: int8 bit agreement {100 * int8:.2f}% is below 98%; prefer dynamic.tflite")


def run():
    """Console entry point `tbhvae-export`."""
    define_flags()
    run_main(main, __name__)


if __name__ == "__main__":
    run()
