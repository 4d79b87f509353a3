"""Which extractor made a run's features travels from the feature file to the run to the export."""
import json

import numpy as np
import pytest
import tensorflow as tf

from tbhvae import export, train
from tbhvae.config import Config
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
