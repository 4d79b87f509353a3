"""What training reports while it runs: the TrainingMonitor callback (logging, periodic
evaluation, checkpoints, the stop at `steps`), its clock, the progress display,
SIGTERM handling and the TensorBoard summaries (scalars, code statistics, PR curve,
hparams).
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from tbhvae import evaluation, plots
from tbhvae.checks import first_line
from tbhvae.config import Config
from tbhvae.data import FeatureSet
from tbhvae.hashing_model import encode_features
from tbhvae.protocol import periodic_queries
from tbhvae.train.distribute import gather_from_workers, is_multi_worker
from tbhvae.train.rundir import TrainingError

# Run bookkeeping kept in every checkpoint (as JSON), so metrics.json covers all sessions of a run.
EMPTY_TOTALS = {"train_seconds": 0.0, "compute_seconds": 0.0, "steps_timed": 0, "map_history": [],
                "last_logs": {}}


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


class LineProgress:
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
    return LineProgress(config.steps, config.log_every)


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
        self._gather = gather_from_workers(strategy) if is_multi_worker(strategy) else None

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
        try:
            self.manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as err:  # a full disk is ResourceExhaustedError from TF's writer
            raise TrainingError(
                f"cannot write the checkpoint of step {step} ({first_line(err, limit=200)}); the last good one "
                f"({self.manager.latest_checkpoint}) was kept: free disk space and rerun to resume") from None

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


@contextlib.contextmanager
def stop_on_sigterm(monitor: TrainingMonitor):
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


def write_code_summaries(db_codes: np.ndarray, statistics: dict, step: int) -> None:
    """Per-bit activation histogram and the `code_statistics` of the database codes, in the default writer."""
    tf.summary.histogram("bits/mean_activation", db_codes.mean(axis=0), step=step)
    tf.summary.scalar("bits/balance", statistics["bit_balance"], step=step)
    tf.summary.scalar("bits/min_balance", statistics["min_bit_balance"], step=step)
    tf.summary.scalar("bits/distinct_codes", statistics["distinct_codes"], step=step)


def write_final_summaries(writer, metrics: dict, db_codes: np.ndarray, statistics: dict, title: str,
                          step: int) -> None:
    """The final evaluation in TensorBoard: its headline scalars, the code statistics of the database
    codes uint8 [n, bits], the PR curve by Hamming radius and the rendered curves."""
    with writer.as_default():
        for key in ("map@1000", "map", "precision@r2"):
            tf.summary.scalar(f"final/{key}", metrics[key], step=step)
        write_code_summaries(db_codes, statistics, step)
        _write_pr_curve(metrics["pr_curve"], step)
        tf.summary.image("final/retrieval_curves", plots.curves_image(metrics, title), step=step)
    writer.flush()


def _write_pr_curve(curve: dict, step: int) -> None:
    """The precision-recall curve by Hamming radius as TensorBoard's own PR-curve summary (one threshold a radius)."""
    from tensorboard.plugins.pr_curve import summary as pr_summary
    proto = pr_summary.raw_data_pb(
        "final/pr_by_hamming_radius", true_positive_counts=curve["true_positives"],
        false_positive_counts=curve["false_positives"], true_negative_counts=curve["true_negatives"],
        false_negative_counts=curve["false_negatives"], precision=curve["precision"], recall=curve["recall"],
        num_thresholds=len(curve["radius"]), description="threshold k = retrieve everything within radius k")
    tf.summary.experimental.write_raw_pb(proto.SerializeToString(), step=step)


def write_hparams(writer, config: Config) -> None:
    """The config's scalar values as the run's TensorBoard hparams (trial id = config.name)."""
    from tensorboard.plugins.hparams import api as hp
    values = {k: v for k, v in json.loads(config.to_json()).items() if isinstance(v, (bool, int, float, str))}
    with writer.as_default():
        hp.hparams(values, trial_id=config.name)
