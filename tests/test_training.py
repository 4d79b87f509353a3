import json

import numpy as np
import pytest
import tensorflow as tf

from tbhvae import train
from tbhvae.config import Config, ConfigError
from tbhvae.data import FeatureSet
from tbhvae.hashing_model import encode_features
from tbhvae.models import TwinBottleneckHashing
from tbhvae.train import distribute, loop, monitor

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
    original = loop.final_evaluation

    def capture(model, *args, **kwargs):
        captured["model"] = model
        return original(model, *args, **kwargs)

    loop.final_evaluation = capture
    try:
        metrics = train.train(config, tmp_path, strategy=strategy, feature_set=features)
    finally:
        loop.final_evaluation = original
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


def test_several_steps_per_call_on_two_replicas_end_as_one_step_per_call(tmp_path):
    """With several replicas the trainer runs its own multi-step loop (`distribute._steps_in_one_call`,
    Keras's fails there); it must end where one step per call (Keras's loop) ends: the same weights,
    optimiser and GECO state, and the same logged terms. (Their values may differ: Keras's loop logs
    each replica's read of the shared trackers inside the step, this loop the trackers after it.)"""
    features = synthetic_features()
    runs = {}
    for spe in (1, 5):
        config = Config(name="t", steps=10, binary_bottleneck="betatcvae", continuous_bottleneck="geco_vae",
                        geco_calibration_steps=2, geco_warmup=4, **{**SMALL, "steps_per_execution": spe,
                                                                   "checkpoint_every": 10, "eval_every": 0})
        runs[spe] = train.train(config, tmp_path / f"spe{spe}", strategy=two_replicas(), feature_set=features)
    expected = checkpoint_tensors(tmp_path / "spe1" / "checkpoints" / "ckpt-10")
    got = checkpoint_tensors(tmp_path / "spe5" / "checkpoints" / "ckpt-10")
    assert got.keys() == expected.keys() and len(got) > 20
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert runs[5]["final_train_terms"].keys() == runs[1]["final_train_terms"].keys()
    assert np.isfinite(list(runs[5]["final_train_terms"].values())).all()


# One step of plain SGD (update = -lr * gradient, no state) exposes the scale of the gradient that
# Adam's normalised first step hides. A replica's loss is a function of its half of the global batch
# only: the batch graph, the critics' and the reconstruction's means and the TC terms are per-replica
# statistics. So a 2-replica step is NOT the 1-device step on the whole batch, but it must be the mean
# of the 1-device steps on the two halves (mean-type losses are divided by the replica count before
# the optimiser sums the replicas' gradients) or, for the batch-sum reconstruction, their sum.
REPLICA_STEP_CASES = {
    "tbh_mean": dict(reconstruction="mean"),
    "tbh_sum": dict(reconstruction="sum", adversarial_weight=0.0),  # actor = the batch-sum reconstruction
    "tbhvae": dict(binary_bottleneck="betatcvae", continuous_bottleneck="geco_vae", binary_threshold="uniform",
                   geco_kappa=0.1, geco_warmup=10, similarity_weight=0.1, decorrelation_weight=1.0),
}


def _sgd_step_updates(strategy, config, weights, halves, step_of_replica):
    """Runs one train_step under `strategy` from `weights` and returns (trainable updates, GECO state).

    With one replica `halves` holds one batch and the step runs at iteration step_of_replica[0] (the
    seed of a step depends on iteration * replicas + replica id: on one device iteration 1 draws what
    replica 1 draws at iteration 0 on two). Only the seed depends on the iteration here: SGD has no
    schedule and GECO's multiplier stays put during its warm-up.
    """
    import keras

    from tbhvae.models import TwinBottleneckHashing

    with strategy.scope():
        model = TwinBottleneckHashing(config, halves[0].shape[1], dataset_size=1000)
        actor, critic = keras.optimizers.SGD(0.05), keras.optimizers.SGD(0.05)
        model.compile(actor_optimizer=actor, critic_optimizer=critic, optimizer=actor)
        model.build_all()
    model.set_weights(weights)
    actor.iterations.assign(step_of_replica[0])
    before = [np.asarray(v) for v in model.trainable_variables]
    if strategy.num_replicas_in_sync == 1:
        tf.function(model.train_step)(tf.constant(halves[0]))
    else:
        batch = strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(halves[context.replica_id_in_sync_group]))
        tf.function(lambda x: strategy.run(model.train_step, args=(x,)))(batch)
    for variable in model.variables:  # every replica holds the same values after the step
        copies = [np.asarray(c) for c in strategy.experimental_local_results(variable.value)]
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy, copies[0], err_msg=variable.path)
    updates = [np.asarray(v) - b for v, b in zip(model.trainable_variables, before)]
    geco = {w.name: float(np.asarray(w)) for w in model.geco.weights} if model.geco is not None else {}
    return updates, model, geco


