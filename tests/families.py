"""What every model family of the shared trainer must do (tbhvae.hashing_model.FAMILIES): train under
two CPU replicas, resume, restore as its own class and export codes equal to its own."""
import numpy as np
import tensorflow as tf

from tbhvae import train
from tbhvae.export.savedmodel import export_saved_model, load_run
from tbhvae.hashing_model import encode_features


def trains_resumes_and_exports(config, features, tmp_path, family, terms, min_map):
    """Trains `config` (20 steps) on 2 replicas, resumes it to 30 steps, checks the logged `terms`,
    mAP@1000 > `min_map`, the restored class and that the SavedModel's encode_features equals
    `encode_features` of the restored model. Returns (first metrics, the restored TrainedRun)."""
    from conftest import two_cpu_replicas

    config = config.replace(steps=20)
    metrics = train.train(config, tmp_path / "run", strategy=two_cpu_replicas(), feature_set=features)
    assert metrics["steps"] == 20 and metrics["replicas"] == 2
    assert set(metrics["final_train_terms"]) >= {"loss", "bit_mean", *terms}
    assert metrics["map@1000"] > min_map
    assert train.train(config.replace(steps=30), tmp_path / "run", feature_set=features)["steps"] == 30
    trained = load_run(tmp_path / "run")
    assert type(trained.model) is family
    expected = encode_features(trained.model, features.test_features)
    loaded = tf.saved_model.load(str(export_saved_model(trained, tmp_path / "exported", name=config.name)))
    got = loaded.signatures["encode_features"](features=tf.constant(features.test_features))["bits"].numpy()
    np.testing.assert_array_equal(got, expected)
    return metrics, trained
