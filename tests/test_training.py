import json

import numpy as np
import pytest
import tensorflow as tf

from tbhvae import training
from tbhvae.config import Config, ConfigError
from tbhvae.data import FeatureSet
from tbhvae.models import encode_features

SMALL = dict(bits=8, hidden_dim=32, continuous_dim=16, batch_size=64, log_every=5, checkpoint_every=10,
             eval_every=10, eval_queries=50, steps_per_execution=5, reconstruction="mean")


def synthetic_features(n=512, q=64, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, size=(4, dim))
    train_labels, test_labels = rng.integers(0, 4, n), rng.integers(0, 4, q)
    train = np.maximum(centres[train_labels] + rng.normal(size=(n, dim)), 0).astype(np.float32)
    test = np.maximum(centres[test_labels] + rng.normal(size=(q, dim)), 0).astype(np.float32)
    return FeatureSet(train, train_labels, test, test_labels)


def two_replicas():
    from conftest import two_cpu_replicas
    return two_cpu_replicas()


def reconstruction_mse(model, features):
    out = model.forward(tf.constant(features), tf.constant([0, 0]), training=False)
    return float(tf.reduce_mean(tf.square(out.reconstruction - out.target)))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("bottlenecks", [("adversarial", "adversarial"), ("betatcvae", "geco_vae")])
def test_two_replicas_stay_identical_and_learn(tmp_path, bottlenecks, jit):
    features = synthetic_features()
    config = Config(name="t", steps=30, jit_compile=jit, binary_bottleneck=bottlenecks[0],
                    continuous_bottleneck=bottlenecks[1], geco_calibration_steps=5, geco_warmup=10, **SMALL)
    strategy = two_replicas()
    captured = {}
    original = training.final_evaluation

    def capture(model, *args, **kwargs):
        captured["model"] = model
        return original(model, *args, **kwargs)

    training.final_evaluation = capture
    try:
        metrics = training.train(config, tmp_path, strategy=strategy, feature_set=features)
    finally:
        training.final_evaluation = original
    model = captured["model"]
    assert metrics["steps"] == 30 and metrics["replicas"] == 2
    for variable in model.variables + model.actor_optimizer.variables:
        values = [np.asarray(v) for v in strategy.experimental_local_results(variable.value)]
        assert len(values) == 2, variable.path
        np.testing.assert_array_equal(values[0], values[1], err_msg=variable.path)
    history = metrics["final_train_terms"]
    assert np.isfinite(list(history.values())).all()
    assert metrics["map@1000"] > 0.3  # 4 clusters: random codes give ~0.25
    if bottlenecks[1] == "geco_vae":
        initial = features.dim / 2.0  # lambda_init = D / 2
        assert metrics["geco_lambda"] != pytest.approx(initial, rel=1e-6)  # multiplier moved after warm-up
        assert "total_correlation" in metrics


def test_loss_decreases_on_real_features(tmp_path, cifar_features):
    config = Config(name="t", steps=60, **{**SMALL, "batch_size": 200, "bits": 16, "hidden_dim": 256,
                                           "reconstruction": "sum", "learning_rate": 1e-3})
    untrained = training.TwinBottleneckHashing(config, cifar_features.dim, len(cifar_features.train_features))
    untrained.build_all()
    before = reconstruction_mse(untrained, cifar_features.test_features)
    captured = {}
    original = training.final_evaluation
    training.final_evaluation = lambda model, *a, **k: captured.setdefault("m", model) and original(model, *a, **k)
    try:
        training.train(config, tmp_path, strategy=two_replicas(), feature_set=cifar_features)
    finally:
        training.final_evaluation = original
    after = reconstruction_mse(captured["m"], cifar_features.test_features)
    assert after < 0.8 * before


def test_resume_continues_at_the_right_step_with_the_same_state(tmp_path):
    features = synthetic_features(seed=1)
    base = Config(name="t", steps=20, jit_compile=False, **SMALL)
    straight = training.train(base, tmp_path / "straight", strategy=two_replicas(), feature_set=features)
    first = training.train(base.replace(steps=10), tmp_path / "resumed", strategy=two_replicas(),
                           feature_set=features)
    assert first["steps"] == 10
    # The checkpoint at step 10 holds the optimiser state: restoring it gives iterations == 10.
    model = training.TwinBottleneckHashing(base, features.dim, len(features.train_features))
    import keras
    actor = keras.optimizers.Adam(base.learning_rate)
    critic = keras.optimizers.Adam(base.critic_learning_rate)
    model.compile(actor_optimizer=actor, critic_optimizer=critic, optimizer=actor)
    model.build_all()
    checkpoint = tf.train.Checkpoint(model=model, actor_optimizer=actor, critic_optimizer=critic)
    checkpoint.restore(tf.train.latest_checkpoint(tmp_path / "resumed" / "checkpoints")).expect_partial(
    ).assert_existing_objects_matched()
    assert int(actor.iterations.numpy()) == 10
    assert any(np.abs(np.asarray(v)).sum() > 0 for v in actor.variables[2:])  # Adam moments restored
    resumed = training.train(base, tmp_path / "resumed", strategy=two_replicas(), feature_set=features)
    assert resumed["steps"] == 20
    assert resumed["map@1000"] == pytest.approx(straight["map@1000"], abs=1e-6)
    saved = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert saved["steps"] == 20


def test_codes_are_deterministic_at_test_time(tmp_path):
    features = synthetic_features()
    config = Config(name="t", steps=5, **{**SMALL, "log_every": 5, "checkpoint_every": 5, "eval_every": 0})
    model = training.TwinBottleneckHashing(config, features.dim, len(features.train_features))
    model.build_all()
    first = encode_features(model, features.test_features)
    second = encode_features(model, features.test_features)
    np.testing.assert_array_equal(first, second)
    logits = model.encode(features.test_features)["logits"].numpy()
    np.testing.assert_array_equal(first, (logits > 0).astype(np.uint8))


def test_incompatible_run_directory_is_refused(tmp_path):
    features = synthetic_features()
    config = Config(name="t", steps=5, **{**SMALL, "log_every": 5, "checkpoint_every": 5, "eval_every": 0})
    training.train(config, tmp_path, strategy=tf.distribute.get_strategy(), feature_set=features)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match="bits: 8 -> 16"):
        training.train(config.replace(bits=16), tmp_path, strategy=tf.distribute.get_strategy(),
                       feature_set=features)
    assert (tmp_path / "config.json").read_text() == before
    with pytest.raises(ConfigError, match="not divisible"):
        training.train(config.replace(batch_size=63), tmp_path / "other", strategy=two_replicas(),
                       feature_set=features)
