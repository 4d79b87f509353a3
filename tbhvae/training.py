"""Training under tf.distribute: strategy, input pipeline, run directory, callbacks.

A run directory holds:
  .tbhvae-run     marker: --fresh clears only directories holding it (or older runs' own files)
  .tbhvae-lock    flock-ed by the one trainer writing here (names it); removed when it ends
  config.json     the resolved config (written before training starts)
  checkpoints/    tf.train.CheckpointManager: model, optimisers, GECO state and the
                  run's totals (training time, mAP history, last loss terms)
  logs/           TensorBoard event files (scalars, histograms, images, hparams)
  metrics.json    final q10k evaluation
Rerunning with the same directory resumes from the latest checkpoint (the newest
intact one when the latest is missing or incomplete).
Under MultiWorkerMirroredStrategy only the chief writes there; every worker
restores from it (a filesystem all workers share), and non-chief workers save
into a temporary directory that is removed at the end.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from tbhvae import evaluation
from tbhvae.config import Config, ConfigError
from tbhvae.checks import atomic_write
from tbhvae.data import DataError, FeatureSet, load_features
from tbhvae.models import TwinBottleneckHashing, encode_features
from tbhvae.protocol import periodic_queries, select_queries
from tbhvae.train.rundir import (LOCK_FILE, MARKER, RunDirError, RunDirectory, TrainingError,  # noqa: F401
                                 finished_steps)

# ------------------------------------------------------------------ strategy
def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """"default" (one device), "mirrored" (all GPUs, else all logical CPUs),
    "multiworker" (TF_CONFIG), or "auto" (mirrored when more than one GPU).

    "multiworker" must be created before any other TensorFlow op runs.
    """
    if name == "multiworker":
        return _multi_worker_strategy()
    if name not in ("auto", "default", "mirrored"):
        raise TrainingError(f"unknown strategy '{name}': use auto, default, mirrored or multiworker")
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def _multi_worker_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    if "TF_CONFIG" not in os.environ:
        raise TrainingError("--strategy multiworker needs TF_CONFIG describing the cluster "
                            "(see README 'Several machines')")
    cluster = _tf_config()
    if not cluster.get("cluster") or "task" not in cluster:
        raise TrainingError("TF_CONFIG needs both 'cluster' (job name -> host:port list) and 'task' "
                            "(type and index of this process); see README 'Several machines'")
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as err:  # "Collective ops must be configured at program startup"
        raise TrainingError(f"cannot start the multi-worker strategy ({err}); create it with "
                            f"make_strategy('multiworker') before any other TensorFlow op") from None
    except ValueError as err:
        raise TrainingError(f"TF_CONFIG does not describe a valid cluster ({err})") from None


def _tf_config() -> dict:
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    except json.JSONDecodeError as err:
        raise TrainingError(f"TF_CONFIG is not valid JSON ({err}); see README 'Several machines'") from None
    if not isinstance(cluster, dict):
        raise TrainingError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    return cluster


def is_chief() -> bool:
    """True unless TF_CONFIG names this task as a non-chief worker."""
    cluster = _tf_config()
    task = cluster.get("task", {})
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and task.get("index", 0) == 0 and "chief" not in cluster.get("cluster", {})


def _is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def _gather_from_workers(strategy: tf.distribute.Strategy):
    """A function int -> int64 [replicas], every replica's copy of its worker's value.

    It runs a collective, so every worker must call it at the same point.
    """
    @tf.function
    def gather(value):
        return strategy.gather(strategy.run(tf.identity, args=(value,)), axis=0)

    return lambda value: gather(tf.constant([value], tf.int64)).numpy()


# ------------------------------------------------------------------ data
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



# ------------------------------------------------------------------ callbacks
class _Clock:
    """Wall time spent inside train executions (excludes the first, compiling one)."""

    def __init__(self):
        self.compute_seconds = 0.0
        self.steps_timed = 0
        self.executions = 0
        self._start = None

    def begin(self):
        self._start = time.perf_counter()

    def end(self, steps: int):
        elapsed = time.perf_counter() - self._start
        self.executions += 1
        if self.executions > 1:
            self.compute_seconds += elapsed
            self.steps_timed += steps


# Run bookkeeping kept in every checkpoint (as JSON), so metrics.json covers all sessions of a run.
EMPTY_TOTALS = {"train_seconds": 0.0, "compute_seconds": 0.0, "steps_timed": 0, "map_history": [],
                "last_logs": {}}


class _LineProgress:
    """Progress as one plain line every `log_every` steps, for logs that are not a terminal.

    Same `update(step, values, finalize)` as keras.utils.Progbar; the ETA is
    extrapolated from this session's steps per second.
    """

    def __init__(self, total: int, every: int, stream=None):
        self.total, self.every = total, every
        self.stream = stream or sys.stdout
        self.started = self.first_step = self.last_printed = None

    def update(self, step: int, values=(), finalize: bool = False) -> None:
        now = time.perf_counter()
        if self.started is None:
            self.started, self.first_step = now, step
            return
        if (not finalize and step % self.every) or step == self.last_printed:
            return
        self.last_printed = step
        rate = (step - self.first_step) / max(now - self.started, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        shown = "  ".join(f"{name} {value:.4g}" for name, value in values)
        eta_text = "done" if finalize or step >= self.total else f"ETA {_duration(eta)}"
        print(f"step {step}/{self.total} ({100 * step / self.total:.0f}%)  {shown}  "
              f"{rate:.1f} steps/s  {eta_text}", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _progress_display(config: Config):
    """keras's progress bar on a terminal, a line per `log_every` steps otherwise."""
    if sys.stdout.isatty():
        return keras.utils.Progbar(config.steps, unit_name="step", stateful_metrics=None)
    return _LineProgress(config.steps, config.log_every)


