import numpy as np
import pytest
import tensorflow as tf

from tbhvae.bottlenecks import GecoGaussian
from tbhvae.config import Config
from tbhvae.hashing_model import create_model
from tbhvae.models import TwinBottleneckHashing


def make_geco(input_dim=200, **overrides):
    settings = dict(continuous_bottleneck="geco_vae", binary_bottleneck="betatcvae", geco_kappa=0.1,
                    geco_warmup=0, geco_calibration_steps=0, geco_alpha=0.5, geco_rate=0.01)
    config = Config(**{**settings, **overrides})
    return GecoGaussian(config.validate(), input_dim)


def test_geco_starts_at_the_gaussian_likelihood_weight():
    for dim in (64, 1280, 4096):
        geco = make_geco(input_dim=dim)
        assert float(geco.multiplier.numpy()) == pytest.approx(dim / 2, rel=1e-5)
    assert float(make_geco(input_dim=100, geco_log_lambda_offset=1.0).multiplier.numpy()) == pytest.approx(
        50 * np.e, rel=1e-5)


def test_geco_multiplier_rises_while_violated_and_falls_when_satisfied():
    geco = make_geco()
    kappa_sq = 0.01
    start = float(geco.log_lambda.numpy())
    trace = []
    for step in range(10):
        geco.update(step, tf.constant(2 * kappa_sq))  # C = 1: twice the tolerated squared error
        trace.append(float(geco.log_lambda.numpy()))
    assert np.all(np.diff(trace) > 0)
    # relative units: nu * C_ma per step; C_ma = 0.5 * 0 + 0.5 * C after the first step
    assert trace[0] - start == pytest.approx(0.005, rel=1e-4)
    high = trace[-1]
    for step in range(10, 30):
        geco.update(step, tf.constant(0.5 * kappa_sq))  # C = -0.5: better than the tolerance
        trace.append(float(geco.log_lambda.numpy()))
    assert trace[-1] < high
    assert np.all(np.diff(trace[12:]) < 0)  # after the moving average turned negative
    # the same relative error gives the same updates at any feature scale
    scaled = make_geco(geco_kappa=10.0)
    for step in range(10):
        scaled.update(step, tf.constant(200.0))
    assert float(scaled.log_lambda.numpy()) == pytest.approx(trace[9], rel=1e-6)


def test_geco_bounds_its_steps_and_its_range():
    geco = make_geco(geco_rate=1.0, geco_max_log_step=0.05, geco_log_lambda_range=2.0)
    start = float(geco.log_lambda.numpy())
    geco.update(0, tf.constant(10.0))  # C = 999
    assert float(geco.log_lambda.numpy()) - start == pytest.approx(0.05, rel=1e-4)
    for step in range(1, 100):
        geco.update(step, tf.constant(10.0))
    assert float(geco.log_lambda.numpy()) == pytest.approx(start + 2.0, rel=1e-5)
    for step in range(100, 300):
        geco.update(step, tf.constant(0.0))
    assert float(geco.log_lambda.numpy()) == pytest.approx(start - 2.0, rel=1e-5)


def test_an_unreachable_tolerance_leaves_the_multiplier_within_the_default_range():
    """A tolerance the decoder never meets (another dataset than the one kappa's factor suits) must not let
    lambda grow until the reconstruction drowns every other term: the default range stops it at ~33x the
    Gaussian likelihood weight D / 2 (it was ~1100x, and mAP fell as lambda climbed)."""
    dim = 320
    geco = make_geco(input_dim=dim, geco_rate=1.0, geco_max_log_step=0.05)
    for step in range(400):
        geco.update(step, tf.constant(1.0))  # MSE 1 against kappa^2 = 0.01: C = 99 at every step
    ratio = float(geco.multiplier.numpy()) / (dim / 2)
    assert ratio == pytest.approx(np.exp(Config().geco_log_lambda_range), rel=1e-4)
    assert ratio < 50


def test_geco_waits_for_warmup_and_calibrates_kappa():
    config = Config(continuous_bottleneck="geco_vae", geco_kappa=0.0, geco_calibration_steps=4,
                    geco_warmup=6, geco_kappa_factor=0.5, geco_rate=0.01).validate()
    geco = GecoGaussian(config, 300)
    initial = float(geco.log_lambda.numpy())
    mses = [0.4, 0.3, 0.2, 0.1, 0.1, 0.1]
    for step, mse in enumerate(mses):
        geco.update(step, tf.constant(mse))
        assert float(geco.log_lambda.numpy()) == pytest.approx(initial)  # warm-up
        seen = min(step + 1, 4)
        assert float(geco.kappa_squared.numpy()) == pytest.approx(0.25 * np.mean(mses[:seen]))
    geco.update(6, tf.constant(1.0))
    assert float(geco.log_lambda.numpy()) > initial


