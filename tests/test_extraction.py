"""Backbone feature extraction on CIFAR-10 / COCO JPEGs, with random (offline) weights.

The JPEG files are the real ones of ../shared/data where present and synthetic files of the
same layout otherwise (fixtures `cifar_jpeg`, `coco_jpeg` in conftest), so all of this runs in CI.
"""
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
from tbhvae.data.images import decode_rgb
from tbhvae.protocol import stratified_sample

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(backbone="resnet50", input_size=64)  # avg-pooled 2048-d, fast at 64x64


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


def jpeg_files(path: Path, split: str) -> list[bytes]:
    """The JPEG files of one split of a JPEG .npz, in order."""
    with np.load(path) as data:
        encoded, offsets = data[f"{split}_bytes"], data[f"{split}_offsets"]
        return [encoded[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:])]


@pytest.fixture(scope="module")
def cifar_24(tmp_path_factory, cifar_jpeg):
    """12 train + 12 test CIFAR-10 images spread over the classes (the files are sorted by class)."""
    out = tmp_path_factory.mktemp("cifar") / "cifar24.npz"
    with np.load(cifar_jpeg) as data:
        sizes = {split: len(data[f"{split}_labels"]) for split in ("train", "test")}
    picks = {split: np.linspace(0, size - 1, 12).round().astype(int) for split, size in sizes.items()}
    return jpeg_subset(cifar_jpeg, picks, out)


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
    assert features.train_features.shape == (12, 2048) and features.test_features.shape == (12, 2048)
    np.testing.assert_array_equal(features.train_labels, train_labels)
    assert len(set(train_labels.tolist())) >= 8  # the picks span the classes
    assert features.class_names == tuple(names) and not features.multi_label
    assert not (tmp_path / "f.npz.partial").exists()
    model, preprocess, _ = build_backbone("resnet50", resnet_weights, 64)
    for split, extracted in (("train", features.train_features), ("test", features.test_features)):
        images = tf.stack([decode_rgb(jpeg) for jpeg in jpeg_files(cifar_24, split)])
        direct = model(preprocess(images)).numpy()  # every row is its own image, in order
        np.testing.assert_allclose(extracted, direct, rtol=1e-4, atol=1e-4, err_msg=split)
    assert np.abs(features.test_features[1] - features.test_features[0]).max() > 1e-3  # distinct images


