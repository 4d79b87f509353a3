"""TF Serving files, checked with tensorflow-serving-api's own protos: warmup requests, models.config, gRPC."""
import json
import sys

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format

from tbhvae import export
from tbhvae.config import Config
from tbhvae.models import TwinBottleneckHashing

prediction_log_pb2 = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
model_server_config_pb2 = pytest.importorskip("tensorflow_serving.config.model_server_config_pb2")

DIM, BITS = 1280, 12  # mobilenet_v2's feature size, so that the image signatures fit the same model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """base directory, {model name: version directory}: "tbh" (features only) and "img" (image signatures,
    serving_default = encode_images) of one untrained model."""
    config = Config(name="tfs", bits=BITS, hidden_dim=32, continuous_dim=16, batch_size=64)
    model = TwinBottleneckHashing(config, DIM, 512)
    model.build_all()
    base = tmp_path_factory.mktemp("tf_serving")
    run = export.TrainedRun(base / "run", config, DIM, "untrained", model)
    backbone = export.load_backbone("mobilenet_v2", "none", DIM, input_size=32)
    return base, {"tbh": export.export_saved_model(run, base, "tbh"),
                  "img": export.export_saved_model(run, base, "img", backbone, serving_default="images")}


def read_warmup(path):
    """The PredictionLog records of a version directory's warmup file."""
    records = tf.data.TFRecordDataset(str(path / export.WARMUP_FILE))
    return [prediction_log_pb2.PredictionLog.FromString(record.numpy()) for record in records]


@pytest.mark.parametrize("name, default_input", [("tbh", "features"), ("img", "images")])
def test_warmup_requests_fit_and_run_every_signature(exports, name, default_input):
    path = exports[1][name]
    loaded = tf.saved_model.load(str(path))
    logs = read_warmup(path)
    signatures = [log.predict_log.request.model_spec.signature_name for log in logs]
    assert signatures == json.loads((path / export.METADATA_FILE).read_text())["signatures"]
    assert set(signatures) == set(loaded.signatures)
    for log in logs:
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        assert request.model_spec.name == name
        specs = loaded.signatures[request.model_spec.signature_name].structured_input_signature[1]
        assert set(request.inputs) == set(specs)
        inputs = {key: tf.make_ndarray(tensor) for key, tensor in request.inputs.items()}
        for key, tensor in request.inputs.items():
            assert tf.as_dtype(tensor.dtype) == specs[key].dtype
            assert len(inputs[key]) == 1 and specs[key].shape.is_compatible_with(inputs[key].shape)
            rebuilt = export.grpc_predict_request(inputs[key], name, request.model_spec.signature_name, key)
            assert request == rebuilt  # the hand-encoded record is the real proto
        outputs = loaded.signatures[request.model_spec.signature_name](
            **{key: tf.constant(value) for key, value in inputs.items()})
        assert {key: tuple(value.shape) for key, value in outputs.items()} == {
            "bits": (1, BITS), "packed": (1, 2), "probs": (1, BITS)}
    assert list(logs[0].predict_log.request.inputs) == [default_input]  # serving_default comes first
    features = tf.make_ndarray(logs[signatures.index("encode_features")].predict_log.request.inputs["features"])
    np.testing.assert_array_equal(features, np.zeros([1, DIM], np.float32))


def test_models_config_lists_every_exported_model(exports, tmp_path):
    base = exports[0]
    config = text_format.Parse((base / export.MODELS_CONFIG_FILE).read_text(),
                               model_server_config_pb2.ModelServerConfig())
    assert [(c.name, c.base_path, c.model_platform) for c in config.model_config_list.config] == [
        ("img", "/models/img", "tensorflow"), ("tbh", "/models/tbh", "tensorflow")]
    (tmp_path / "tbh" / "1").mkdir(parents=True)
    (tmp_path / "tbh" / "1" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "tflite" / "1").mkdir(parents=True)  # versions without a SavedModel are no TF Serving model
    (tmp_path / "tflite" / "1" / "float32.tflite").write_bytes(b"")
    written = export.write_models_config(tmp_path, "/srv/models/")
    config = text_format.Parse(written.read_text(), model_server_config_pb2.ModelServerConfig())
    assert [(c.name, c.base_path) for c in config.model_config_list.config] == [("tbh", "/srv/models/tbh")]
    odd = {'say "hi"': "C:\\models\\é\n"}
    config = text_format.Parse(export.models_config(odd), model_server_config_pb2.ModelServerConfig())
    assert {c.name: c.base_path for c in config.model_config_list.config} == odd


def test_grpc_predict_request_round_trips(monkeypatch):
    features = np.random.default_rng(0).normal(size=(3, DIM))  # float64: sent as the signature's float32
    request = export.grpc_predict_request(features, "tbh")
    assert (request.model_spec.name, request.model_spec.signature_name) == ("tbh", "serving_default")
    tensor = request.inputs["features"]
    assert tensor.dtype == tf.float32.as_datatype_enum and [d.size for d in tensor.tensor_shape.dim] == [3, DIM]
    np.testing.assert_array_equal(tf.make_ndarray(tensor), features.astype(np.float32))
    jpegs = [b"\xff\xd8first", b"\xff\xd8second"]
    request = export.grpc_predict_request(jpegs, "img", "encode_jpeg", "encoded_jpeg")
    assert request.inputs["encoded_jpeg"].dtype == tf.string.as_datatype_enum
    assert tf.make_ndarray(request.inputs["encoded_jpeg"]).tolist() == jpegs
    images = np.arange(2 * 4 * 5 * 3).reshape(2, 4, 5, 3) % 256
    request = export.grpc_predict_request(images, "img", "encode_images", "images")
    np.testing.assert_array_equal(tf.make_ndarray(request.inputs["images"]), images.astype(np.uint8))
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
    with pytest.raises(ImportError, match=r"pip install 'tbhvae\[serving\]'"):
        export.grpc_predict_request(features, "tbh")
