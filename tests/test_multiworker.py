"""`train.py --strategy multiworker`: two worker processes on loopback ports (TF_CONFIG).

One test, two sessions: the workers are stopped with SIGTERM (sent to the
non-chief only) after the first checkpoint, then rerun to the end. Checks
that both stop at the same step, that both resume from the chief's
checkpoint at that step (the step each second session starts at is
recorded), that they finish with identical weights equal to the chief's
final checkpoint, and that only the chief writes into --model_dir (the
non-chief's checkpoints go to a temporary directory that is removed).
Each session costs about 25 s on two idle cores, mostly TensorFlow start-up.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from conftest import REPO_ROOT
from tbhvae import config as config_lib
from tbhvae.data import save_features
from tbhvae.models import TwinBottleneckHashing
from test_reliability import first_logged_step_per_session
from test_training import synthetic_features

STEPS = 40
SETTINGS = dict(hidden_dim=32, continuous_dim=16, bits=8, batch_size=64, log_every=10, checkpoint_every=10,
                eval_every=0, geco_calibration_steps=5, geco_warmup=10)

# Runs the training CLI in-process and saves the final weights (by variable path) to argv[1].
# Also writes the session's start (the step training resumes at, and the optimiser's iteration count
# then) as JSON next to the weights, before the first training step.
WORKER = '''
import inspect
import json
import sys
from pathlib import Path

import numpy as np

from tbhvae.cli import train as cli
from tbhvae.train import loop

weights_path = sys.argv.pop(1)
evaluate = loop.final_evaluation
fit = loop._fit_and_evaluate


def save_weights_then_evaluate(model, *args, **kwargs):
    np.savez(weights_path, **{v.path: np.asarray(v) for v in model.variables})
    return evaluate(model, *args, **kwargs)


def record_start_then_fit(*args, **kwargs):
    arguments = inspect.signature(fit).bind(*args, **kwargs).arguments
    start = {"start_step": int(arguments["start_step"]),
             "iterations": int(arguments["model"].actor_optimizer.iterations.numpy())}
    Path(weights_path).with_name("start.json").write_text(json.dumps(start))
    return fit(*args, **kwargs)


loop.final_evaluation = save_weights_then_evaluate
loop._fit_and_evaluate = record_start_then_fit
cli.run()
'''


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(tmp_path, session, features, model_dir):
    """Starts worker 0 (the chief) and worker 1; each gets its own TMPDIR."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    sets = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    workers = []
    for index in range(2):
        logs = tmp_path / f"{session}{index}"
        (logs / "tmp").mkdir(parents=True)
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TMPDIR=str(logs / "tmp"),
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        command = [sys.executable, str(script), str(logs / "weights.npz"),
                   "--config", str(REPO_ROOT / "configs" / "cifar10_tbhvae.py"), "--features", str(features),
                   "--steps", str(STEPS), "--model_dir", str(model_dir), "--strategy", "multiworker", *sets]
        workers.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=open(logs / "stdout", "w"),
                                        stderr=open(logs / "stderr", "w")))
    return workers


def watch(workers, non_chief_tmp, timeout=400, on_first_checkpoint=None, model_dir=None):
    """Waits for both workers; returns whether the non-chief ever had a private checkpoint."""
    deadline = time.monotonic() + timeout
    private_checkpoint = False
    while any(w.poll() is None for w in workers):
        private_checkpoint |= bool(list(non_chief_tmp.glob("tbhvae-worker-ckpt-*/checkpoint")))
        if on_first_checkpoint and (model_dir / "checkpoints" / "checkpoint").exists():
            on_first_checkpoint()
            on_first_checkpoint = None
        if time.monotonic() > deadline:
            for w in workers:
                w.kill()
            raise AssertionError("workers did not finish in time")
        time.sleep(0.05)
    return private_checkpoint


def stderr_of(tmp_path, session, index):
    return (tmp_path / f"{session}{index}" / "stderr").read_text()


