"""tf.distribute for training: the strategy, which process is the chief, collectives
across workers, and every TensorFlow / Keras workaround the trainer needs.

Workarounds (each documented where it is applied):
  _steps_in_one_call          several steps per call with several replicas: Keras 3's own
                              multi-step loop fails there (keras-team/keras#19246)
  use_xla                     no XLA for several replicas on CPU devices (one shared XLA host)
  _report_metrics_as_vectors  [1]-shaped step metrics under MultiWorkerMirroredStrategy
                              (tensorflow/tensorflow#72388)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from tbhvae.config import Config
from tbhvae.train.rundir import TrainingError


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
    resolver = _cluster_resolver()
    if resolver is None or not resolver.cluster_spec().jobs or resolver.task_type is None:
        raise TrainingError("TF_CONFIG needs both 'cluster' (job name -> host:port list) and 'task' "
                            "(type and index of this process); see README 'Several machines'")
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    except RuntimeError as err:  # "Collective ops must be configured at program startup"
        raise TrainingError(f"cannot start the multi-worker strategy ({err}); create it with "
                            f"make_strategy('multiworker') before any other TensorFlow op") from None
    except ValueError as err:
        raise TrainingError(f"TF_CONFIG does not describe a valid cluster ({err})") from None


def _cluster_resolver() -> tf.distribute.cluster_resolver.TFConfigClusterResolver | None:
    """TensorFlow's reading of TF_CONFIG, None when it is unset or empty.

    Raises TrainingError (one line) when TF_CONFIG is not a cluster description.
    """
    if not os.environ.get("TF_CONFIG"):
        return None
    try:
        described = json.loads(os.environ["TF_CONFIG"])
    except json.JSONDecodeError as err:
        raise TrainingError(f"TF_CONFIG is not valid JSON ({err}); see README 'Several machines'") from None
    if not isinstance(described, dict):
        raise TrainingError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    try:
        resolver.cluster_spec()
    except (TypeError, ValueError) as err:
        raise TrainingError(f"TF_CONFIG does not describe a valid cluster ({err})") from None
    return resolver


def is_multi_worker(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether `strategy` spans several processes (then collectives must run on every worker)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process writes the run directory (checkpoints, summaries, metrics.json).

    A multi-worker strategy knows (`extended.should_checkpoint`: the "chief" task, else
    worker 0). Any other strategy runs in one process: the chief unless TF_CONFIG names
    it as a non-chief task.
    """
    if is_multi_worker(strategy):
        return strategy.extended.should_checkpoint
    resolver = _cluster_resolver()
    if resolver is None or resolver.task_type in (None, "chief"):
        return True
    return (resolver.task_type == "worker" and (resolver.task_id or 0) == 0
            and "chief" not in resolver.cluster_spec().jobs)


def gather_from_workers(strategy: tf.distribute.Strategy) -> Callable[[int], np.ndarray]:
    """A function int -> int64 [replicas], every replica's copy of its worker's value.

    It runs a collective, so every worker must call it at the same point.
    """
    @tf.function
    def gather(value):
        return strategy.gather(strategy.run(tf.identity, args=(value,)), axis=0)

    return lambda value: gather(tf.constant([value], tf.int64)).numpy()


def check_same_start(strategy: tf.distribute.Strategy, start_step: int) -> None:
    """Fails on every worker unless all restored the same step (e.g. model_dir not shared)."""
    steps = gather_from_workers(strategy)(start_step)
    if steps.min() != steps.max():
        raise TrainingError(f"workers resumed from different steps ({steps.min()} to {steps.max()}); "
                            f"--model_dir must be on a filesystem every worker can read")


@contextlib.contextmanager
def precision_policy(name: str):
    """Keras's global dtype policy `name` within the block, the previous one restored after."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def compile_for_fit(model: keras.Model, config: Config, strategy: tf.distribute.Strategy,
                    start_step: int) -> int:
    """Compiles the built `model` for fit() under `strategy`; returns its steps per execution."""
    spe = execution_steps(config, start_step)
    own_loop = strategy.num_replicas_in_sync > 1 and spe > 1
    if is_multi_worker(strategy) and not own_loop:  # Keras's loop reduces the step metrics itself
        _report_metrics_as_vectors(model)
    actor = model.actor_optimizer
    model.compile(actor_optimizer=actor, critic_optimizer=model.critic_optimizer, optimizer=actor,
                  jit_compile=use_xla(config, strategy), auto_scale_loss=False, steps_per_execution=spe)
    if own_loop:
        _steps_in_one_call(model, strategy, spe)
    return spe


def execution_steps(config: Config, start_step: int) -> int:
    """Steps per tf.function call that land exactly on every log/eval/checkpoint/end step."""
    spe = math.gcd(config.steps_per_execution, config.log_every, config.checkpoint_every,
                   config.steps, max(config.steps - start_step, 1))
    if config.eval_every:
        spe = math.gcd(spe, config.eval_every)
    return max(spe, 1)


def use_xla(config: Config, strategy: tf.distribute.Strategy) -> bool:
    """Whether the train step is XLA-compiled: `jit_compile`, with "auto" = only on accelerators.

    "auto" leaves CPUs to TensorFlow's own (oneDNN) kernels, which train both
    models faster than XLA's CPU backend (BENCHMARKS.md, "Training throughput").
    Several replicas on CPU devices never use XLA: logical CPU devices share
    one XLA host, and a compiled replica step then reads another replica's
    variables ("Trying to access resource ... located in device CPU:1").
    """
    on_cpus = _runs_on_cpus(strategy)
    if config.jit_compile == "auto":
        return not on_cpus
    return config.jit_compile == "true" and (strategy.num_replicas_in_sync == 1 or not on_cpus)


def _runs_on_cpus(strategy: tf.distribute.Strategy) -> bool:
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy, which places ops on the first GPU when there is one
        return not tf.config.list_logical_devices("GPU")
    return all("CPU" in device.upper() for device in devices)


def _steps_in_one_call(model: keras.Model, strategy: tf.distribute.Strategy, steps: int) -> None:
    """Makes `fit` run `steps` train steps per tf.function call under a multi-replica strategy.

    Keras 3's multi-step loop (an Optional-carrying while loop) fails under
    MirroredStrategy ("You must feed a value for placeholder tensor",
    keras-team/keras#19246), and one call per step costs a replica step's
    dispatch each time. The trainer's dataset never ends, so a plain loop of
    `strategy.run` over the distributed iterator serves (XLA-compiled per step
    when the model is). The logs are the model's metrics read once after the
    loop, in cross-replica context: summed over every replica and worker, so
    each worker sees the same mean over the global batch, as Keras reports it.
    """
    one_step = tf.function(lambda data: strategy.run(model.train_step, args=(data,)),
                           jit_compile=model.jit_compile)

    @tf.function
    def train_function(iterator):
        for _ in tf.range(steps):
            one_step(next(iterator))
        return {metric.name: metric.result() for metric in model.metrics}

    def make_train_function(force=False):
        model.train_function = train_function
        return train_function

    model.make_train_function = make_train_function


def _report_metrics_as_vectors(model: keras.Model) -> None:
    """Makes train_step return each metric as shape [1] instead of a scalar.

    Under MultiWorkerMirroredStrategy Keras 3 averages step metrics with
    strategy.reduce(MEAN, axis=0), which fails on scalars ("Invalid reduction
    dimension 0 for input with 0 dimensions", tensorflow/tensorflow#72388).
    """
    step = model.train_step
    model.train_step = lambda data: {name: tf.reshape(value, [1]) for name, value in step(data).items()}
