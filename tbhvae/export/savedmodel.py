"""SavedModel export of a training run: restore it, build the signatures, write a TF Serving version.

A version directory `base/name/<N>/` holds the SavedModel, in METADATA_FILE where it
came from (run, checkpoint, bits, backbone, signatures) and TF Serving's warmup requests
(`tbhvae.export.serving.WARMUP_FILE`); `base/models.config` lists the models of `base`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

import keras
import tensorflow as tf

from tbhvae.checks import check_writable, first_line
from tbhvae.codes import num_bytes
from tbhvae.config import Config
from tbhvae.data.images import decode_rgb
from tbhvae.export.serving import warmup_inputs, write_models_config, write_warmup_requests
from tbhvae.hashing_model import HashingModel, create_model
from tbhvae.train.rundir import RunDirectory, RunDirError

OUTPUT_NAMES = ("bits", "packed", "probs")
METADATA_FILE = "assets.extra/tbhvae.json"  # inside a version directory; ignored by TF Serving
_RENAME_ATTEMPTS = 10  # versions tried when concurrent exports race for the next one
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # most significant bit first, as np.packbits


class ExportError(ValueError):
    """A run, export directory or encoder that cannot be used; the message says what to do."""


# ------------------------------------------------------------------ trained run
@dataclasses.dataclass
class TrainedRun:
    """A restored training run: the model with its checkpoint weights."""

    path: Path
    config: Config
    input_dim: int
    checkpoint: str
    model: HashingModel
    extractor: dict | None = None  # {"backbone", "weights", "input_size"} that made the features; None: unknown


def load_run(model_dir: str | os.PathLike) -> TrainedRun:
    """Restores the latest intact checkpoint of a run directory written by train.py.

    Raises ExportError (one line, naming the directory) for a missing, empty or
    foreign directory, or a checkpoint that does not fit the saved config.
    """
    run_dir = RunDirectory(model_dir)
    path = run_dir.path
    hint = "pass the --model_dir that train.py wrote (it holds config.json, data.json and checkpoints/)"
    if not path.is_dir():
        raise ExportError(f"{path}: no such directory; {hint}")
    if not run_dir.config_path.is_file():
        raise ExportError(f"{path}: not a training run (no config.json); {hint}")
    try:
        config = run_dir.saved_config()
        input_dim, dataset_size = run_dir.data_info()
    except ValueError as err:  # a ConfigError (config.json) or data.json
        raise ExportError(f"{err}; {hint}") from None
    try:
        checkpoint = run_dir.resume_checkpoint()
    except RunDirError as err:
        raise ExportError(str(err)) from None
    if checkpoint is None:
        raise ExportError(f"{path}: no checkpoint in {run_dir.checkpoints}; train first "
                          f"(python train.py --model_dir {path}) or pass another --model_dir")
    model = create_model(config, input_dim, dataset_size)
    model.build_all()
    try:
        tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as err:
        raise ExportError(f"{checkpoint}: does not match the model of {run_dir.config_path} "
                          f"({first_line(err, limit=200)}); a run from before "
                          f"tbhvae's encoder/decoder sub-layers must be retrained") from None
    return TrainedRun(path, config, input_dim, checkpoint, model, run_dir.extractor())


# ------------------------------------------------------------------ signatures
def pack_bits(bits: tf.Tensor) -> tf.Tensor:
    """0/1 uint8 [B, M] -> uint8 [B, ceil(M / 8)], MSB first, last byte zero-padded (np.packbits)."""
    count = bits.shape[-1]
    nbytes = num_bytes(count)
    values = tf.cast(bits, tf.int32)
    if nbytes * 8 != count:
        values = tf.pad(values, [[0, 0], [0, nbytes * 8 - count]])
    values = tf.reshape(values, [-1, nbytes, 8])
    return tf.cast(tf.reduce_sum(values * tf.constant(_BIT_WEIGHTS, tf.int32), axis=2), tf.uint8)


def hash_outputs(model: HashingModel, features: tf.Tensor, with_logits: bool = False) -> dict:
    """The signature outputs (see `tbhvae.export`) for float32 features [B, D], plus
    the binary-head logits float32 [B, M] when `with_logits`."""
    code = model.encode(features)
    outputs = {"bits": code["bits"], "packed": pack_bits(code["bits"]), "probs": code["probs"]}
    if with_logits:
        outputs["logits"] = code["logits"]
    return outputs


@dataclasses.dataclass
class Backbone:
    """An image feature extractor in front of the hash head."""

    name: str
    weights: str
    model: object  # keras.Model float32 [B, S, S, 3] -> [B, D]
    preprocess: object  # uint8/float RGB [B, H, W, 3] -> float32 [B, S, S, 3]
    input_size: int  # S, pixels


def load_backbone(name: str, weights: str, input_dim: int, input_size: int | None = None) -> Backbone:
    """Builds a backbone of `tbhvae.data.extraction` and checks it yields input_dim features."""
    from tbhvae.data import DataError
    from tbhvae.data.extraction import build_backbone  # heavy (keras.applications); only when needed

    try:
        model, preprocess, output_dim = build_backbone(name, weights, input_size)
    except DataError as err:
        raise ExportError(f"backbone: {err}") from None
    if output_dim != input_dim:
        raise ExportError(f"backbone {name} gives {output_dim}-d features but the run was trained on "
                          f"{input_dim}-d features; pass the --backbone the features were made with")
    return Backbone(name, weights, model, preprocess, int(model.input_shape[1]))


def run_backbone(run: TrainedRun, name: str | None = None, weights: str | None = None,
                 input_size: int | None = None, allow_mismatch: bool = False) -> Backbone | None:
    """The backbone for the image signatures, or None (features only).

    By default the extractor that made the run's features, when the run records it
    (feature files of tbhvae-extract, runs that extracted their own); for older runs
    the config's backbone when the run extracted its own features. An explicit
    `name` other than the recorded extractor is refused (ExportError) unless
    `allow_mismatch`: its image codes would hash features the model never saw.
    """
    known = run.extractor
    if name is not None and known is not None and name != known["backbone"] and not allow_mismatch:
        raise ExportError(f"--backbone {name}: the run was trained on {known['backbone']} features "
                          f"(weights {known['weights']}); image signatures with another backbone would hash "
                          f"features the model never saw; use --backbone {known['backbone']} (or leave it out), "
                          f"or pass --allow_backbone_mismatch")
    if name is None and known is not None:
        return load_backbone(known["backbone"], weights or known["weights"], run.input_dim,
                             input_size or known["input_size"])
    if name is None and run.config.features:
        return None
    return load_backbone(name or run.config.backbone, weights or run.config.backbone_weights,
                         run.input_dim, input_size)


def _signature_functions(run: TrainedRun, backbone: Backbone | None) -> dict:
    """Name -> (function, input signature) of every exported signature except serving_default."""
    model, dim = run.model, run.input_dim

    def encode_features(features):
        features = tf.ensure_shape(features, [None, dim], name="features")
        return hash_outputs(model, features)

    functions = {"encode_features": (encode_features, [tf.TensorSpec([None, dim], tf.float32, name="features")])}
    if backbone is None:
        return functions
    size = backbone.input_size

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def image_codes(resized):  # traced once, shared by both image signatures
        return hash_outputs(model, backbone.model(backbone.preprocess(resized), training=False))

    def encode_images(images):
        images = tf.ensure_shape(images, [None, None, None, 3], name="images")
        return image_codes(tf.image.resize(tf.cast(images, tf.float32), (size, size), method="bilinear"))

    def decode_one(data):
        return tf.image.resize(tf.cast(decode_rgb(data), tf.float32), (size, size), method="bilinear")

    def encode_jpeg(encoded_jpeg):
        encoded = tf.ensure_shape(encoded_jpeg, [None], name="encoded_jpeg")
        return image_codes(tf.map_fn(decode_one, encoded, fn_output_signature=tf.TensorSpec([size, size, 3])))

    functions["encode_images"] = (encode_images, [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    functions["encode_jpeg"] = (encode_jpeg, [tf.TensorSpec([None], tf.string, name="encoded_jpeg")])
    return functions


def export_saved_model(run: TrainedRun, base: str | os.PathLike, name: str, backbone: Backbone | None = None,
                       serving_default: str = "features", serving_root: str = "/models") -> Path:
    """Writes `base/name/<next version>/` (TF Serving layout) and returns that path.

    serving_default: "features" or "images" (needs a backbone). The version
    directory appears atomically (see `new_version`), so a TF Serving instance
    watching `base/name` never loads a half-written model. It holds one warmup
    request per signature (zeros, batch 1); `base/models.config` is then rewritten
    to list every model of `base` at `serving_root/<name>` (where a server sees `base`).
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ExportError(f"--name '{name}': must be a plain directory name such as tbh_encoder")
    if serving_default not in ("features", "images"):
        raise ExportError(f"serving_default '{serving_default}': use features or images")
    if serving_default == "images" and backbone is None:
        raise ExportError("serving_default images needs a backbone: the run was trained on precomputed "
                          "features, pass --backbone NAME --backbone_weights PATH|none")
    functions = _signature_functions(run, backbone)
    archive = keras.export.ExportArchive()
    archive.track(run.model)
    if backbone is not None:
        archive.track(backbone.model)
    default = "encode_features" if serving_default == "features" else "encode_images"
    for key in sorted(functions, key=lambda k: k != default):  # the first endpoint is also serving_default
        archive.add_endpoint(key, functions[key][0], input_signature=functions[key][1])

    with new_version(Path(base) / name) as version:
        staging = version.staging
        archive.write_out(str(staging), verbose=False)
        metadata = {"model_dir": str(run.path.resolve()), "checkpoint": run.checkpoint, "bits": run.config.bits,
                    "input_dim": run.input_dim, "config_name": run.config.name,
                    "serving_default": serving_default, "signatures": ["serving_default", *functions],
                    "backbone": None if backbone is None else {
                        "name": backbone.name, "weights": backbone.weights, "input_size": backbone.input_size}}
        (staging / METADATA_FILE).parent.mkdir(parents=True, exist_ok=True)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        examples = warmup_inputs(run.input_dim, backbone and backbone.input_size)
        write_warmup_requests(staging, name, {"serving_default": examples[default], **examples})
    try:
        write_models_config(base, serving_root)
    except OSError as err:
        raise ExportError(f"{version.final} was written but {base}/models.config could not be "
                          f"({err.strerror or err}); free disk space and export again") from None
    return version.final


