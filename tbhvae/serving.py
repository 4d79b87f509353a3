"""Deployable hash encoders: SavedModel (TF Serving layout), TFLite variants, parity and REST.

A SavedModel exported from a training run holds these signatures, all deterministic
(outputs for a batch of B inputs, M bits, D feature dimensions):
  encode_features  features      float32 [B, D]           the hash head alone
  encode_images    images        uint8 [B, H, W, 3]       resize + backbone + hash head (any H, W)
  encode_jpeg      encoded_jpeg  string [B]               JPEG/PNG files, decoded then as encode_images
  serving_default  encode_features, or encode_images when chosen
and each returns
  bits    uint8 [B, M]             0/1 code, 1[logit > 0]
  packed  uint8 [B, ceil(M / 8)]   the bits packed in the order of `tbhvae.codes` (np.packbits)
  probs   float32 [B, M]           sigmoid(logit)
The image signatures exist only when the run was trained on features of a known backbone.
TFLite variants (float32, float16, dynamic-range, int8) hold the feature encoder under the
signature key "serving_default" with the same input and output names.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tbhvae import config as config_lib
from tbhvae.config import Config, ConfigError
from tbhvae.models import TwinBottleneckHashing

OUTPUT_NAMES = ("bits", "packed", "probs")
TFLITE_VARIANTS = ("float32", "float16", "dynamic", "int8")
METADATA_FILE = "assets.extra/tbhvae.json"  # inside a version directory; ignored by TF Serving
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # most significant bit first, as np.packbits


class ExportError(ValueError):
    """A run, export directory or encoder that cannot be used; the message says what to do."""


class RestError(ValueError):
    """A REST request TF Serving would reject (HTTP 400); the message names the problem."""


# ------------------------------------------------------------------ trained run
@dataclasses.dataclass
class TrainedRun:
    """A restored training run: the model with its checkpoint weights."""

    path: Path
    config: Config
    input_dim: int
    checkpoint: str
    model: TwinBottleneckHashing


def load_run(model_dir: str | os.PathLike) -> TrainedRun:
    """Restores the latest checkpoint of a run directory written by train.py.

    Raises ExportError (one line, naming the directory) for a missing, empty or
    foreign directory, or a checkpoint that does not fit the saved config.
    """
    path = Path(model_dir)
    hint = "pass the --model_dir that train.py wrote (it holds config.json, data.json and checkpoints/)"
    if not path.is_dir():
        raise ExportError(f"{path}: no such directory; {hint}")
    if not (path / "config.json").is_file():
        raise ExportError(f"{path}: not a training run (no config.json); {hint}")
    try:
        config = config_lib.from_dict(json.loads((path / "config.json").read_text()), str(path / "config.json"))
    except json.JSONDecodeError as err:
        raise ExportError(f"{path / 'config.json'}: not valid JSON ({err}); {hint}") from None
    except ConfigError as err:
        raise ExportError(f"{err}; {hint}") from None
    try:
        meta = json.loads((path / "data.json").read_text())
        input_dim, dataset_size = int(meta["input_dim"]), int(meta["dataset_size"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ExportError(f"{path}: data.json is missing or lacks input_dim/dataset_size; {hint}") from None
    checkpoint = tf.train.latest_checkpoint(str(path / "checkpoints"))
    if checkpoint is None:
        raise ExportError(f"{path}: no checkpoint in {path / 'checkpoints'}; train first "
                          f"(python train.py --model_dir {path}) or pass another --model_dir")
    model = TwinBottleneckHashing(config, input_dim, dataset_size)
    model.build_all()
    try:
        tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{checkpoint}: does not match the model of {path / 'config.json'} ({first})") from None
    return TrainedRun(path, config, input_dim, checkpoint, model)


# ------------------------------------------------------------------ signatures
def pack_bits(bits: tf.Tensor) -> tf.Tensor:
    """0/1 uint8 [B, M] -> uint8 [B, ceil(M / 8)], MSB first, last byte zero-padded (np.packbits)."""
    count = bits.shape[-1]
    nbytes = -(-count // 8)
    values = tf.cast(bits, tf.int32)
    if nbytes * 8 != count:
        values = tf.pad(values, [[0, 0], [0, nbytes * 8 - count]])
    values = tf.reshape(values, [-1, nbytes, 8])
    return tf.cast(tf.reduce_sum(values * tf.constant(_BIT_WEIGHTS, tf.int32), axis=2), tf.uint8)


def hash_outputs(model: TwinBottleneckHashing, features: tf.Tensor, with_logits: bool = False) -> dict:
    """The signature outputs for float32 features [B, D] (see the module docstring), plus
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
                 input_size: int | None = None) -> Backbone | None:
    """The backbone for the image signatures, or None.

    Explicit `name`/`weights` win; otherwise the run's config backbone when the run
    extracted its own features (config.features empty); else None (features only).
    """
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
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return tf.image.resize(tf.cast(image, tf.float32), (size, size), method="bilinear")

    def encode_jpeg(encoded_jpeg):
        encoded = tf.ensure_shape(encoded_jpeg, [None], name="encoded_jpeg")
        return image_codes(tf.map_fn(decode_one, encoded, fn_output_signature=tf.TensorSpec([size, size, 3])))

    functions["encode_images"] = (encode_images, [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    functions["encode_jpeg"] = (encode_jpeg, [tf.TensorSpec([None], tf.string, name="encoded_jpeg")])
    return functions


def next_version(model_root: str | os.PathLike) -> int:
    """1 + the largest integer version directory under `model_root` (1 when there is none)."""
    root = Path(model_root)
    versions = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
    return max(versions, default=0) + 1


def export_saved_model(run: TrainedRun, base: str | os.PathLike, name: str, backbone: Backbone | None = None,
                       serving_default: str = "features") -> Path:
    """Writes `base/name/<next version>/` (TF Serving layout) and returns that path.

    serving_default: "features" or "images" (needs a backbone). The version
    directory appears atomically (written under a hidden name, then renamed), so
    a TF Serving instance watching `base/name` never loads a half-written model.
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

    with new_version(Path(base) / name) as (staging, final):
        archive.write_out(str(staging), verbose=False)
        metadata = {"model_dir": str(run.path.resolve()), "checkpoint": run.checkpoint, "bits": run.config.bits,
                    "input_dim": run.input_dim, "config_name": run.config.name,
                    "serving_default": serving_default, "signatures": ["serving_default", *functions],
                    "backbone": None if backbone is None else {
                        "name": backbone.name, "weights": backbone.weights, "input_size": backbone.input_size}}
        (staging / METADATA_FILE).parent.mkdir(parents=True, exist_ok=True)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return final


@contextlib.contextmanager
def new_version(root: str | os.PathLike):
    """Yields (staging, final) for a new version directory `final` = `root/<next version>/`.

    Write into the hidden `staging` (not yet created); when the block ends without
    an error it is renamed to `final`, so readers never see a half-written version
    and no earlier version is replaced. On an error it is removed.
    """
    root = Path(root)
    version = next_version(root)
    staging, final = root / f".{version}.partial-{os.getpid()}", root / str(version)
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield staging, final
        os.rename(staging, final)
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


# ------------------------------------------------------------------ TFLite
def convert_tflite(saved_model_dir: str | os.PathLike, variant: str,
                   representative_features: np.ndarray | None = None) -> bytes:
    """Converts the encode_features signature of a SavedModel to a TFLite flatbuffer.

    variant: "float32"; "float16" (weights stored as float16); "dynamic" (int8
    weights, float activations); "int8" (int8 weights and activations calibrated
    on `representative_features` float32 [N, D]; the float32 input and the
    outputs keep their types, bits/packed are computed from the int8 logits).
    Built-in ops only.
    """
    if variant not in TFLITE_VARIANTS:
        raise ExportError(f"TFLite variant '{variant}': use one of {', '.join(TFLITE_VARIANTS)}")
    loaded = tf.saved_model.load(str(saved_model_dir))
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [loaded.signatures["encode_features"]], loaded)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if variant == "int8":
        if representative_features is None or not len(representative_features):
            raise ExportError("the int8 TFLite variant needs representative training features for calibration")
        samples = np.asarray(representative_features, np.float32)
        converter.representative_dataset = lambda: ([samples[i:i + 1]] for i in range(len(samples)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the calibrator's tf.lite.Interpreter deprecation notice
        return converter.convert()


def representative_rows(features: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` training rows drawn without replacement (all rows when there are fewer)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(features), size=min(count, len(features)), replace=False))
    return features[rows]


def write_tflite_variants(saved_model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                          representative_features: np.ndarray,
                          variants: tuple[str, ...] = TFLITE_VARIANTS) -> dict[str, Path]:
    """Writes `out_dir/<variant>.tflite` for each variant; returns variant -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for variant in variants:
        path = out_dir / f"{variant}.tflite"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(convert_tflite(saved_model_dir, variant, representative_features))
        os.replace(tmp, path)
        paths[variant] = path
    return paths


# ------------------------------------------------------------------ encoders
def _check_features(features, dim: int) -> np.ndarray:
    """float [n, dim] -> float32 [n, dim]; ValueError naming the expected shape otherwise."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != dim or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"features: expected a float array [batch, {dim}], got {features.dtype} "
                         f"{list(features.shape)}")
    return features.astype(np.float32, copy=False)


class Encoder:
    """Features float [N, D] -> dict of numpy outputs (bits, packed, probs), batched.

    Subclasses run the Keras model, a SavedModel signature or a LiteRT interpreter.
    """

    description: str
    input_dim: int
    bits: int

    def encode(self, features, batch_size: int = 4096) -> dict[str, np.ndarray]:
        features = _check_features(features, self.input_dim)
        parts = [self._run(features[i:i + batch_size]) for i in range(0, len(features), batch_size)]
        if not parts:
            parts = [self._run(features)]
        return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUT_NAMES}

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError


class KerasEncoder(Encoder):
    """The restored training model (the reference every export is compared with)."""

    def __init__(self, run: TrainedRun):
        self.run = run
        self.description = f"keras {run.checkpoint}"
        self.input_dim, self.bits = run.input_dim, run.config.bits
        self._function = tf.function(lambda x: hash_outputs(run.model, x, with_logits=True),
                                     input_signature=[tf.TensorSpec([None, run.input_dim], tf.float32)])

    def _run(self, batch):
        return {k: v.numpy() for k, v in self._function(tf.constant(batch)).items()}

    def logits(self, features, batch_size: int = 4096) -> np.ndarray:
        """Binary-head logits float32 [N, M]."""
        features = _check_features(features, self.input_dim)
        return np.concatenate([self._run(features[i:i + batch_size])["logits"]
                               for i in range(0, max(len(features), 1), batch_size)])


class SavedModelEncoder(Encoder):
    """The encode_features signature of an exported SavedModel."""

    def __init__(self, path: str | os.PathLike, signature: str = "encode_features"):
        self.path = resolve_saved_model(path)
        self.loaded = tf.saved_model.load(str(self.path))
        if signature not in self.loaded.signatures:
            raise ExportError(f"{self.path}: has no signature '{signature}' "
                              f"(has {', '.join(self.loaded.signatures)})")
        self.signature = self.loaded.signatures[signature]
        spec = self.signature.structured_input_signature[1]["features"]
        self.input_dim = int(spec.shape[1])
        self.bits = int(self.signature.structured_outputs["bits"].shape[1])
        self.description = f"saved_model {self.path}"

    def _run(self, batch):
        return {k: v.numpy() for k, v in self.signature(features=tf.constant(batch)).items()}

    def encode_jpeg(self, encoded: list[bytes], batch_size: int = 256) -> dict[str, np.ndarray]:
        """Outputs for encoded JPEG/PNG files [N] via the encode_jpeg signature (image exports only)."""
        if "encode_jpeg" not in self.loaded.signatures:
            raise ExportError(f"{self.path}: has no image signatures (exported without a backbone); "
                              f"encode features instead, or export with --backbone")
        signature = self.loaded.signatures["encode_jpeg"]
        parts = [{k: v.numpy() for k, v in signature(encoded_jpeg=tf.constant(encoded[i:i + batch_size])).items()}
                 for i in range(0, len(encoded), batch_size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUT_NAMES}


class LiteEncoder(Encoder):
    """A TFLite file's serving_default signature run by LiteRT."""

    def __init__(self, model: str | os.PathLike | bytes, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        if isinstance(model, bytes):
            self.description, kwargs = "tflite (in memory)", {"model_content": model}
        else:
            if not Path(model).is_file():
                raise ExportError(f"{model}: no such TFLite file; write one with export.py --tflite_dir")
            self.description, kwargs = f"tflite {model}", {"model_path": str(model)}
        self.interpreter = Interpreter(num_threads=num_threads, **kwargs)
        signatures = self.interpreter.get_signature_list()
        if "serving_default" not in signatures:
            raise ExportError(f"{self.description}: no serving_default signature (has {', '.join(signatures)})")
        self.runner = self.interpreter.get_signature_runner("serving_default")
        details = self.runner.get_input_details()["features"]
        self.input_dim = int(details["shape_signature"][1])
        self.bits = int(self.runner.get_output_details()["bits"]["shape_signature"][1])

    def _run(self, batch):
        return {k: np.array(v) for k, v in self.runner(features=batch).items()}


def open_encoder(path: str | os.PathLike, num_threads: int | None = None) -> Encoder:
    """An encoder from a `.tflite` file, a SavedModel (or its versions directory) or a run directory."""
    path = Path(path)
    if path.suffix == ".tflite":
        return LiteEncoder(path, num_threads=num_threads)
    if (path / "config.json").is_file():
        return KerasEncoder(load_run(path))
    if not path.exists():
        raise ExportError(f"{path}: no such encoder; pass a run directory, an exported SavedModel "
                          f"directory or a .tflite file")
    return SavedModelEncoder(path)


# ------------------------------------------------------------------ parity
def latency_ms(encoder: Encoder, features: np.ndarray, batch_size: int = 1, repeats: int = 200) -> float:
    """Median milliseconds per call on batches of `batch_size` rows (after one warm-up call)."""
    batch = _check_features(features, encoder.input_dim)[:batch_size]
    encoder._run(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder._run(batch)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def compare_codes(reference: dict, logits: np.ndarray, outputs: dict) -> dict:
    """Agreement of `outputs` with the reference outputs (numpy dicts) of the same rows.

    bit_agreement: fraction of equal bits; code_agreement: fraction of rows whose
    whole code is equal; max_prob_error: max |probs difference|; flipped_bits;
    max_flipped_logit: the largest reference |logit| among flipped bits (how far
    from the decision boundary a disagreement happened); packed_matches_bits:
    `packed` equals np.packbits(bits) of the same outputs.
    """
    equal = outputs["bits"] == reference["bits"]
    flipped = ~equal
    return {"bit_agreement": float(equal.mean()), "code_agreement": float(equal.all(axis=1).mean()),
            "flipped_bits": int(flipped.sum()),
            "max_flipped_logit": float(np.abs(logits[flipped]).max()) if flipped.any() else 0.0,
            "max_prob_error": float(np.abs(outputs["probs"] - reference["probs"]).max()),
            "packed_matches_bits": bool(np.array_equal(outputs["packed"], np.packbits(outputs["bits"], axis=1)))}


def parity_report(reference: KerasEncoder, candidates: dict[str, Encoder], features: np.ndarray,
                  files: dict[str, Path] | None = None, latency_repeats: int = 200) -> dict:
    """Compares each candidate encoder with the Keras model on `features` float32 [N, D].

    Returns {"examples", "bits", "rows": {name: {...compare_codes, size_bytes,
    latency_ms (batch of 1, median), batch_ms_per_example (batches of 256)}}},
    with a "keras" row for the reference itself.
    """
    files = files or {}
    expected = reference.encode(features)
    logits = reference.logits(features)
    rows = {}
    for name, encoder in {"keras": reference, **candidates}.items():
        outputs = expected if encoder is reference else encoder.encode(features, batch_size=1024)
        row = compare_codes(expected, logits, outputs)
        row["size_bytes"] = int(files[name].stat().st_size) if name in files else None
        row["latency_ms"] = latency_ms(encoder, features, 1, latency_repeats)
        row["batch_ms_per_example"] = latency_ms(encoder, features, 256, max(latency_repeats // 20, 3)) / min(
            256, len(features))
        rows[name] = row
    return {"examples": int(len(features)), "bits": reference.bits, "reference": reference.description,
            "rows": rows}


def format_parity_table(report: dict) -> str:
    """A markdown table of a parity report."""
    lines = [f"parity against the Keras model on {report['examples']} examples, {report['bits']} bits",
             "| encoder | bit agreement | codes equal | flipped bits | max |logit| flipped | max |probs| err "
             "| size (KiB) | latency (ms, batch 1) | ms/example (batch 256) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in report["rows"].items():
        size = f"{row['size_bytes'] / 1024:.1f}" if row["size_bytes"] is not None else "-"
        lines.append(f"| {name} | {100 * row['bit_agreement']:.4f}% | {100 * row['code_agreement']:.2f}% "
                     f"| {row['flipped_bits']} | {row['max_flipped_logit']:.2g} | {row['max_prob_error']:.2e} "
                     f"| {size} | {row['latency_ms']:.3f} | {row['batch_ms_per_example']:.4f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ REST
def _decode_b64(value):
    """{"b64": "..."} objects (TF Serving's binary encoding) -> bytes, recursively."""
    if isinstance(value, dict):
        if set(value) != {"b64"}:
            raise RestError(f"a JSON object in a tensor value must be {{\"b64\": ...}}, got keys {sorted(value)}")
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode_b64(v) for v in value]
    return value


def _checked_numbers(name: str, array: np.ndarray, dtype: tf.DType) -> np.ndarray:
    """float64 values -> `dtype`, refusing non-finite values and what the dtype cannot hold exactly."""
    if not np.all(np.isfinite(array)):
        raise RestError(f"input '{name}': values must be finite numbers (got null, NaN or Infinity, "
                        f"or a number beyond float64)")
    if dtype.is_integer:
        if np.any(array != np.round(array)) or np.any(array < dtype.min) or np.any(array > dtype.max):
            raise RestError(f"input '{name}': values must be integers in [{dtype.min}, {dtype.max}] "
                            f"({dtype.name})")
    elif np.any(np.abs(array) > np.finfo(dtype.as_numpy_dtype).max):
        raise RestError(f"input '{name}': values beyond the {dtype.name} range")
    return array.astype(dtype.as_numpy_dtype)


def _to_tensor(name: str, value, spec: tf.TensorSpec) -> tf.Tensor:
    if spec.dtype == tf.string:
        value = _decode_b64(value)
    try:
        # read as float64 first, so that nulls, NaN, Infinity, overflow and fractional
        # pixels are seen before the cast to the signature's dtype could hide them
        array = np.asarray(value, dtype=object if spec.dtype == tf.string else np.float64)
    except (TypeError, ValueError) as err:
        raise RestError(f"input '{name}': cannot be read as {spec.dtype.name} ({err}); every instance "
                        f"needs the same shape {spec.shape[1:].as_list()}") from None
    if spec.dtype != tf.string:
        array = _checked_numbers(name, array, spec.dtype)
    if not spec.shape.is_compatible_with(array.shape):
        raise RestError(f"input '{name}': expected shape {spec.shape.as_list()} (None = any), got "
                        f"{list(array.shape)}")
    return tf.constant(array, dtype=spec.dtype)


def rest_predict(loaded, body: dict | str) -> dict:
    """Runs a TF Serving REST predict request body through a loaded SavedModel.

    body: {"instances": [...]} (row format: each instance is the value of the only
    input or a dict of named inputs) or {"inputs": value or {name: value}}
    (columnar); optional "signature_name" (default serving_default). Binary
    strings are {"b64": "..."}. Returns what TF Serving answers:
    {"predictions": [{output: value, ...} per instance]} for the row format,
    {"outputs": {output: value}} for the columnar one (bare values when the
    signature has a single output). Raises RestError where TF Serving answers
    HTTP 400.
    """
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except json.JSONDecodeError as err:
            raise RestError(f"request body is not valid JSON ({err})") from None
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise RestError("request body must be a JSON object with exactly one of 'instances' (row format) "
                        "or 'inputs' (columnar format)")
    extra = sorted(set(body) - {"instances", "inputs", "signature_name"})
    if extra:
        raise RestError(f"unknown request key(s) {', '.join(extra)}; a predict request has 'instances' or "
                        f"'inputs' and optionally 'signature_name'")
    name = body.get("signature_name", "serving_default")
    if name not in loaded.signatures:
        raise RestError(f"signature_name '{name}' not found; the model has {', '.join(loaded.signatures)}")
    signature = loaded.signatures[name]
    specs = signature.structured_input_signature[1]
    row_format = "instances" in body
    if row_format:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise RestError("'instances' must be a non-empty list")
        named = all(isinstance(i, dict) and "b64" not in i for i in instances)
        if named:
            columns = {key: [i.get(key) for i in instances] for key in specs}
            missing = sorted(key for key in specs if any(i.get(key) is None for i in instances))
            if missing:
                raise RestError(f"every instance needs the input(s) {', '.join(missing)}")
        elif len(specs) == 1:
            columns = {next(iter(specs)): instances}
        else:
            raise RestError(f"the signature has several inputs ({', '.join(specs)}); give each instance "
                            f"as an object of named inputs")
    else:
        inputs = body["inputs"]
        if isinstance(inputs, dict) and "b64" not in inputs:
            columns = inputs
        elif len(specs) == 1:
            columns = {next(iter(specs)): inputs}
        else:
            raise RestError(f"the signature has several inputs ({', '.join(specs)}); give 'inputs' as an "
                            f"object of named inputs")
    unknown = sorted(set(columns) - set(specs))
    if unknown:
        raise RestError(f"unknown input(s) {', '.join(unknown)}; the signature takes {', '.join(specs)}")
    tensors = {key: _to_tensor(key, columns[key], spec) for key, spec in specs.items()}
    try:
        outputs = {key: value.numpy() for key, value in signature(**tensors).items()}
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as err:
        message = getattr(err, "message", str(err)).strip().splitlines()
        raise RestError(next((line for line in message if "compatible" in line or "expected" in line),
                             message[0] if message else type(err).__name__)) from None
    names = sorted(outputs)
    if row_format:
        count = len(instances)
        if len(names) == 1:
            return {"predictions": [outputs[names[0]][i].tolist() for i in range(count)]}
        return {"predictions": [{key: outputs[key][i].tolist() for key in names} for i in range(count)]}
    if len(names) == 1:
        return {"outputs": outputs[names[0]].tolist()}
    return {"outputs": {key: outputs[key].tolist() for key in names}}