class TrainingMonitor(keras.callbacks.Callback):
    """Logging, periodic evaluation, checkpoints, progress and the stop at `steps`.

    Called once per execution of `steps_per_execution` steps; the global step
    is the actor optimiser's iteration count.
    """

    def __init__(self, config: Config, feature_set: FeatureSet, manager: tf.train.CheckpointManager,
                 writer, steps_per_execution: int, chief: bool, strategy: tf.distribute.Strategy,
                 totals_variable: tf.Variable):
        super().__init__()
        self.config = config
        self.features = feature_set
        self.manager = manager
        self.totals_variable = totals_variable
        self.earlier = {**EMPTY_TOTALS, **json.loads(totals_variable.numpy().decode() or "{}")}
        self.session_start = None
        self.writer = writer
        self.steps_per_execution = steps_per_execution
        self.chief = chief
        self.clock = _Clock()
        self.queries = periodic_queries(feature_set.test_labels, config.eval_queries)
        self.progress = _progress_display(config) if chief else None
        self.last_logs = {}
        self.history = []  # (step, map@1000) of periodic evaluations
        self.stopped_by_signal = False
        self._gather = _gather_from_workers(strategy) if _is_multi_worker(strategy) else None

    @property
    def step(self) -> int:
        return int(self.model.actor_optimizer.iterations.numpy())

    def totals(self) -> dict:
        """Bookkeeping over every session of the run (earlier ones come from the checkpoint)."""
        earlier = self.earlier
        trained = self.session_start is not None and self.clock.executions > 0
        session_seconds = time.perf_counter() - self.session_start if trained else 0.0
        return {"train_seconds": earlier["train_seconds"] + session_seconds,
                "compute_seconds": earlier["compute_seconds"] + self.clock.compute_seconds,
                "steps_timed": earlier["steps_timed"] + self.clock.steps_timed,
                "map_history": earlier["map_history"] + [[s, m] for s, m in self.history],
                "last_logs": self.last_logs or earlier["last_logs"]}

    def on_train_begin(self, logs=None):
        self.session_start = time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        self.clock.begin()

    def on_train_batch_end(self, batch, logs=None):
        self.clock.end(self.steps_per_execution)
        step = self.step
        self.last_logs = {k: float(v) for k, v in (logs or {}).items()}
        self._check_finite(step)
        if step % self.config.log_every == 0:
            self.write_scalars(step)
        if self.config.eval_every and step % self.config.eval_every == 0 and step < self.config.steps:
            self.evaluate(step)
        if step % self.config.checkpoint_every == 0:
            self.save(step)
        if self.progress is not None:
            shown = [(k, self.last_logs[k]) for k in ("loss", "mse", "bit_mean") if k in self.last_logs]
            self.progress.update(step, values=shown, finalize=False)
        if self._gather is not None:  # every worker must stop at the same step
            self.stopped_by_signal = bool(self._gather(int(self.stopped_by_signal)).any())
        if step >= self.config.steps or self.stopped_by_signal:
            self.model.stop_training = True

    def _check_finite(self, step: int) -> None:
        bad = [k for k, v in self.last_logs.items() if not math.isfinite(v)]
        if bad:
            where = (f"step {step}" if self.steps_per_execution == 1
                     else f"steps {step - self.steps_per_execution + 1}-{step}")
            raise TrainingError(
                f"non-finite loss term(s) {', '.join(sorted(bad))} at {where}; training stopped and the "
                f"last good checkpoint ({self.manager.latest_checkpoint}) was kept. Lower the learning "
                f"rate or check the input features")

    def save(self, step: int) -> None:
        """Checkpoints the current state, refusing weights or optimiser slots that hold NaN/Inf."""
        variables = list(self.model.variables) + [
            v for opt in (self.model.actor_optimizer, self.model.critic_optimizer) if opt is not None
            for v in opt.variables]
        bad = [v.path for v in variables
               if tf.as_dtype(v.dtype).is_floating and not bool(tf.reduce_all(tf.math.is_finite(v.value)))]
        if bad:
            raise TrainingError(
                f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} at step {step}; "
                f"checkpoint not written, the last good one ({self.manager.latest_checkpoint}) was kept. "
                f"Lower the learning rate or check the input features")
        self.totals_variable.assign(json.dumps(self.totals()))
        self.manager.save(checkpoint_number=step)

    def write_scalars(self, step: int) -> None:
        with self.writer.as_default():
            for name, value in self.last_logs.items():
                tf.summary.scalar(f"train/{name}", value, step=step)
            if self.clock.steps_timed:
                tf.summary.scalar("speed/examples_per_second",
                                  self.clock.steps_timed * self.config.batch_size / self.clock.compute_seconds,
                                  step=step)
            geco = self.model.geco
            if geco is not None:
                tf.summary.scalar("geco/lambda", float(geco.multiplier.numpy()), step=step)
                tf.summary.scalar("geco/constraint_average", float(geco.constraint_average.numpy()), step=step)
                tf.summary.scalar("geco/kappa", float(np.sqrt(geco.kappa_squared.numpy())), step=step)
        for tracker in self.model.metrics:
            tracker.reset_state()

    def evaluate(self, step: int) -> float:
        """Tie-aware mAP@1000 of fresh codes: held-out queries against the re-encoded database."""
        db_codes = encode_features(self.model, self.features.train_features)
        query_codes = encode_features(self.model, self.features.test_features[self.queries])
        score = evaluation.mean_average_precision(query_codes, db_codes, self.features.test_labels[self.queries],
                                                  self.features.train_labels, top_k=1000)
        self.history.append((step, score))
        with self.writer.as_default():
            tf.summary.scalar("eval/map@1000", score, step=step)
            statistics = evaluation.code_statistics(db_codes)
            write_code_summaries(db_codes, statistics, step)
        print(f"step {step}: mAP@1000 {score:.4f} ({len(self.queries)} held-out queries), bit balance "
              f"{statistics['bit_balance']:.2f} (worst bit {statistics['min_bit_balance']:.2f}), "
              f"{statistics['distinct_codes']} distinct codes", file=sys.stderr, flush=True)
        return score

    def on_train_end(self, logs=None):
        step = self.step
        if self.manager.latest_checkpoint is None or int(self.manager.latest_checkpoint.rsplit("-", 1)[-1]) != step:
            self.save(step)
        if self.progress is not None:
            self.progress.update(step, finalize=True)
        self.writer.flush()