def test_no_gradient_flows_into_the_multiplier():
    config = Config(bits=8, hidden_dim=16, continuous_dim=8, binary_bottleneck="betatcvae",
                    continuous_bottleneck="geco_vae", geco_kappa=0.1, batch_size=16).validate()
    model = TwinBottleneckHashing(config, input_dim=12, dataset_size=100)
    model.build_all()
    features = tf.random.stateless_uniform([16, 12], seed=[1, 2])
    with tf.GradientTape() as tape:
        out = model.forward(features, tf.constant([3, 4]), training=True)
        losses = model.loss_terms(out)
        terms, loss = losses.logged, losses.actor + losses.actor_sum
    geco_vars = [v.value for v in model.geco.weights]
    grads = tape.gradient(loss, geco_vars + [v.value for v in model.trainable_variables])
    assert all(g is None for g in grads[:len(geco_vars)])
    assert all(g is not None for g in grads[len(geco_vars):])
    assert model.geco.trainable_weights == []
    # The constraint is relative to the tolerance kappa^2 = 0.01.
    assert float(terms["geco_constraint"]) == pytest.approx(float(terms["mse"]) / 0.01 - 1.0, rel=1e-5)


@pytest.mark.parametrize("binary", ["adversarial", "betatcvae"])
@pytest.mark.parametrize("continuous", ["adversarial", "geco_vae"])
@pytest.mark.parametrize("threshold", ["fixed", "uniform"])
def test_every_combination_builds_and_has_its_terms(binary, continuous, threshold):
    config = Config(bits=6, hidden_dim=16, continuous_dim=8, binary_bottleneck=binary, batch_size=12,
                    continuous_bottleneck=continuous, binary_threshold=threshold).validate()
    model = TwinBottleneckHashing(config, input_dim=10, dataset_size=50)
    model.build_all()
    out = model.forward(tf.random.stateless_uniform([12, 10], seed=[0, 1]), tf.constant([0, 1]), training=True)
    assert out.codes.shape == (12, 6) and out.z_graph.shape == (12, 8) and out.reconstruction.shape == (12, 10)
    assert set(np.unique(out.codes.numpy())) <= {0.0, 1.0}
    priors = {"binary": tf.zeros([12, 6]), "continuous": tf.zeros([12, 8])}
    terms = model.loss_terms(out, priors).logged
    assert ("adversarial_binary" in terms) == (binary == "adversarial")
    assert ("total_correlation" in terms) == (binary == "betatcvae")
    assert ("continuous_kl" in terms) == (continuous == "geco_vae")
    assert ("adversarial_continuous" in terms) == (continuous == "adversarial")
    assert len(model.critics) == (binary == "adversarial") + (continuous == "adversarial")


def _vae_config(**overrides):
    settings = dict(bits=8, hidden_dim=16, continuous_dim=8, binary_bottleneck="betatcvae", batch_size=16,
                    continuous_bottleneck="geco_vae", geco_kappa=0.1, binary_threshold="uniform")
    return Config(**{**settings, **overrides}).validate()


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_the_tc_floor_uses_the_support_of_the_estimated_aggregate_posterior(estimator, monkeypatch):
    # MSS estimates q(b) over the N training codes, MWS over the B codes of the batch (objectives.tc_floor).
    from tbhvae import objectives
    calls = []
    floor = objectives.tc_floor
    monkeypatch.setattr(objectives, "tc_floor", lambda bits, support: calls.append((bits, int(support)))
                        or floor(bits, support))
    model = TwinBottleneckHashing(_vae_config(tc_estimator=estimator), input_dim=12, dataset_size=100)
    model.build_all()
    out = model.forward(tf.random.stateless_uniform([16, 12], seed=[5, 6]), tf.constant([1, 2]), training=True)
    model.loss_terms(out)
    assert calls == [(8, 100 if estimator == "mss" else 16)]


def test_mss_refuses_a_dataset_smaller_than_the_batch():
    with pytest.raises(ValueError, match="dataset_size >= batch_size"):
        TwinBottleneckHashing(_vae_config(batch_size=64), input_dim=12, dataset_size=40)
    TwinBottleneckHashing(_vae_config(batch_size=64, tc_estimator="mws"), input_dim=12, dataset_size=40)