@pytest.mark.parametrize("case", sorted(REPLICA_STEP_CASES))
def test_a_two_replica_step_is_the_mean_of_the_per_replica_steps(case):
    from tbhvae.models import TwinBottleneckHashing

    config = Config(name="t", bits=8, hidden_dim=16, continuous_dim=8, batch_size=32, input_scaling="standardize",
                    **REPLICA_STEP_CASES[case]).validate()
    features = synthetic_features(n=32, dim=12, seed=3).train_features
    halves = [features[:16], features[16:]]
    reference = TwinBottleneckHashing(config, 12, dataset_size=1000)
    reference.adapt(features)
    reference.build_all()
    weights = reference.get_weights()
    one_device = tf.distribute.get_strategy()
    first, model, geco_first = _sgd_step_updates(one_device, config, weights, halves[:1], [0])
    second, _, geco_second = _sgd_step_updates(one_device, config, weights, halves[1:], [1])
    both, _, geco_both = _sgd_step_updates(two_replicas(), config, weights, halves, [0])

    critics = {id(v) for v in model.critic_variables}
    batch_sum_actor = config.continuous_bottleneck != "geco_vae" and config.reconstruction == "sum"
    moved = 0.0
    for variable, u1, u2, u in zip(model.trainable_variables, first, second, both):
        share = 1.0 if batch_sum_actor and id(variable) not in critics else 0.5
        expected = share * (u1 + u2)
        moved = max(moved, float(np.abs(expected).max()))
        np.testing.assert_allclose(u, expected, rtol=1e-4, atol=1e-6 + 1e-4 * float(np.abs(expected).max()),
                                   err_msg=variable.path)
    assert moved > 1e-3  # the step did move the weights
    if geco_both:
        # GECO sees the all-reduced mean MSE: its constraint average is the mean of the halves' ones
        # (the warm-up sets it to the constraint), and lambda does not move during the warm-up.
        for name in ("constraint_average", "log_lambda"):
            assert geco_both[name] == pytest.approx((geco_first[name] + geco_second[name]) / 2, rel=1e-5), name
        assert geco_first["constraint_average"] != pytest.approx(geco_second["constraint_average"], rel=1e-3)


def test_pipeline_at_a_start_step_continues_the_uninterrupted_one():
    features = np.repeat(np.arange(100, dtype=np.float32)[:, None], 3, axis=1)  # row i holds i
    steps_per_epoch = 100 // 32
    straight = [b.numpy() for b in loop.train_dataset(features, 32, seed=7).take(8)]
    resumed = [b.numpy() for b in loop.train_dataset(features, 32, seed=7, start_step=5).take(3)]
    for step, batch in enumerate(resumed, start=5):
        np.testing.assert_array_equal(batch, straight[step], err_msg=f"step {step}")
    # each epoch is a permutation: no row twice within an epoch, a new order in the next one
    first_epoch = np.concatenate(straight[:steps_per_epoch])
    assert len(np.unique(first_epoch, axis=0)) == len(first_epoch)
    assert not np.array_equal(straight[0], straight[steps_per_epoch])
    other_seed = next(iter(loop.train_dataset(features, 32, seed=8))).numpy()
    assert not np.array_equal(other_seed, straight[0])