def pr_curve_image(metrics: dict, title: str) -> np.ndarray | None:
    """Renders the precision-recall-by-radius and precision@N curves: uint8 [1, H, W, 4]."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    pr = metrics["pr_curve"]
    left.plot(pr["recall"], pr["precision"], marker=".")
    left.set(xlabel="recall", ylabel="precision", title="PR by Hamming radius", xlim=(0, 1), ylim=(0, 1))
    at_n = metrics["precision_at_n"]
    right.plot(list(at_n), list(at_n.values()), marker=".")
    right.set(xlabel="N", ylabel="precision@N", title="precision of the top N", xscale="log", ylim=(0, 1))
    fig.suptitle(title)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[None].copy()
    plt.close(fig)
    return image


# ------------------------------------------------------------------ entry point
def _execution_steps(config: Config, start_step: int, replicas: int) -> int:
    """Steps per tf.function call that land exactly on every log/eval/checkpoint/end step.

    With more than one replica it is 1: Keras 3's multi-step loop fails under
    MirroredStrategy ("You must feed a value for placeholder tensor",
    keras-team/keras#19246).
    """
    if replicas > 1:
        return 1
    spe = math.gcd(config.steps_per_execution, config.log_every, config.checkpoint_every,
                   config.steps, max(config.steps - start_step, 1))
    if config.eval_every:
        spe = math.gcd(spe, config.eval_every)
    return max(spe, 1)


def _report_metrics_as_vectors(model: keras.Model) -> None:
    """Makes train_step return each metric as shape [1] instead of a scalar.

    Under MultiWorkerMirroredStrategy Keras 3 averages step metrics with
    strategy.reduce(MEAN, axis=0), which fails on scalars ("Invalid reduction
    dimension 0 for input with 0 dimensions", tensorflow/tensorflow#72388).
    """
    step = model.train_step
    model.train_step = lambda data: {name: tf.reshape(value, [1]) for name, value in step(data).items()}


def use_xla(config: Config, strategy: tf.distribute.Strategy) -> bool:
    """XLA for the train step, except for several replicas on CPU devices.

    Logical CPU devices share one XLA host, and a compiled replica step then
    reads another replica's variables ("Trying to access resource ... located
    in device CPU:1"); GPUs each get their own compiled step.
    """
    if strategy.num_replicas_in_sync == 1:
        return config.jit_compile
    on_cpus = all("CPU" in device.upper() for device in strategy.extended.worker_devices)
    return config.jit_compile and not on_cpus


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
    strategy = strategy or make_strategy("auto")
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
    chief = is_chief()
    # Only the chief writes into model_dir, so only it takes the lock; the other workers read.
    with run.lock() if chief else contextlib.nullcontext(), _precision_policy(config.mixed_precision):
        return _train_in(run, config, strategy, fresh, feature_set, chief)


@contextlib.contextmanager
def _precision_policy(name: str):
    """Keras's global dtype policy `name` within the block, the previous one restored after."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _train_in(run: RunDirectory, config: Config, strategy: tf.distribute.Strategy, fresh: bool,
              feature_set: FeatureSet, chief: bool) -> dict:
    """train() after the cheap checks, holding the run directory's lock on the chief."""
    if not fresh:
        run.check_compatible(config, feature_set.dim)
    elif chief:
        run.clear()
    if chief:
        run.remove_partial_saves()
    keras.utils.set_random_seed(config.seed)

    with strategy.scope():
        model = TwinBottleneckHashing(config, feature_set.dim, dataset_size=len(feature_set.train_features))
        model.adapt(feature_set.train_features)
        actor = keras.optimizers.Adam(config.learning_rate, name="actor_adam")
        critic = keras.optimizers.Adam(config.critic_learning_rate, name="critic_adam")
        if config.mixed_precision == "mixed_float16":
            actor, critic = keras.optimizers.LossScaleOptimizer(actor), keras.optimizers.LossScaleOptimizer(critic)
        model.compile(actor_optimizer=actor, critic_optimizer=critic, optimizer=actor, auto_scale_loss=False)
        model.build_all()
    with tf.device("CPU:0"):  # host-side bookkeeping, identical on every worker: not mirrored
        totals = tf.Variable(json.dumps(EMPTY_TOTALS), dtype=tf.string, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, actor_optimizer=actor, run_totals=totals,
                                     **({"critic_optimizer": critic} if model.critics else {}))
    # Every worker resumes from the chief's checkpoints; a non-chief saves (saving may
    # involve collectives) into a private directory removed at the end.
    latest = None if fresh else run.resume_checkpoint()
    if latest:
        _restore(checkpoint, latest)
        if chief:
            run.name_latest(latest)
    start_step = int(actor.iterations.numpy())
    if _is_multi_worker(strategy):
        _check_same_start(strategy, start_step)
    if chief:
        try:
            run.write_config(config, feature_set.dim, len(feature_set.train_features))
        except OSError as err:
            raise run.cannot_write(err) from None
    checkpoint_dir = str(run.checkpoints) if chief else tempfile.mkdtemp(prefix="tbhvae-worker-ckpt-")
    try:
        manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=config.checkpoints_to_keep)
        return _fit_and_evaluate(config, run, strategy, model, manager, totals, feature_set, start_step, chief)
    finally:
        if not chief:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


