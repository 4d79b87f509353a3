"""Backbone feature extraction on real CIFAR-10 / COCO JPEGs, with random (offline) weights."""
import os
import subprocess
import sys
from pathlib import Path

import keras
import keras.src.utils.file_utils as keras_file_utils
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tbhvae.data import extraction
from tbhvae.data.extraction import build_backbone, cache_path, extract_features, features_for
from tbhvae.data.features import DataError, load_features

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
SMALL = dict(backbone="resnet50", input_size=64)  # avg-pooled 2048-d, fast at 64x64


def shared(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


def jpeg_subset(source: Path, picks: dict, out: Path) -> Path:
    """Writes a JPEG .npz holding images `picks[split]` (index arrays) of `source`."""
    arrays = {}
    with np.load(source) as data:
        for split, indices in picks.items():
            encoded, offsets = data[f"{split}_bytes"], data[f"{split}_offsets"]
            files = [encoded[offsets[i]:offsets[i + 1]] for i in indices]
            arrays[f"{split}_bytes"] = np.concatenate(files)
            arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(f) for f in files])])
            arrays[f"{split}_labels"] = data[f"{split}_labels"][indices]
        arrays["class_names"] = data["class_names"]
    np.savez(out, **arrays)
    return out


@pytest.fixture(scope="module")
def cifar_24(tmp_path_factory):
    """12 train + 12 test real CIFAR-10 images spread over the classes."""
    out = tmp_path_factory.mktemp("cifar") / "cifar24.npz"
    picks = {"train": np.arange(12) * 4001, "test": np.arange(12) * 801}
    return jpeg_subset(shared("cifar10_jpeg.npz"), picks, out)


def tiny_cnn(weights=None, include_top=False, pooling="avg", input_shape=(24, 24, 3)):
    """A keras.applications-like constructor for a 2-layer CNN with seeded (repeatable) weights."""
    inputs = keras.Input(input_shape)
    hidden = keras.layers.Conv2D(8, 3, strides=2, activation="relu",
                                 kernel_initializer=keras.initializers.GlorotUniform(seed=1))(inputs)
    hidden = keras.layers.Conv2D(16, 3, activation="relu",
                                 kernel_initializer=keras.initializers.GlorotUniform(seed=2))(hidden)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(hidden))
    if weights is not None:
        model.load_weights(weights)
    return model


@pytest.fixture
def tiny(monkeypatch):
    """Registers the tiny CNN as backbone "tiny" (16-d features): the pipeline tests stay fast."""
    spec = extraction.BackboneSpec(tiny_cnn, lambda x: x / 127.5 - 1.0, 24, 16)
    monkeypatch.setitem(extraction.BACKBONES, "tiny", spec)
    return dict(backbone="tiny", weights="none")


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """A weights file of the top-less ResNet50 (random init), so separate runs share weights."""
    keras.utils.set_random_seed(0)
    model, _, _ = build_backbone("resnet50", "none", 64)
    path = tmp_path_factory.mktemp("weights") / "resnet50_notop.weights.h5"
    model.save_weights(path)
    return str(path)


def test_cifar_features_match_direct_backbone_output(tmp_path, cifar_24, resnet_weights):
    out = extract_features(str(cifar_24), tmp_path / "f.npz", weights=resnet_weights, batch_size=5,
                           chunk_size=7, dtype="float32", **SMALL)
    features = load_features(out)
    with np.load(cifar_24) as data:
        train_labels, names = data["train_labels"], data["class_names"]
        first = data["test_bytes"][:data["test_offsets"][1]].tobytes()
    assert features.train_features.shape == (12, 2048) and features.test_features.shape == (12, 2048)
    np.testing.assert_array_equal(features.train_labels, train_labels)
    assert features.class_names == tuple(names) and not features.multi_label
    assert not (tmp_path / "f.npz.partial").exists()
    model, preprocess, _ = build_backbone("resnet50", resnet_weights, 64)
    direct = model(preprocess(tf.io.decode_jpeg(first, channels=3)[tf.newaxis])).numpy()[0]
    np.testing.assert_allclose(features.test_features[0], direct, rtol=1e-4, atol=1e-4)
    assert np.abs(features.test_features[1] - direct).max() > 1e-3  # rows are distinct images