def test_cosine_schedule_decays_the_actor_rate_to_zero_at_the_last_step():
    assert loop.actor_learning_rate(Config(learning_rate=3e-4)) == 3e-4
    schedule = loop.actor_learning_rate(Config(learning_rate=3e-4, steps=1000, learning_rate_schedule="cosine"))
    rates = [float(schedule(step)) for step in (0, 500, 1000)]
    assert rates == pytest.approx([3e-4, 1.5e-4, 0.0], abs=1e-9)


def test_loss_decreases_on_real_features(tmp_path, cifar_features):
    config = Config(name="t", steps=60, **{**SMALL, "batch_size": 200, "bits": 16, "hidden_dim": 256,
                                           "reconstruction": "sum", "learning_rate": 1e-3})
    untrained = TwinBottleneckHashing(config, cifar_features.dim, len(cifar_features.train_features))
    untrained.build_all()
    before = reconstruction_mse(untrained, cifar_features.test_features)
    captured = {}
    original = loop.final_evaluation
    loop.final_evaluation = lambda model, *a, **k: captured.setdefault("m", model) and original(model, *a, **k)
    try:
        train.train(config, tmp_path, strategy=two_replicas(), feature_set=cifar_features)
    finally:
        loop.final_evaluation = original
    after = reconstruction_mse(captured["m"], cifar_features.test_features)
    assert after < 0.8 * before


def test_resume_continues_at_the_right_step_with_the_same_state(tmp_path):
    features = synthetic_features(seed=1)
    base = Config(name="t", steps=20, jit_compile=False, **SMALL)
    straight = train.train(base, tmp_path / "straight", strategy=two_replicas(), feature_set=features)
    first = train.train(base.replace(steps=10), tmp_path / "resumed", strategy=two_replicas(),
                           feature_set=features)
    assert first["steps"] == 10
    # The checkpoint at step 10 holds the optimiser state: restoring it gives iterations == 10.
    model = TwinBottleneckHashing(base, features.dim, len(features.train_features))
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
    resumed = train.train(base, tmp_path / "resumed", strategy=two_replicas(), feature_set=features)
    assert resumed["steps"] == 20
    saved = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert saved["steps"] == 20
    # Tensor by tensor: the checkpoints at step 10 (written by the first session) and at step 20 equal
    # the uninterrupted run's, weights, optimiser slots and iteration counts alike. A resumed session that
    # fed batches 0, 1, ... again would end with other weights even where its mAP happens to agree.
    for step in (10, 20):
        expected = checkpoint_tensors(tmp_path / "straight" / "checkpoints" / f"ckpt-{step}")
        got = checkpoint_tensors(tmp_path / "resumed" / "checkpoints" / f"ckpt-{step}")
        assert got.keys() == expected.keys() and len(got) > 20
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"ckpt-{step}: {name}")
    assert resumed["map@1000"] == pytest.approx(straight["map@1000"], abs=1e-6)


def checkpoint_tensors(prefix) -> dict:
    """Every saved tensor of a checkpoint but the run's bookkeeping (timings) and the save counter."""
    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(str(prefix))
            if not name.startswith(("save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH", "run_totals"))}


def test_codes_are_deterministic_at_test_time(tmp_path):
    features = synthetic_features()
    config = Config(name="t", steps=5, **{**SMALL, "log_every": 5, "checkpoint_every": 5, "eval_every": 0})
    model = TwinBottleneckHashing(config, features.dim, len(features.train_features))
    model.build_all()
    first = encode_features(model, features.test_features)
    second = encode_features(model, features.test_features)
    np.testing.assert_array_equal(first, second)
    logits = model.encode(features.test_features)["logits"].numpy()
    np.testing.assert_array_equal(first, (logits > 0).astype(np.uint8))