def test_coco_variable_size_images_keep_multi_hot_labels(tmp_path, coco_jpeg, tiny):
    path = jpeg_subset(coco_jpeg, {"train": np.arange(10), "test": np.arange(6)}, tmp_path / "coco16.npz")
    out = extract_features(str(path), tmp_path / "coco.npz", batch_size=4, **tiny)
    with np.load(out) as raw:
        assert raw["train_features"].dtype == np.float16
    features = load_features(out)
    with np.load(path) as data:
        np.testing.assert_array_equal(features.train_labels, data["train_labels"])
        np.testing.assert_array_equal(features.test_labels, data["test_labels"])
        assert (data["train_labels"].sum(axis=1) > 1).any()  # some images have several labels
    assert features.multi_label and features.train_labels.shape == (10, 80)
    assert features.train_labels.dtype == np.uint8
    assert features.train_features.shape == (10, 16) and len(features.class_names) == 80
    # each image is resized on its own (sizes differ), so batching must not mix them up
    model, preprocess, _ = build_backbone("tiny", "none")
    images = [decode_rgb(jpeg) for jpeg in jpeg_files(path, "train")]
    assert len({tuple(image.shape) for image in images}) > 1
    direct = np.concatenate([model(preprocess(image[tf.newaxis])).numpy() for image in images])
    np.testing.assert_allclose(features.train_features, direct.astype(np.float16), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("crash_at, resumed_chunks", [
    (1, ["train-00001.npz", "test-00000.npz", "test-00001.npz"]),  # within the train split
    (3, ["test-00001.npz"]),  # within the test split: the done train split is not redone
])
def test_crash_mid_extraction_resumes_and_matches_uninterrupted(tmp_path, monkeypatch, cifar_24, tiny,
                                                                  crash_at, resumed_chunks):
    settings = dict(batch_size=4, chunk_size=8, **tiny)
    reference = load_features(extract_features(str(cifar_24), tmp_path / "ref.npz", **settings))
    rows = np.concatenate([reference.train_features, reference.test_features]).astype(np.float32)
    close = np.all(np.abs(rows[:, None] - rows[None]) <= 1e-6 + 1e-3 * np.abs(rows[None]), axis=-1)
    assert close.sum() == len(rows)  # no two images alike within the tolerance: a wrong resume would show

    written = []
    real_write = extraction._write_chunk

    def crash_at_chunk(path, features, labels):
        if len(written) == crash_at:
            raise RuntimeError("simulated crash")
        written.append(path.name)
        real_write(path, features, labels)

    monkeypatch.setattr(extraction, "_write_chunk", crash_at_chunk)
    out = tmp_path / "resumed.npz"
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_features(str(cifar_24), out, **settings)
    chunks = ["train-00000.npz", "train-00001.npz", "test-00000.npz", "test-00001.npz"]
    assert written == chunks[:crash_at] and not out.exists()
    assert all((tmp_path / "resumed.npz.partial" / name).is_file() for name in written)

    rewritten = []

    def record(path, features, labels):
        rewritten.append(path.name)
        real_write(path, features, labels)

    monkeypatch.setattr(extraction, "_write_chunk", record)
    resumed = load_features(extract_features(str(cifar_24), out, **settings))
    assert rewritten == resumed_chunks
    assert not (tmp_path / "resumed.npz.partial").exists()
    np.testing.assert_allclose(resumed.train_features, reference.train_features, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(resumed.test_features, reference.test_features, rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(resumed.train_labels, reference.train_labels)
    np.testing.assert_array_equal(resumed.test_labels, reference.test_labels)


def test_partial_dir_of_other_settings_is_discarded(tmp_path, cifar_24, tiny):
    out = tmp_path / "f.npz"
    stale = tmp_path / "f.npz.partial"
    stale.mkdir()
    (stale / "settings.json").write_text('{"images": "something else"}')
    np.savez(stale / "train-00000.npz", features=np.zeros((8, 3)), labels=np.zeros(8, np.int64))
    features = load_features(extract_features(str(cifar_24), out, chunk_size=8, **tiny))
    assert features.dim == 16 and len(features.train_features) == 12


def test_limit_takes_a_stratified_sample_of_each_split(tmp_path, cifar_24, tiny):
    limited = load_features(extract_features(str(cifar_24), tmp_path / "f.npz", limit=5, **tiny))
    full = load_features(extract_features(str(cifar_24), tmp_path / "full.npz", **tiny))
    for split in ("train", "test"):
        labels = getattr(full, f"{split}_labels")
        rows = stratified_sample(labels, 5)
        np.testing.assert_array_equal(getattr(limited, f"{split}_labels"), labels[rows])
        np.testing.assert_allclose(getattr(limited, f"{split}_features"), getattr(full, f"{split}_features")[rows],
                                   rtol=1e-3, atol=1e-3)  # the sampled images themselves, not only their labels
        assert len(np.unique(labels[rows])) == 5  # the file is sorted by class: the first 5 hold 3 classes
        np.testing.assert_array_equal(getattr(limited, f"{split}_index"), rows)  # source row of each feature
    assert full.train_index is None and full.test_index is None  # every row, in order


def _truncated(jpeg: np.ndarray, rng) -> np.ndarray:
    return jpeg[:len(jpeg) // 2]


def _not_an_image(jpeg: np.ndarray, rng) -> np.ndarray:
    return rng.integers(0, 256, len(jpeg), dtype=np.uint8)


def _scrambled_body(jpeg: np.ndarray, rng) -> np.ndarray:
    """JPEG header kept (a valid SOI marker, sizes, tables), the entropy-coded data replaced."""
    return np.concatenate([jpeg[:len(jpeg) // 4], np.full(len(jpeg) - len(jpeg) // 4, 0xFF, np.uint8)])


@pytest.mark.parametrize("corrupt", [_truncated, _not_an_image, _scrambled_body])
def test_corrupt_jpeg_gives_one_line_data_error_naming_the_images(tmp_path, coco_jpeg, tiny, corrupt):
    path = jpeg_subset(coco_jpeg, {"train": np.arange(6), "test": np.arange(3)}, tmp_path / "bad.npz")
    with np.load(path) as data:
        arrays = dict(data)
    offsets = arrays["train_offsets"]
    files = [arrays["train_bytes"][a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    files[4] = corrupt(files[4], np.random.default_rng(0))
    arrays["train_bytes"] = np.concatenate(files)
    arrays["train_offsets"] = np.concatenate([[0], np.cumsum([len(f) for f in files])])
    np.savez(path, **arrays)
    with pytest.raises(DataError) as caught:
        extract_features(str(path), tmp_path / "f.npz", batch_size=2, **tiny)
    message = str(caught.value)
    assert str(path) in message and "cannot decode" in message and "images 4..5" in message
    assert "\n" not in message and not (tmp_path / "f.npz").exists()


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
