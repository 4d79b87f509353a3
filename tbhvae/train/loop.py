"""The trainer: `train()` runs (or resumes) a run in a RunDirectory under a tf.distribute
strategy: the input pipeline, building and restoring the model, fit() with the
TrainingMonitor, and the final evaluation that writes metrics.json.

Rerunning with the same directory resumes from the latest checkpoint (the newest
intact one when the latest is missing or incomplete). Under
MultiWorkerMirroredStrategy only the chief writes there; every worker restores from
it (a filesystem all workers share), and non-chief workers save into a temporary
directory that is removed at the end.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tbhvae import evaluation
from tbhvae.checks import atomic_write, first_line
from tbhvae.config import Config, ConfigError
from tbhvae.data import DataError, FeatureSet, load_features
from tbhvae.hashing_model import create_model, encode_features
from tbhvae.protocol import select_queries
from tbhvae.train import distribute
from tbhvae.train.monitor import EMPTY_TOTALS, TrainingMonitor, stop_on_sigterm, write_final_summaries, write_hparams
from tbhvae.train.optimizers import FusedAdam
from tbhvae.train.projector import write_projector
from tbhvae.train.rundir import RunDirectory, TrainingError


def train(config: Config, model_dir: str | os.PathLike, strategy: tf.distribute.Strategy | None = None,
          fresh: bool = False, feature_set: FeatureSet | None = None) -> dict:
    """Trains (or resumes) a run, evaluates it on every test query, writes metrics.json.

    Returns the metrics dict. Raises ConfigError / DataError / TrainingError
    with a one-line message on bad input, before anything in `model_dir` is
    written (the lock file aside, removed again); RunDirError when another
    trainer holds the directory or `fresh` would delete what tbhvae did not
    write; TrainingError also on SIGTERM (after a checkpoint) and on a
    non-finite loss (keeping the last good checkpoint).
    """
    strategy = strategy or distribute.make_strategy("auto")
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {replicas} replicas; "
                          f"use a multiple of {replicas}")
    run = RunDirectory(model_dir)
    if run.path.exists() and not run.path.is_dir():
        raise ConfigError(f"--model_dir {run.path} is a file; pass a directory (new or holding a run)")
    feature_set = feature_set or resolve_features(config)
    if config.batch_size > len(feature_set.train_features):
        raise DataError(f"batch_size {config.batch_size} exceeds the {len(feature_set.train_features)} "
                        f"training examples; use --set batch_size={len(feature_set.train_features)} or less")
    extractor = features_extractor(config, feature_set)
    chief = distribute.is_chief(strategy)
    # Only the chief writes into model_dir, so only it takes the lock; the other workers read.
    with run.lock() if chief else contextlib.nullcontext(), distribute.precision_policy(config.mixed_precision):
        return _train_in(run, config, strategy, fresh, feature_set, extractor, chief)


def _train_in(run: RunDirectory, config: Config, strategy: tf.distribute.Strategy, fresh: bool,
              feature_set: FeatureSet, extractor: dict | None, chief: bool) -> dict:
    """train() after the cheap checks, holding the run directory's lock on the chief."""
    if not fresh:
        run.check_compatible(config, feature_set.dim)
    elif chief:
        run.clear()
    if chief:
        run.remove_partial_saves()
    keras.utils.set_random_seed(config.seed)
    latest = None if fresh else run.resume_checkpoint()
    model, actor, critic = build_model(config, feature_set, strategy, adapt=latest is None)
    with tf.device("CPU:0"):  # host-side bookkeeping, identical on every worker: not mirrored
        totals = tf.Variable(json.dumps(EMPTY_TOTALS), dtype=tf.string, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, actor_optimizer=actor, run_totals=totals,
                                     **({"critic_optimizer": critic} if model.critics else {}))
    # Every worker resumes from the chief's checkpoints; a non-chief saves (saving may
    # involve collectives) into a private directory removed at the end.
    if latest:
        _restore(checkpoint, latest)
        if chief:
            run.name_latest(latest)
    start_step = int(actor.iterations.numpy())
    if distribute.is_multi_worker(strategy):
        distribute.check_same_start(strategy, start_step)
    if chief:
        try:
            run.write_config(config, feature_set.dim, len(feature_set.train_features), extractor)
        except OSError as err:
            raise run.cannot_write(err) from None
    checkpoint_dir = str(run.checkpoints) if chief else tempfile.mkdtemp(prefix="tbhvae-worker-ckpt-")
    try:
        manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=config.checkpoints_to_keep)
        return _fit_and_evaluate(config, run, strategy, model, manager, totals, feature_set, start_step, chief)
    finally:
        if not chief:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