def test_incompatible_run_directory_is_refused(tmp_path):
    features = synthetic_features()
    config = Config(name="t", steps=5, **{**SMALL, "log_every": 5, "checkpoint_every": 5, "eval_every": 0})
    train.train(config, tmp_path, strategy=tf.distribute.get_strategy(), feature_set=features)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match="bits: 8 -> 16"):
        train.train(config.replace(bits=16), tmp_path, strategy=tf.distribute.get_strategy(),
                       feature_set=features)
    assert (tmp_path / "config.json").read_text() == before
    with pytest.raises(ConfigError, match="not divisible"):
        train.train(config.replace(batch_size=63), tmp_path / "other", strategy=two_replicas(),
                       feature_set=features)


def test_bfloat16_under_two_replicas_is_finite_identical_and_restores_the_policy(tmp_path):
    import keras
    features = synthetic_features(n=256)
    config = Config(name="t", steps=12, mixed_precision="mixed_bfloat16", binary_bottleneck="betatcvae",
                    continuous_bottleneck="geco_vae", binary_threshold="uniform", similarity_weight=1.0,
                    similarity_target="anchor", anchors=16, geco_calibration_steps=4, geco_warmup=4,
                    **{**SMALL, "eval_every": 0, "checkpoint_every": 12})
    strategy = two_replicas()
    captured = {}
    original = loop.final_evaluation
    loop.final_evaluation = lambda model, *a, **k: captured.setdefault("m", model) and original(model, *a, **k)
    try:
        metrics = train.train(config, tmp_path, strategy=strategy, feature_set=features)
    finally:
        loop.final_evaluation = original
    assert keras.mixed_precision.global_policy().name == "float32"
    assert np.isfinite(list(metrics["final_train_terms"].values())).all()
    model = captured["m"]
    assert model.encoder.hidden.compute_dtype == "bfloat16" and model.encoder.hidden.kernel.dtype == "float32"
    assert model.decoder.output_layer.compute_dtype == "bfloat16"  # the largest layer, the reconstruction float32
    assert model.geco.log_lambda.dtype == "float32" and model.similarity.anchor_graph.centres.dtype == "float32"
    for variable in model.variables:
        values = [np.asarray(v) for v in strategy.experimental_local_results(variable.value)]
        np.testing.assert_array_equal(values[0], values[1], err_msg=variable.path)


def test_progress_is_a_line_per_interval_with_an_eta_when_not_a_terminal():
    import io
    stream = io.StringIO()
    progress = monitor.LineProgress(total=100, every=10, stream=stream)
    for step in range(0, 101, 5):
        progress.update(step, values=[("loss", 1.5), ("mse", 0.25)], finalize=step == 100)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and "\x1b" not in stream.getvalue()
    assert lines[0].startswith("step 10/100 (10%)  loss 1.5  mse 0.25") and "ETA" in lines[0]
    assert lines[-1].startswith("step 100/100 (100%)") and lines[-1].endswith("done")


def test_bfloat16_loss_terms_match_float32_on_a_fixed_batch():
    """Dense layers run in bf16 (8-bit mantissa); every term stays within 6% (or 5e-3 nats) of float32,
    because the losses, the adjacency, the log-density sums and GECO run in float32."""
    import keras
    keras.utils.set_random_seed(0)  # the same weights whatever ran before in this process
    config = Config(bits=16, hidden_dim=64, continuous_dim=32, batch_size=64, binary_bottleneck="betatcvae",
                    continuous_bottleneck="geco_vae", binary_threshold="uniform", similarity_weight=1.0,
                    similarity_target="anchor", anchors=16, geco_kappa=0.5, input_scaling="l2").validate()
    features = np.abs(np.random.default_rng(0).normal(size=(400, 48))).astype(np.float32)
    weights, terms = None, {}
    for policy in ("float32", "mixed_bfloat16"):
        with distribute.precision_policy(policy):
            model = TwinBottleneckHashing(config, 48, 400)
            model.build_all()
            model.adapt(features)
            if weights is None:
                weights = [v.numpy() for v in model.weights]
            else:
                for variable, value in zip(model.weights, weights):
                    variable.assign(value)
            out = model.forward(tf.constant(features[:64]), tf.constant([1, 2]), training=True)
            terms[policy] = {k: float(v) for k, v in model.loss_terms(out).logged.items()}
    for key, value in terms["float32"].items():
        assert terms["mixed_bfloat16"][key] == pytest.approx(value, rel=6e-2, abs=5e-3), key