def test_actor_loss_composition_is_pinned():
    config = _vae_config(tc_alpha=0.3, tc_beta=2.0, tc_gamma=0.7, binary_kl_weight=1.5, similarity_weight=0.25,
                         decorrelation_weight=3.0)
    model = TwinBottleneckHashing(config, input_dim=12, dataset_size=100)
    model.build_all()
    model.geco.constraint_average.assign(0.37)
    out = model.forward(tf.random.stateless_uniform([16, 12], seed=[5, 6]), tf.constant([1, 2]), training=True)
    losses = model.loss_terms(out)
    actor, actor_sum, critic, terms = losses.actor, losses.actor_sum, losses.critic, losses.logged
    floor = max(0.0, 8 * np.log(2) - np.log(100))
    binary = 1.5 * (0.3 * terms["mutual_information"] + 2.0 * max(0.0, float(terms["total_correlation"]) - floor)
                    + 0.7 * terms["dimensionwise_kl"])
    expected = (binary + 0.25 * 15 * 8 / 2 * terms["similarity"] + 3.0 * terms["decorrelation"]
                + float(model.geco.multiplier) * 0.37 + terms["continuous_kl"])
    assert float(actor) == pytest.approx(float(expected), rel=1e-5)
    assert actor_sum == 0.0 and critic == 0.0
    # adversarial bottlenecks: the actor fools both critics, the reconstruction is a batch sum
    tbh = TwinBottleneckHashing(Config(bits=8, hidden_dim=16, continuous_dim=8, adversarial_weight=0.5,
                                       reconstruction_weight=2.0).validate(), input_dim=12, dataset_size=100)
    tbh.build_all()
    out = tbh.forward(tf.random.stateless_uniform([16, 12], seed=[5, 6]), tf.constant([1, 2]), training=True)
    losses = tbh.loss_terms(out, {"binary": tf.ones([16, 8]), "continuous": tf.ones([16, 8]) * 0.5})
    actor, actor_sum, critic, terms = losses.actor, losses.actor_sum, losses.critic, losses.logged
    adversarial = terms["adversarial_binary"] + terms["adversarial_continuous"]
    assert float(actor) == pytest.approx(-0.5 * float(adversarial), rel=1e-5)
    assert float(actor_sum) == pytest.approx(2.0 * float(terms["reconstruction"]), rel=1e-6)
    assert float(critic) == pytest.approx(float(adversarial), rel=1e-6)


def test_similarity_target_is_centred_and_sees_neighbourhoods():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (4, 12))
    labels = np.repeat(np.arange(4), 100)
    features = (centres[labels] + rng.normal(size=(400, 12))).astype(np.float32)
    config = _vae_config(similarity_weight=1.0, similarity_target="anchor", anchors=20, batch_size=64)
    model = TwinBottleneckHashing(config, input_dim=12, dataset_size=400)
    model.adapt(features)
    graph = model.similarity.anchor_graph.similarity(tf.constant(features)).numpy()
    assert graph.min() >= 0.0 and graph.max() <= 1.0 + 1e-5
    np.testing.assert_allclose(np.diag(graph), 1.0, rtol=1e-4)
    same = labels[:, None] == labels[None, :]
    assert graph[same].mean() > 0.2 > 0.02 > graph[~same].mean()
    target = model.similarity.target(tf.constant(features[::5])).numpy()
    off = ~np.eye(len(target), dtype=bool)
    assert abs(target[off].mean()) < 1e-5
    same = same[::5, ::5]
    assert target[same & off].mean() > target[~same].mean() + 0.3


def test_evaluation_forward_never_samples():
    model = TwinBottleneckHashing(_vae_config(), input_dim=12, dataset_size=100)
    model.build_all()
    features = tf.random.stateless_uniform([16, 12], seed=[1, 1])
    first = model.forward(features, tf.constant([1, 2]), training=False)
    second = model.forward(features, tf.constant([3, 4]), training=False)
    np.testing.assert_array_equal(first.codes.numpy(), second.codes.numpy())
    np.testing.assert_array_equal(first.codes.numpy(), model.encode(features)["bits"].numpy())
    sampled = [model.forward(features, tf.constant([s, 0]), training=True).codes.numpy() for s in range(2)]
    assert not np.array_equal(*sampled)


def test_training_flop_count_is_every_product_by_hand():
    """D 10, hidden 16, M 6, C 8, B 12; TBH with linear critics, then with the anchor similarity term."""
    config = Config(bits=6, hidden_dim=16, continuous_dim=8, batch_size=12, discriminator="linear").validate()
    model = TwinBottleneckHashing(config, input_dim=10, dataset_size=500)
    model.build_all()
    # encoder 10x16 + 16x6 + 16x8, graph 8x8, decoder 8x16 + 16x10, critics (6 + 8) x 1 on two batches
    dense = 10 * 16 + 16 * 6 + 16 * 8 + 8 * 8 + 8 * 16 + 16 * 10 + 2 * (6 + 8)
    assert model.training_flops_per_example(12) == 6.0 * (dense + 12 * (6 + 8))
    similar = TwinBottleneckHashing(config.replace(similarity_weight=1.0, similarity_target="anchor", anchors=20),
                                    input_dim=10, dataset_size=500)
    similar.build_all()
    expected = 6.0 * (dense + 12 * (6 + 8) + 2 * 12 * 6) + 2.0 * (12 * 10 + 10 * 20)
    assert similar.training_flops_per_example(12) == expected


@pytest.mark.parametrize("family", ["greedyhash", "distillhash"])
def test_training_flop_count_of_the_batch_cosine_families_by_hand(family):
    """D 10, M 6, B 12: the hash layer 10 x 6 trained, the code products 12 x 6 trained, the feature cosines
    12 x 10 forward only."""
    model = create_model(Config(model=family, bits=6, batch_size=12).validate(), input_dim=10, dataset_size=500)
    model.build_all()
    assert model.training_flops_per_example(12) == 6.0 * (10 * 6 + 12 * 6) + 2.0 * 12 * 10