def test_coco_variable_size_images_keep_multi_hot_labels(tmp_path, tiny):
    path = jpeg_subset(shared("coco_mini.npz"), {"train": np.arange(10), "test": np.arange(6)},
                       tmp_path / "coco16.npz")
    out = extract_features(str(path), tmp_path / "coco.npz", batch_size=4, **tiny)
    with np.load(out) as raw:
        assert raw["train_features"].dtype == np.float16
    features = load_features(out)
    with np.load(path) as data:
        np.testing.assert_array_equal(features.test_labels, data["test_labels"])
    assert features.multi_label and features.train_labels.shape == (10, 80)
    assert features.train_features.shape == (10, 16) and len(features.class_names) == 80


def test_crash_after_first_chunk_resumes_and_matches_uninterrupted(tmp_path, monkeypatch, cifar_24, tiny):
    settings = dict(batch_size=4, chunk_size=8, **tiny)
    reference = load_features(extract_features(str(cifar_24), tmp_path / "ref.npz", **settings))

    written = []
    real_write = extraction._write_chunk

    def crash_after_first(path, features, labels):
        if written:
            raise RuntimeError("simulated crash")
        written.append(path.name)
        real_write(path, features, labels)

    monkeypatch.setattr(extraction, "_write_chunk", crash_after_first)
    out = tmp_path / "resumed.npz"
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_features(str(cifar_24), out, **settings)
    assert written == ["train-00000.npz"] and not out.exists()
    assert (tmp_path / "resumed.npz.partial" / "train-00000.npz").is_file()

    rewritten = []

    def record(path, features, labels):
        rewritten.append(path.name)
        real_write(path, features, labels)

    monkeypatch.setattr(extraction, "_write_chunk", record)
    resumed = load_features(extract_features(str(cifar_24), out, **settings))
    assert rewritten == ["train-00001.npz", "test-00000.npz", "test-00001.npz"]
    np.testing.assert_allclose(resumed.train_features, reference.train_features, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(resumed.test_features, reference.test_features, rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(resumed.train_labels, reference.train_labels)


def test_partial_dir_of_other_settings_is_discarded(tmp_path, cifar_24, tiny):
    out = tmp_path / "f.npz"
    stale = tmp_path / "f.npz.partial"
    stale.mkdir()
    (stale / "settings.json").write_text('{"images": "something else"}')
    np.savez(stale / "train-00000.npz", features=np.zeros((8, 3)), labels=np.zeros(8, np.int64))
    features = load_features(extract_features(str(cifar_24), out, chunk_size=8, **tiny))
    assert features.dim == 16 and len(features.train_features) == 12


def test_limit_takes_first_images_of_each_split(tmp_path, cifar_24, tiny):
    out = extract_features(str(cifar_24), tmp_path / "f.npz", limit=5, **tiny)
    features = load_features(out)
    with np.load(cifar_24) as data:
        np.testing.assert_array_equal(features.test_labels, data["test_labels"][:5])
    assert len(features.train_features) == 5


def test_truncated_jpeg_gives_data_error(tmp_path, tiny):
    path = jpeg_subset(shared("coco_mini.npz"), {"train": np.arange(6), "test": np.arange(3)},
                       tmp_path / "bad.npz")
    with np.load(path) as data:
        arrays = dict(data)
    offsets = arrays["train_offsets"]
    files = [arrays["train_bytes"][a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    files[4] = files[4][:len(files[4]) // 2]
    arrays["train_bytes"] = np.concatenate(files)
    arrays["train_offsets"] = np.concatenate([[0], np.cumsum([len(f) for f in files])])
    np.savez(path, **arrays)
    with pytest.raises(DataError) as caught:
        extract_features(str(path), tmp_path / "f.npz", batch_size=2, **tiny)
    message = str(caught.value)
    assert str(path) in message and "cannot decode" in message and "images 4..5" in message
    assert "\n" not in message


def test_imagenet_weights_offline_error(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/w.h5: None -- [Errno -2] "
                        "Name or service not known")

    monkeypatch.setattr(keras_file_utils, "get_file", offline)
    with pytest.raises(DataError) as caught:
        build_backbone("resnet50", "imagenet", 64)
    message = str(caught.value)
    assert "could not download the ImageNet weights of resnet50" in message
    assert "--weights PATH" in message and "--features" in message and "\n" not in message


def test_bad_weights_paths(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        build_backbone("resnet50", str(tmp_path / "missing.weights.h5"))
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="cannot be loaded into resnet50"):
        build_backbone("resnet50", str(junk), 64)
    with pytest.raises(DataError, match="unknown backbone 'alexnet'"):
        build_backbone("alexnet", "none")


def test_vgg16_fc7_reads_fc2_and_uses_caffe_preprocessing(cifar_24):
    with pytest.raises(DataError, match="224x224"):
        build_backbone("vgg16_fc7", "none", 100)
    model, preprocess, dim = build_backbone("vgg16_fc7", "none")
    assert dim == 4096 and model.output_shape == (None, 4096)
    assert model.layers[-1].name == "fc2" and model.input_shape == (None, 224, 224, 3)
    red = np.zeros((1, 10, 20, 3), np.uint8)
    red[..., 0] = 255
    inputs = preprocess(red).numpy()
    assert inputs.shape == (1, 224, 224, 3) and inputs.dtype == np.float32
    # RGB -> BGR, minus the ImageNet channel means
    np.testing.assert_allclose(inputs[0, 100, 100], [-103.939, -116.779, 255 - 123.68], atol=1e-3)
    with np.load(cifar_24) as data:
        jpegs = [data["train_bytes"][data["train_offsets"][i]:data["train_offsets"][i + 1]].tobytes()
                 for i in range(2)]
    images = tf.stack([tf.io.decode_jpeg(j, channels=3) for j in jpegs])
    features = model(preprocess(images)).numpy()
    assert features.shape == (2, 4096) and features.min() >= 0  # fc2 is ReLU-activated


def test_features_for_caches_by_source_backbone_and_weights(tmp_path, monkeypatch, cifar_24, tiny):
    calls = []
    real_extract = extraction.extract_features

    def small_extract(images, out, backbone, weights, data_dir=None):
        calls.append(Path(out).name)
        return real_extract(images, out, backbone, weights, data_dir=data_dir, limit=4)

    monkeypatch.setattr(extraction, "extract_features", small_extract)
    first = features_for(str(cifar_24), "tiny", "none", tmp_path)
    again = features_for(str(cifar_24), "tiny", "none", tmp_path)
    assert first == again and len(calls) == 1 and first.parent == tmp_path
    assert load_features(first).dim == 16
    names = {cache_path("tfds:cifar10", "vgg16_fc7", "imagenet", tmp_path).name,
             cache_path("tfds:coco/2017", "vgg16_fc7", "imagenet", tmp_path).name,
             cache_path("tfds:cifar10", "resnet50", "imagenet", tmp_path).name,
             cache_path("tfds:cifar10", "vgg16_fc7", "none", tmp_path).name,
             cache_path(str(cifar_24), "vgg16_fc7", "imagenet", tmp_path).name}
    assert len(names) == 5
    assert cache_path("tfds:cifar10", "vgg16_fc7", "imagenet", tmp_path).name == \
        "tfds_cifar10-vgg16_fc7-imagenet.npz"


def test_features_for_tfds_cifar10_with_mock_data(tmp_path, tiny, online):
    with tfds.testing.mock_data(num_examples=9):
        path = features_for("tfds:cifar10", "tiny", "none", tmp_path)
    assert path == tmp_path / "tfds_cifar10-tiny-none.npz"
    features = load_features(path)
    assert features.train_features.shape == (9, 16) and features.test_features.shape == (9, 16)
    assert features.train_labels.dtype == np.int64 and features.train_labels.max() < 10
    assert len(features.class_names) == 10


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "tbhvae.cli.extract", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_extracts_with_flags(tmp_path, cifar_24):
    out = tmp_path / "cli.npz"
    done = _cli("--images", str(cifar_24), "--out", str(out), "--backbone", "resnet50",
                "--input_size", "32", "--weights", "none", "--limit", "6", "--batch_size", "4",
                "--dtype", "float32")
    assert done.returncode == 0, done.stderr[-2000:]
    with np.load(out) as raw:
        assert raw["train_features"].dtype == np.float32
    assert load_features(out).train_features.shape == (6, 2048)
    assert not (tmp_path / "cli.npz.partial").exists()
