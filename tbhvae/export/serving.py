"""TF Serving files and requests: warmup records, a model config file, gRPC PredictRequests.

The warmup records are PredictionLog protos (tensorflow_serving/apis/prediction_log.proto)
encoded here from their wire format, so that export writes them without the optional
`tensorflow-serving-api` package; `grpc_predict_request` builds the real proto and needs it.
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf import text_encoding

from tbhvae.checks import atomic_write

WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"  # inside a version directory; read at model load
MODELS_CONFIG_FILE = "models.config"  # in the export base directory, for --model_config_file
INPUT_DTYPES = {"features": tf.float32, "images": tf.uint8, "encoded_jpeg": tf.string}  # signature inputs


# ------------------------------------------------------------------ warmup requests
def warmup_inputs(input_dim: int, image_size: int | None = None) -> dict:
    """Signature name -> {input name: array} of one zero example per signature.

    encode_features: features float32 [1, D]; with `image_size` S also encode_images:
    images uint8 [1, S, S, 3] and encode_jpeg: encoded_jpeg string [1] (a black S x S JPEG).
    """
    inputs = {"encode_features": {"features": np.zeros([1, input_dim], np.float32)}}
    if image_size:
        image = np.zeros([image_size, image_size, 3], np.uint8)
        inputs["encode_images"] = {"images": image[None]}
        inputs["encode_jpeg"] = {"encoded_jpeg": np.array([tf.io.encode_jpeg(image).numpy()], object)}
    return inputs


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2): a string, bytes or a message."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def prediction_log(model_name: str, signature: str, inputs: Mapping[str, np.ndarray]) -> bytes:
    """A serialized PredictionLog holding a PredictRequest for `signature` with `inputs`."""
    spec = _field(1, model_name.encode()) + _field(3, signature.encode())  # ModelSpec.name, .signature_name
    tensors = b"".join(  # PredictRequest.inputs, map entries {1: key, 2: TensorProto}
        _field(2, _field(1, key.encode()) + _field(2, tf.make_tensor_proto(
            value, dtype=INPUT_DTYPES[key]).SerializeToString())) for key, value in sorted(inputs.items()))
    return _field(6, _field(1, _field(1, spec) + tensors))  # PredictionLog.predict_log.request


def write_warmup_requests(version_dir: str | os.PathLike, model_name: str, requests: Mapping[str, Mapping]) -> Path:
    """Writes `version_dir/WARMUP_FILE`, a TFRecord of one PredictionLog per signature; returns its path.

    requests: signature name -> {input name: array}, in the order TF Serving replays them.
    """
    path = Path(version_dir) / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, inputs in requests.items():
            writer.write(prediction_log(model_name, signature, inputs))
    return path


# ------------------------------------------------------------------ model config file
def models_config(models: Mapping[str, str]) -> str:
    """A ModelServerConfig text proto serving model name -> base path (as the server sees it)."""
    entries = "".join(f'  config {{\n    name: "{_escaped(name)}"\n    base_path: "{_escaped(path)}"\n'
                      f'    model_platform: "tensorflow"\n  }}\n' for name, path in models.items())
    return ("# TF Serving model config, written by tbhvae export for every model in this directory:\n"
            "# tensorflow_model_server --model_config_file=models.config (regenerated at each export)\n"
            f"model_config_list {{\n{entries}}}\n")


def _escaped(text: str) -> str:
    return text_encoding.CEscape(text, as_utf8=True)


def write_models_config(base: str | os.PathLike, serving_root: str = "/models") -> Path:
    """Writes `base/MODELS_CONFIG_FILE` listing each model directory of `base` (one with an
    integer version holding saved_model.pb) at `serving_root/<name>`; returns its path.

    serving_root is where the server sees `base`: /models when it is mounted there in Docker.
    """
    base = Path(base)
    names = sorted(p.name for p in base.iterdir() if p.is_dir() and any(
        v.name.isdigit() and (v / "saved_model.pb").is_file() for v in p.iterdir()))
    return atomic_write(base / MODELS_CONFIG_FILE, models_config({n: posixpath.join(serving_root, n) for n in names}))


# ------------------------------------------------------------------ gRPC client
def grpc_predict_request(values, model_name: str, signature: str = "serving_default",
                         input_name: str = "features"):
    """A tensorflow_serving PredictRequest for PredictionService.Predict (needs tensorflow-serving-api).

    values: features float32 [B, D], images uint8 [B, H, W, 3] or encoded_jpeg bytes [B],
    as `input_name` says; converted to that input's dtype.
    """
    try:
        from tensorflow_serving.apis import predict_pb2
    except ImportError:
        raise ImportError("grpc_predict_request needs tensorflow-serving-api: "
                          "pip install 'tbhvae[serving]'") from None
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(values, dtype=INPUT_DTYPES[input_name]))
    return request