def write_image_encoder(run: TrainedRun, backbone: Backbone, path: str | os.PathLike) -> Path:
    """A SavedModel at `path` holding only encode_images (the run's hash head behind `backbone`): the
    source of a TFLite conversion with another backbone than the export's (a fine-tuned copy)."""
    images, signature = _signature_functions(run, backbone)["encode_images"]
    archive = keras.export.ExportArchive()
    archive.track(run.model)
    archive.track(backbone.model)
    archive.add_endpoint("encode_images", images, input_signature=signature)
    archive.write_out(str(path), verbose=False)
    return Path(path)


# ------------------------------------------------------------------ version directories
def next_version(model_root: str | os.PathLike) -> int:
    """1 + the largest integer version directory under `model_root` (1 when there is none)."""
    root = Path(model_root)
    versions = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
    return max(versions, default=0) + 1


@dataclasses.dataclass
class VersionDirectory:
    """Where `new_version` stages a version, and its final path (set once the block has ended)."""

    staging: Path
    final: Path


@contextlib.contextmanager
def new_version(root: str | os.PathLike):
    """Yields a VersionDirectory for a new version `final` = `root/<next version>/`.

    Write into the hidden `staging` (not yet created); when the block ends without
    an error it is renamed to `final`, so readers never see a half-written version
    and no earlier version is replaced (a version another export took meanwhile
    makes it the next free one). On an error it is removed; OSErrors become ExportError.
    """
    root = check_writable(root, "export directory", ExportError, directory=True)
    version = next_version(root)
    staging = root / f".{version}.partial-{os.getpid()}"
    target = VersionDirectory(staging, root / str(version))
    try:
        root.mkdir(parents=True, exist_ok=True)
        yield target
        for _ in range(_RENAME_ATTEMPTS):  # another export may take the version first: use the next one
            try:
                os.rename(staging, target.final)
                break
            except OSError as err:
                if not target.final.exists():
                    raise ExportError(f"{target.final}: cannot create the version directory "
                                      f"({err.strerror or err})") from None
                target.final = root / str(next_version(root))
        else:
            raise ExportError(f"{root}: other exports keep taking the next version; retry when they are done")
    except (OSError, tf.errors.ResourceExhaustedError) as err:  # TF's writers: ResourceExhausted on a full disk
        raise ExportError(f"{root}: cannot write the export ({first_line(err, limit=200)}); nothing was kept, "
                          f"free disk space or choose a writable directory") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def resolve_saved_model(path: str | os.PathLike) -> Path:
    """A SavedModel directory: `path` itself, or its highest integer version subdirectory."""
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        return path
    version = next_version(path) - 1
    if version and (path / str(version) / "saved_model.pb").is_file():
        return path / str(version)
    raise ExportError(f"{path}: no SavedModel (saved_model.pb) here or in an integer version "
                      f"subdirectory; pass a directory written by export.py")
