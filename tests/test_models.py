import numpy as np
import pytest
import tensorflow as tf

from tbhvae.config import Config
from tbhvae.models import Geco, TwinBottleneckHashing


def make_geco(**overrides):
    config = Config(continuous_bottleneck="geco_vae", binary_bottleneck="betatcvae", geco_kappa=0.1,
                    geco_warmup=0, geco_calibration_steps=0, geco_alpha=0.5, geco_rate=1.0, **overrides)
    return Geco(config.validate())


def test_geco_multiplier_rises_while_violated_and_falls_when_satisfied():
    geco = make_geco()
    kappa_sq = 0.01
    trace = []
    for step in range(10):
        geco.update(step, tf.constant(kappa_sq + 0.05))  # reconstruction worse than the tolerance
        trace.append(float(geco.log_lambda.numpy()))
    assert np.all(np.diff(trace) > 0)
    high = trace[-1]
    for step in range(10, 30):
        geco.update(step, tf.constant(kappa_sq - 0.009))  # better than the tolerance
        trace.append(float(geco.log_lambda.numpy()))
    assert trace[-1] < high
    assert np.all(np.diff(trace[12:]) < 0)  # after the moving average turned negative


def test_geco_clips_log_multiplier():
    geco = make_geco(geco_log_lambda_max=2.0)
    for step in range(50):
        geco.update(step, tf.constant(10.0))
    assert float(geco.log_lambda.numpy()) == pytest.approx(2.0)


def test_geco_waits_for_warmup_and_calibrates_kappa():
    config = Config(continuous_bottleneck="geco_vae", geco_kappa=0.0, geco_calibration_steps=4,
                    geco_warmup=6, geco_kappa_factor=0.5, geco_rate=1.0).validate()
    geco = Geco(config)
    mses = [0.4, 0.3, 0.2, 0.1, 0.1, 0.1]
    for step, mse in enumerate(mses):
        geco.update(step, tf.constant(mse))
        assert float(geco.log_lambda.numpy()) == pytest.approx(config.geco_log_lambda_init)  # warm-up
    assert float(geco.kappa_squared.numpy()) == pytest.approx(0.25 * np.mean(mses[:4]))
    geco.update(6, tf.constant(1.0))
    assert float(geco.log_lambda.numpy()) > config.geco_log_lambda_init


def test_no_gradient_flows_into_the_multiplier():
    config = Config(bits=8, hidden_dim=16, continuous_dim=8, binary_bottleneck="betatcvae",
                    continuous_bottleneck="geco_vae", geco_kappa=0.1).validate()
    model = TwinBottleneckHashing(config, input_dim=12, dataset_size=100)
    model.build_all()
    features = tf.random.stateless_uniform([16, 12], seed=[1, 2])
    with tf.GradientTape() as tape:
        out = model.forward(features, tf.constant([3, 4]), training=True)
        actor_mean, actor_sum, _, terms = model.loss_terms(out, None)
        loss = actor_mean + actor_sum
    geco_vars = [v.value for v in model.geco.weights]
    grads = tape.gradient(loss, geco_vars + [v.value for v in model.trainable_variables])
    assert all(g is None for g in grads[:len(geco_vars)])
    assert all(g is not None for g in grads[len(geco_vars):])
    assert model.geco.trainable_weights == []
    # The constraint enters the loss with C's gradient and C's (or C_ma's) value.
    assert float(terms["geco_constraint"]) == pytest.approx(float(terms["mse"]) - 0.01, rel=1e-5)


@pytest.mark.parametrize("binary", ["adversarial", "betatcvae"])
@pytest.mark.parametrize("continuous", ["adversarial", "geco_vae"])
@pytest.mark.parametrize("sampling", ["straight_through", "relaxed"])
def test_every_combination_builds_and_has_its_terms(binary, continuous, sampling):
    config = Config(bits=6, hidden_dim=16, continuous_dim=8, binary_bottleneck=binary,
                    continuous_bottleneck=continuous, binary_sampling=sampling).validate()
    model = TwinBottleneckHashing(config, input_dim=10, dataset_size=50)
    model.build_all()
    out = model.forward(tf.random.stateless_uniform([12, 10], seed=[0, 1]), tf.constant([0, 1]), training=True)
    assert out.codes.shape == (12, 6) and out.z_graph.shape == (12, 8) and out.reconstruction.shape == (12, 10)
    if sampling == "straight_through":
        assert set(np.unique(out.codes.numpy())) <= {0.0, 1.0}
    else:
        assert 0.0 < float(tf.reduce_min(out.codes)) and float(tf.reduce_max(out.codes)) < 1.0
    critic_inputs = (tf.zeros([12, 6]), tf.zeros([12, 8]))
    _, _, critic, terms = model.loss_terms(out, critic_inputs)
    assert ("adversarial_binary" in terms) == (binary == "adversarial")
    assert ("total_correlation" in terms) == (binary == "betatcvae")
    assert ("continuous_kl" in terms) == (continuous == "geco_vae")
    assert ("adversarial_continuous" in terms) == (continuous == "adversarial")
    assert len(model.critics) == (binary == "adversarial") + (continuous == "adversarial")