def _restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (tf.errors.OpError, ValueError, AssertionError, IndexError) as err:  # IndexError: truncated file
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise TrainingError(f"cannot restore checkpoint {path} ({detail}); it is damaged or belongs to "
                            f"another model: pass --fresh to start over or use another --model_dir") from None


def _check_same_start(strategy: tf.distribute.Strategy, start_step: int) -> None:
    """Fails on every worker unless all restored the same step (e.g. model_dir not shared)."""
    steps = _gather_from_workers(strategy)(start_step)
    if steps.min() != steps.max():
        raise TrainingError(f"workers resumed from different steps ({steps.min()} to {steps.max()}); "
                            f"--model_dir must be on a filesystem every worker can read")


def _fit_and_evaluate(config: Config, run: RunDirectory, strategy: tf.distribute.Strategy, model,
                      manager: tf.train.CheckpointManager, totals: tf.Variable, feature_set: FeatureSet,
                      start_step: int, chief: bool) -> dict:
    """Runs the remaining steps, then the final evaluation; writes metrics.json on the chief."""
    replicas = strategy.num_replicas_in_sync
    actor = model.actor_optimizer
    writer = (tf.summary.create_file_writer(str(run.logs / "train")) if chief
              else tf.summary.create_noop_writer())
    if chief and start_step == 0:
        _write_hparams(writer, config)

    spe = _execution_steps(config, start_step, replicas)
    if _is_multi_worker(strategy):
        _report_metrics_as_vectors(model)
    model.compile(actor_optimizer=actor, critic_optimizer=model.critic_optimizer, optimizer=actor,
                  jit_compile=use_xla(config, strategy), auto_scale_loss=False, steps_per_execution=spe)
    monitor = TrainingMonitor(config, feature_set, manager, writer, spe, chief, strategy, totals)

    if start_step < config.steps:
        dataset = train_dataset(feature_set.train_features, config.batch_size, config.seed, start_step)
        with _stop_on_sigterm(monitor):
            model.fit(dataset, epochs=1, steps_per_epoch=config.steps - start_step, verbose=0, shuffle=False,
                      callbacks=[monitor])
    if monitor.stopped_by_signal:
        raise TrainingError(f"stopped by SIGTERM at step {monitor.step}; checkpoint saved in "
                            f"{run.checkpoints}, rerun the same command to resume")

    so_far = monitor.totals()  # before the evaluation: train_seconds counts training only
    evaluation_started = time.perf_counter()
    metrics = final_evaluation(model, feature_set, config, writer, int(actor.iterations.numpy()))
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
        atomic_write(run.metrics_path, json.dumps(metrics, indent=2))
    return metrics