def start_of(tmp_path, session, index):
    """Where worker `index` started training in `session` (written by WORKER)."""
    return json.loads((tmp_path / f"{session}{index}" / "start.json").read_text())


def test_two_workers_stop_together_resume_and_end_with_identical_weights(tmp_path):
    features = save_features(tmp_path / "features.npz", synthetic_features(n=256, q=32))
    model_dir = tmp_path / "run"

    # Session 1: SIGTERM to the non-chief after the chief's first checkpoint; both must stop.
    workers = start_workers(tmp_path, "first", features, model_dir)
    chief_pids = [workers[0].pid]
    watch(workers, tmp_path / "first1" / "tmp", model_dir=model_dir,
          on_first_checkpoint=lambda: workers[1].send_signal(signal.SIGTERM))
    codes = [w.returncode for w in workers]
    assert codes == [2, 2], [stderr_of(tmp_path, "first", i)[-2000:] for i in range(2)]
    stops = [re.search(r"error: stopped by SIGTERM at step (\d+); checkpoint saved in (\S+),",
                       stderr_of(tmp_path, "first", i)) for i in range(2)]
    assert all(stops) and stops[0].groups() == stops[1].groups()
    assert stops[0].group(2) == str(model_dir / "checkpoints")
    stopped_at = int(stops[0].group(1))
    assert 0 < stopped_at < STEPS
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith(f"ckpt-{stopped_at}")
    assert not list((tmp_path / "first1" / "tmp").iterdir())  # the non-chief removed its checkpoints
    assert [start_of(tmp_path, "first", i) for i in range(2)] == [{"start_step": 0, "iterations": 0}] * 2

    # Session 2: the same command resumes on both workers and runs to the end.
    workers = start_workers(tmp_path, "second", features, model_dir)
    chief_pids.append(workers[0].pid)
    private = watch(workers, tmp_path / "second1" / "tmp")
    assert [w.returncode for w in workers] == [0, 0], [stderr_of(tmp_path, "second", i)[-2000:] for i in range(2)]
    assert private and not list((tmp_path / "second1" / "tmp").iterdir())
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["replicas"] == 2
    # Both workers started the second session at the step the first one stopped (and checkpointed) at,
    # and the chief's second session logged its first step right after it, not from step 0.
    resumed = {"start_step": stopped_at, "iterations": stopped_at}
    assert [start_of(tmp_path, "second", i) for i in range(2)] == [resumed] * 2
    log_every = SETTINGS["log_every"]
    assert first_logged_step_per_session(model_dir) == [log_every, (stopped_at // log_every + 1) * log_every]

    chief, other = (np.load(tmp_path / f"second{i}" / "weights.npz") for i in range(2))
    assert chief.files == other.files and len(chief.files) > 10
    for name in chief.files:
        np.testing.assert_array_equal(chief[name], other[name], err_msg=name)
    restored = restore_final_checkpoint(model_dir)
    for variable in restored.variables:
        np.testing.assert_array_equal(np.asarray(variable), chief[variable.path], err_msg=variable.path)

    # Only the chief (worker 0) wrote summaries: one events file per session, named with its pid.
    events = [p.name for p in (model_dir / "logs" / "train").glob("events.out.tfevents.*")]
    writers = sorted(pid for pid in chief_pids for name in events if f".{pid}." in name)
    assert len(events) == 2 and writers == sorted(chief_pids), (events, chief_pids)


def restore_final_checkpoint(model_dir):
    """A model holding the latest checkpoint of `model_dir`."""
    config = config_lib.from_dict(json.loads((model_dir / "config.json").read_text()), "config.json")
    data = json.loads((model_dir / "data.json").read_text())
    model = TwinBottleneckHashing(config, data["input_dim"], data["dataset_size"])
    actor = keras.optimizers.Adam(config.learning_rate)
    model.compile(actor_optimizer=actor, critic_optimizer=None, optimizer=actor)
    model.build_all()
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    status = tf.train.Checkpoint(model=model, actor_optimizer=actor).restore(latest).expect_partial()
    status.assert_existing_objects_matched()  # run_totals is the only part left out
    return model