def test_final_evaluation_writes_bit_statistics_and_a_tensorboard_pr_curve(tmp_path):
    features = synthetic_features()
    config = Config(name="t", steps=10, **{**SMALL, "eval_every": 0, "checkpoint_every": 10})
    train.train(config, tmp_path, strategy=tf.distribute.get_strategy(), feature_set=features)
    tags = {}
    for path in (tmp_path / "logs" / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.setdefault(value.tag, set()).add((event.step, value.metadata.plugin_data.plugin_name))
    for tag in ("bits/balance", "bits/min_balance", "bits/distinct_codes", "bits/mean_activation"):
        assert any(step == 10 for step, _ in tags[tag]), tag
    assert tags["final/pr_by_hamming_radius/pr_curves"] == {(10, "pr_curves")}
    # the projector: a class-stratified sample of the database codes (all 512 here) as +-1 vectors, labelled
    from google.protobuf import text_format
    from tensorboard.plugins import projector
    folder = tmp_path / "logs" / "projector"
    config_proto = text_format.Parse((folder / "projector_config.pbtxt").read_text(), projector.ProjectorConfig())
    entry = config_proto.embeddings[0]
    assert entry.metadata_path == "metadata.tsv" and not entry.sprite.image_path  # features only: no thumbnails
    embedding = tf.train.load_variable(tf.train.latest_checkpoint(str(folder)), "embedding/.ATTRIBUTES/VARIABLE_VALUE")
    assert embedding.shape == (512, 8) and set(np.unique(embedding)) <= {-1.0, 1.0}
    assert sorted((folder / "metadata.tsv").read_text().split()) == sorted(str(y) for y in features.train_labels)


def test_the_projector_sprite_holds_each_sampled_rows_thumbnail(tmp_path):
    from PIL import Image

    from tbhvae.train.projector import THUMBNAIL, write_projector
    from test_retrieval import write_jpeg_npz
    colours = np.array([[250, 0, 0], [0, 250, 0], [0, 0, 250]], np.uint8)
    labels = np.repeat(np.arange(3), 4)  # class-sorted, as the CIFAR files
    files = [tf.io.encode_jpeg(np.full((16, 16, 3), colours[y], np.uint8), quality=100).numpy() for y in labels]
    write_jpeg_npz(tmp_path / "images.npz", {"train": (files, labels), "test": (files[:2], labels[:2])})
    codes = np.eye(12, 5, dtype=np.uint8)
    folder = write_projector(tmp_path / "projector", codes, labels, ("red", "green", "blue"),
                             str(tmp_path / "images.npz"))
    assert (folder / "metadata.tsv").read_text().split() == ["red"] * 4 + ["green"] * 4 + ["blue"] * 4
    with Image.open(folder / "sprite.png") as sprite:
        pixels = np.asarray(sprite.convert("RGB"))
    assert pixels.shape == (4 * THUMBNAIL, 4 * THUMBNAIL, 3)  # 12 thumbnails on a 4 x 4 grid, row-major
    for position, y in enumerate(labels):
        top, left = (position // 4) * THUMBNAIL, (position % 4) * THUMBNAIL
        centre = pixels[top + THUMBNAIL // 2, left + THUMBNAIL // 2].astype(int)
        assert np.abs(centre - colours[y]).max() < 30, position


def test_xla_is_on_by_default_only_off_cpus_and_never_for_several_cpu_replicas():
    one, two = tf.distribute.get_strategy(), two_replicas()
    assert Config().jit_compile == "auto" and Config(jit_compile=True).jit_compile == "true"
    assert not train.use_xla(Config(), one) and not train.use_xla(Config(), two)  # this machine has no GPU
    assert train.use_xla(Config(jit_compile="true"), one) and not train.use_xla(Config(jit_compile="true"), two)
    assert not train.use_xla(Config(jit_compile="false"), one)