def features_extractor(config: Config, feature_set: FeatureSet) -> dict | None:
    """The extractor recorded for the run: the feature file's own record, else `features_extractor`
    when its output dimension is that of the features (a config used with other features records none)."""
    recorded, declared = feature_set.extractor, config.features_extractor
    if recorded is not None:
        if declared not in ("", recorded["backbone"]):
            logging.warning("features_extractor=%s ignored: %s records its extractor, %s", declared,
                            config.features, recorded["backbone"])
        return recorded
    if not declared:
        return None
    from tbhvae.data.extraction import BACKBONES  # heavy (keras.applications); only when needed

    if declared not in BACKBONES:
        raise ConfigError(f"config key 'features_extractor' must be one of {', '.join(BACKBONES)} or empty, "
                          f"got '{declared}'")
    if BACKBONES[declared].output_dim != feature_set.dim:
        logging.warning("features_extractor=%s ignored: it gives %d-d features, %s holds %d-d ones",
                        declared, BACKBONES[declared].output_dim, config.features, feature_set.dim)
        return None
    return {"backbone": declared, "weights": "imagenet", "input_size": None}


def build_model(config: Config, feature_set: FeatureSet, strategy: tf.distribute.Strategy, adapt: bool = True):
    """The model compiled with fresh optimisers: (model, actor, critic). `adapt`: fit its constants to the
    train features (`HashingModel.adapt`); a run that restores a checkpoint skips it, the checkpoint holds them."""
    with strategy.scope():
        model = create_model(config, feature_set.dim, len(feature_set.train_features))
        if adapt:
            model.adapt(feature_set.train_features)
        actor = FusedAdam(actor_learning_rate(config), name="actor_adam")
        critic = FusedAdam(config.critic_learning_rate, name="critic_adam")
        if config.mixed_precision == "mixed_float16":
            actor, critic = keras.optimizers.LossScaleOptimizer(actor), keras.optimizers.LossScaleOptimizer(critic)
        model.compile(actor_optimizer=actor, critic_optimizer=critic, optimizer=actor, auto_scale_loss=False)
        model.build_all()
    return model, actor, critic


def actor_learning_rate(config: Config):
    """The encoder/decoder learning rate: a float, or a schedule of the optimiser's step.

    "cosine" decays from `learning_rate` to 0 at `steps` (Loshchilov & Hutter's
    SGDR without restarts); raising --steps on a resumed run stretches the decay
    from that point on.
    """
    if config.learning_rate_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=config.steps)
    return config.learning_rate


def _restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
    """Restores `path` into `checkpoint`; TrainingError (one line) when it is damaged or another model's."""
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (tf.errors.OpError, ValueError, AssertionError, IndexError) as err:  # IndexError: truncated file
        raise TrainingError(f"cannot restore checkpoint {path} ({first_line(err, limit=200)}); it is damaged or "
                            f"belongs to another model: pass --fresh to start over or use another --model_dir"
                            ) from None


def _fit_and_evaluate(config: Config, run: RunDirectory, strategy: tf.distribute.Strategy, model,
                      manager: tf.train.CheckpointManager, totals: tf.Variable, feature_set: FeatureSet,
                      start_step: int, chief: bool) -> dict:
    """Runs the remaining steps, then the final evaluation; writes metrics.json on the chief."""
    replicas = strategy.num_replicas_in_sync
    actor = model.actor_optimizer
    writer = (tf.summary.create_file_writer(str(run.logs / "train")) if chief
              else tf.summary.create_noop_writer())
    if chief and start_step == 0:
        write_hparams(writer, config)

    spe = distribute.compile_for_fit(model, config, strategy, start_step)
    monitor = TrainingMonitor(config, feature_set, manager, writer, spe, chief, strategy, totals)

    if start_step < config.steps:
        dataset = train_dataset(feature_set.train_features, config.batch_size, config.seed, start_step)
        with stop_on_sigterm(monitor):
            model.fit(dataset, epochs=1, steps_per_epoch=config.steps - start_step, verbose=0, shuffle=False,
                      callbacks=[monitor])
    if monitor.stopped_by_signal:
        raise TrainingError(f"stopped by SIGTERM at step {monitor.step}; checkpoint saved in "
                            f"{run.checkpoints}, rerun the same command to resume")

    so_far = monitor.totals()  # before the evaluation: train_seconds counts training only
    evaluation_started = time.perf_counter()
    metrics = final_evaluation(model, feature_set, config, writer, int(actor.iterations.numpy()),
                               projector_dir=run.logs / "projector" if chief else None)
    metrics.update(
        train_seconds=so_far["train_seconds"],
        evaluation_seconds=time.perf_counter() - evaluation_started,
        examples_per_second=(so_far["steps_timed"] * config.batch_size / so_far["compute_seconds"]
                             if so_far["compute_seconds"] else 0.0),
        replicas=replicas,
        map_history=so_far["map_history"],
        final_train_terms=so_far["last_logs"],
    )
    if model.geco is not None:
        metrics["geco_lambda"] = float(model.geco.multiplier.numpy())
        metrics["geco_kappa"] = float(np.sqrt(model.geco.kappa_squared.numpy()))
    for key in ("mutual_information", "total_correlation", "dimensionwise_kl", "binary_kl"):
        if key in metrics["final_train_terms"]:
            metrics[key] = metrics["final_train_terms"][key]
    if chief:
        try:
            atomic_write(run.metrics_path, json.dumps(metrics, indent=2))
        except OSError as err:
            raise TrainingError(f"{run.metrics_path}: cannot write the metrics ({err.strerror or err}); "
                                f"free disk space and rerun the same command") from None
    return metrics