@contextlib.contextmanager
def _stop_on_sigterm(monitor: TrainingMonitor):
    """Within the block, SIGTERM asks `monitor` to stop (and checkpoint) at the next step boundary.

    Handlers can only be installed from the main thread; elsewhere SIGTERM keeps its handler.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(monitor, "stopped_by_signal", True))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def final_evaluation(model, feature_set: FeatureSet, config: Config, writer, step: int) -> dict:
    """q10k (or q1k) protocol with curves; logs scalars and the PR plot at `step`."""
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
    with writer.as_default():
        for key in ("map@1000", "map", "precision@r2"):
            tf.summary.scalar(f"final/{key}", metrics[key], step=step)
        write_code_summaries(db_codes, statistics, step)
        _write_pr_curve(metrics["pr_curve"], step)
        image = pr_curve_image(metrics, f"{config.name}, {config.bits} bits, step {step}")
        if image is not None:
            tf.summary.image("final/retrieval_curves", image, step=step)
    writer.flush()
    return metrics


def write_code_summaries(db_codes: np.ndarray, statistics: dict, step: int) -> None:
    """Per-bit activation histogram and the `code_statistics` of the database codes, in the default writer."""
    tf.summary.histogram("bits/mean_activation", db_codes.mean(axis=0), step=step)
    tf.summary.scalar("bits/balance", statistics["bit_balance"], step=step)
    tf.summary.scalar("bits/min_balance", statistics["min_bit_balance"], step=step)
    tf.summary.scalar("bits/distinct_codes", statistics["distinct_codes"], step=step)


def _write_pr_curve(curve: dict, step: int) -> None:
    """The precision-recall curve by Hamming radius as TensorBoard's own PR-curve summary (one threshold a radius)."""
    from tensorboard.plugins.pr_curve import summary as pr_summary
    proto = pr_summary.raw_data_pb(
        "final/pr_by_hamming_radius", true_positive_counts=curve["true_positives"],
        false_positive_counts=curve["false_positives"], true_negative_counts=curve["true_negatives"],
        false_negative_counts=curve["false_negatives"], precision=curve["precision"], recall=curve["recall"],
        num_thresholds=len(curve["radius"]), description="threshold k = retrieve everything within radius k")
    tf.summary.experimental.write_raw_pb(proto.SerializeToString(), step=step)


def _write_hparams(writer, config: Config) -> None:
    from tensorboard.plugins.hparams import api as hp
    values = {k: v for k, v in json.loads(config.to_json()).items() if isinstance(v, (bool, int, float, str))}
    with writer.as_default():
        hp.hparams(values, trial_id=config.name)