def final_evaluation(model, feature_set: FeatureSet, config: Config, writer, step: int,
                     projector_dir: Path | None = None) -> dict:
    """q10k (or q1k) protocol with curves; logs scalars and the PR plot at `step` and, with
    `projector_dir`, a sample of the database codes for TensorBoard's projector."""
    queries = select_queries(feature_set.test_labels, config.final_eval_queries)
    db_codes = encode_features(model, feature_set.train_features)
    query_codes = encode_features(model, feature_set.test_features[queries])
    metrics = evaluation.evaluate_codes(query_codes, db_codes, feature_set.test_labels[queries],
                                        feature_set.train_labels, top_k=1000, curves=True, index_ties=True)
    statistics = evaluation.code_statistics(db_codes)
    metrics.update(bits=config.bits, steps=step, queries=len(queries), database=len(db_codes),
                   model=config.name, **statistics)
    metrics["warnings"] = evaluation.health_warnings(metrics, metrics["chance_map@1000"], len(db_codes))
    for warning in metrics["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    title = f"{config.name}, {config.bits} bits, step {step}"
    write_final_summaries(writer, metrics, db_codes, statistics, title, step)
    if projector_dir is not None:
        # features extracted from a JPEG .npz by this run are aligned with its images: thumbnails
        images = config.images if not config.features and not config.images.startswith("tfds:") else None
        write_projector(projector_dir, db_codes, feature_set.train_labels, feature_set.class_names, images,
                        config.seed)
    return metrics


def train_dataset(features: np.ndarray, batch_size: int, seed: int, start_step: int = 0) -> tf.data.Dataset:
    """Global batches [batch_size, D] for steps start_step, start_step + 1, ...

    Batch s is a pure function of (seed, s): each epoch is a stateless
    permutation (index_shuffle), so a resumed run sees exactly the batches an
    uninterrupted one would.
    """
    count = len(features)
    if batch_size > count:
        raise DataError(f"batch_size {batch_size} exceeds the {count} training examples")
    steps_per_epoch = count // batch_size
    table = tf.constant(features, dtype=tf.float32)

    def indices(step):
        epoch, offset = step // steps_per_epoch, step % steps_per_epoch
        positions = offset * batch_size + tf.range(batch_size, dtype=tf.int64)
        return tf.random.experimental.index_shuffle(
            positions, seed=tf.stack([tf.constant(seed, tf.int64), epoch]),
            max_index=count - 1)

    dataset = (tf.data.Dataset.counter(start_step, dtype=tf.int64)
               .map(indices, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .unbatch()
               .batch(batch_size, drop_remainder=True)
               .map(lambda idx: tf.gather(table, idx), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .prefetch(tf.data.AUTOTUNE))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def resolve_features(config: Config) -> FeatureSet:
    """Loads config.features, or extracts (and caches) features from config.images."""
    if config.features:
        return load_features(config.features)
    from tbhvae.data import extraction  # heavy (keras.applications); only when needed
    path = extraction.features_for(config.images, config.backbone, config.backbone_weights,
                                   cache_dir=os.path.expanduser(config.cache_dir),
                                   data_dir=config.data_dir or None)
    return load_features(path)

