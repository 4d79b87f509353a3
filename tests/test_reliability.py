"""Interruption and recovery (SIGKILL, SIGTERM, NaN, leftovers of a killed save) and bad input.

The interruption tests run `train.py` in subprocesses on a few hundred
synthetic examples with tiny dimensions and compare every resumed run with
one that was never interrupted.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, two_cpu_replicas
from kill_point import RETURNED_EARLY
from tbhvae import train
from tbhvae.config import Config, ConfigError
from tbhvae.data import DataError, FeatureSet, load_features, save_features
from tbhvae.models import TwinBottleneckHashing
from tbhvae.train import monitor as monitor_lib
from test_training import synthetic_features

STEPS = 400
TINY = dict(hidden_dim=32, continuous_dim=16, bits=8, batch_size=64, log_every=50, checkpoint_every=50,
            steps_per_execution=50, eval_every=100, geco_calibration_steps=5, geco_warmup=10, jit_compile=False)
SMALL = dict(TINY, log_every=5, checkpoint_every=10, steps_per_execution=5)
GECO_STATE = ("log_lambda", "constraint_average", "kappa_squared", "calibration_sum")


# ------------------------------------------------------------------ helpers
def train_command(features, model_dir, *extra):
    """The TBH-VAE training command with tiny dimensions."""
    sets = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={str(value).lower()}")]
    config = REPO_ROOT / "configs" / "cifar10_tbhvae.py"
    return [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(config), "--features", str(features),
            "--steps", str(STEPS), "--model_dir", str(model_dir), *sets, *extra]


def run_cli(command, timeout=300):
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def start_cli(command, log_dir):
    """Starts `command` with stdout/stderr in files (a full pipe would block it)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=open(log_dir / "stdout", "w"),
                            stderr=open(log_dir / "stderr", "w"))


def wait_for_first_checkpoint(process, model_dir, timeout=240):
    """Returns once the checkpoint state file exists, i.e. one checkpoint is complete."""
    state = model_dir / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + timeout
    while not state.exists():
        if process.poll() is not None:
            pytest.fail(f"training exited with {process.returncode} before its first checkpoint")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no checkpoint within the timeout")
        time.sleep(0.02)


def error_line(stderr: str) -> str:
    """The single `error:` line the CLI prints, checking there is no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert stderr.rstrip().endswith(lines[0])
    return lines[0]


def checkpoint_step(model_dir) -> int:
    path = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    return int(path.rsplit("-", 1)[1]) if path else 0


def checkpoint_values(model_dir) -> dict:
    """Every saved variable of the latest checkpoint (weights, optimiser slots, GECO state)."""
    path = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if not name.startswith(("save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH", "run_totals"))}


def first_logged_step_per_session(model_dir) -> list[int]:
    """For each events file (one per training session, oldest first), the first train/loss step."""
    files = sorted((model_dir / "logs" / "train").glob("events.out.tfevents.*"),
                   key=lambda p: int(p.name.split(".")[3]))
    firsts = []
    for path in files:
        steps = [event.step for event in tf.compat.v1.train.summary_iterator(str(path))
                 for value in event.summary.value if value.tag == "train/loss"]
        if steps:
            firsts.append(min(steps))
    return firsts


def snapshot(directory) -> dict:
    """Path -> (size, mtime_ns) of every file below `directory`."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_as_reference(model_dir, reference):
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["steps"] == STEPS
    assert metrics["map@1000"] == pytest.approx(reference["metrics"]["map@1000"], abs=1e-4)
    assert metrics["geco_lambda"] == pytest.approx(reference["metrics"]["geco_lambda"], rel=1e-4)
    # Bookkeeping of all sessions travels in the checkpoints: history and loss terms are complete.
    assert len(metrics["map_history"]) == len(reference["metrics"]["map_history"]) == STEPS // 100 - 1
    np.testing.assert_allclose(metrics["map_history"], reference["metrics"]["map_history"], atol=1e-4)
    assert metrics["final_train_terms"].keys() == reference["metrics"]["final_train_terms"].keys()
    for term in ("total_correlation", "mutual_information", "dimensionwise_kl", "loss"):
        assert metrics["final_train_terms"][term] == pytest.approx(
            reference["metrics"]["final_train_terms"][term], rel=1e-4, abs=1e-5)
    assert metrics["train_seconds"] > 0 and metrics["examples_per_second"] > 0
    values = checkpoint_values(model_dir)
    assert values.keys() == reference["values"].keys()
    for name, value in values.items():
        np.testing.assert_allclose(value, reference["values"][name], rtol=1e-4, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    return save_features(tmp_path_factory.mktemp("data") / "small.npz", synthetic_features(n=384, q=64))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, feature_file):
    """An uninterrupted CLI run: its directory, metrics and final checkpoint values."""
    model_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli(train_command(feature_file, model_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"dir": model_dir, "metrics": json.loads((model_dir / "metrics.json").read_text()),
            "values": checkpoint_values(model_dir)}


def _train_small(model_dir, features, steps, **changes):
    config = Config(name="t", steps=steps, **{**SMALL, **changes})
    return train.train(config, model_dir, strategy=tf.distribute.get_strategy(), feature_set=features)


@pytest.fixture(scope="module")
def ten_step_run(tmp_path_factory):
    """A finished 10-step TBH run (checkpoint ckpt-10) on synthetic_features(); copy before changing it."""
    model_dir = tmp_path_factory.mktemp("ten_steps") / "run"
    _train_small(model_dir, synthetic_features(), steps=10)
    return model_dir


def copy_of(run_dir, tmp_path):
    return Path(shutil.copytree(run_dir, tmp_path / "run"))



# ------------------------------------------------------------------ interruption
def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, feature_file, reference):
    model_dir = tmp_path / "run"
    command = train_command(feature_file, model_dir)
    process = start_cli(command, tmp_path / "killed")
    wait_for_first_checkpoint(process, model_dir)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    resumed_from = checkpoint_step(model_dir)
    assert 0 < resumed_from < STEPS
    assert not (model_dir / "metrics.json").exists()
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    names = {name for name, _ in tf.train.list_variables(latest)}
    for variable in GECO_STATE:  # GECO lives in the model, so in the checkpoint
        assert f"model/continuous_bottleneck/{variable}/.ATTRIBUTES/VARIABLE_VALUE" in names
    plant_leftovers_of_a_killed_save(model_dir / "checkpoints", resumed_from + TINY["checkpoint_every"])

    result = run_cli(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert first_logged_step_per_session(model_dir)[-1] == resumed_from + TINY["log_every"]
    assert_same_as_reference(model_dir, reference)
    assert not list((model_dir / "checkpoints").glob("*_temp"))


def plant_leftovers_of_a_killed_save(checkpoints, step):
    """What a kill while saving `step` can leave: shards in <prefix>_temp/, a partly written
    merged index and a temporary state file. The state file still names the previous checkpoint
    (TensorFlow's CheckpointManager rewrites it atomically, only after a save completes)."""
    shards = checkpoints / f"ckpt-{step}_temp"
    shards.mkdir(exist_ok=True)
    (shards / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\x00" * 100)
    (shards / "part-00000-of-00001.index").write_bytes(b"\x01" * 10)
    (checkpoints / f"ckpt-{step}.index").write_bytes(b"\x02" * 7)
    (checkpoints / "checkpoint.tmp0123456789abcdef").write_text('model_checkpoint_path: "ckpt-')


def test_sigterm_checkpoints_exits_nonzero_and_rerun_finishes(tmp_path, feature_file, reference):
    model_dir = tmp_path / "run"
    command = train_command(feature_file, model_dir)
    process = start_cli(command, tmp_path / "terminated")
    wait_for_first_checkpoint(process, model_dir)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 2
    line = error_line((tmp_path / "terminated" / "stderr").read_text())
    match = re.fullmatch(r"error: stopped by SIGTERM at step (\d+); checkpoint saved in \S+, "
                         r"rerun the same command to resume", line)
    assert match, line
    stopped_at = int(match.group(1))
    assert 0 < stopped_at < STEPS
    assert checkpoint_step(model_dir) == stopped_at
    assert not (model_dir / "metrics.json").exists()

    result = run_cli(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert first_logged_step_per_session(model_dir)[-1] == stopped_at + TINY["log_every"]
    assert_same_as_reference(model_dir, reference)


# Kills of the soak test: seeded, each at a random point of a phase still ahead of the run.
SOAK_KILLS = int(os.environ.get("TBHVAE_SOAK_KILLS", "5"))  # more for a longer soak, e.g. 30
SOAK_SEED = int(os.environ.get("TBHVAE_SOAK_SEED", "0"))
# Longest delay (s) from the start of the phase to the kill: about the phase's length on 2 busy cores
# ("train": for all STEPS steps). A kill that the phase outlasts lands after it, at the latest
# just before the process would exit (kill_point holds it), which is a kill point too.
KILL_DELAY = {"train": 3.0, "save": 0.08, "periodic_evaluation": 0.3, "final_evaluation": 0.4}


def soak_plan(rng: np.random.Generator, step: int, kills_left: int, used: dict) -> dict:
    """A kill point in what a run resumed at `step` has still to do: the least used of the training
    phases ahead, ties broken at random; the last two kills (or all, once training is done) go to
    the final evaluation."""
    ahead = {"train": int(step < STEPS), "save": (STEPS - step) // TINY["checkpoint_every"],
             "periodic_evaluation": sum(s % TINY["eval_every"] == 0 for s in range(step + 1, STEPS))}
    phases = [phase for phase, count in ahead.items() if count] if kills_left > 2 else []
    if phases:
        fewest = min(used.get(phase, 0) for phase in phases)
        phase = str(rng.choice([phase for phase in phases if used.get(phase, 0) == fewest]))
    else:
        phase = "final_evaluation"
    longest = KILL_DELAY[phase] * ((STEPS - step) / STEPS if phase == "train" else 1)
    return {"phase": phase, "occurrence": int(rng.integers(1, ahead.get(phase, 1) + 1)),
            "delay": round(float(rng.uniform(0, longest)), 4)}


def save_debris(model_dir) -> list[str]:
    """What an interrupted save left: shard directories and temporary state files."""
    checkpoints = model_dir / "checkpoints"
    return sorted(p.name for p in [*checkpoints.glob("*_temp"), *checkpoints.glob("checkpoint.tmp*")])


def test_soak_random_kills_during_steps_saves_and_evaluations_end_as_an_uninterrupted_run(
        tmp_path, feature_file, reference, capsys):
    model_dir = tmp_path / "run"
    command = [sys.executable, str(Path(__file__).with_name("kill_point.py")), *train_command(feature_file,
                                                                                              model_dir)[2:]]
    rng = np.random.default_rng(SOAK_SEED)
    kills, step, used = [], 0, {}
    for k in range(SOAK_KILLS):
        plan = soak_plan(rng, step, SOAK_KILLS - k, used)
        used[plan["phase"]] = used.get(plan["phase"], 0) + 1
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "TBHVAE_KILL_POINT": json.dumps(plan)})
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        resumed_at = checkpoint_step(model_dir)
        assert resumed_at >= step, f"the run went back from step {step} to {resumed_at} after {plan}"
        kills.append({**plan, "landed": "after the phase" if RETURNED_EARLY in result.stderr else "inside",
                      "checkpoint": resumed_at, "debris": save_debris(model_dir),
                      "metrics": (model_dir / "metrics.json").exists()})
        step = resumed_at
        if kills[-1]["metrics"]:  # killed after writing metrics.json: the run is complete, nothing is left
            break
    result = run_cli(train_command(feature_file, model_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_as_reference(model_dir, reference)
    assert not save_debris(model_dir)
    assert len(list((model_dir / "checkpoints").glob("ckpt-*.index"))) <= Config().checkpoints_to_keep
    with capsys.disabled():  # the record of the soak, printed even without -s
        print(f"\nsoak seed {SOAK_SEED}: {len(kills)} kills, then an uninterrupted run matched the reference")
        for kill in kills:
            print(f"  {kill}")


def test_nan_loss_stops_naming_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path, ten_step_run):
    features = synthetic_features()
    tmp_path = copy_of(ten_step_run, tmp_path)
    metrics_before = (tmp_path / "metrics.json").read_text()
    exploding = FeatureSet(features.train_features * 1e20, features.train_labels,
                           features.test_features, features.test_labels)  # finite input, infinite MSE
    with pytest.raises(train.TrainingError,
                       match=r"non-finite loss term\(s\) .*mse.* at steps 11-15; .*ckpt-10\) was kept"):
        _train_small(tmp_path, exploding, steps=20)
    assert checkpoint_step(tmp_path) == 10
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.index")) == ["ckpt-10.index"]
    assert all(np.isfinite(v).all() for v in checkpoint_values(tmp_path).values())
    assert (tmp_path / "metrics.json").read_text() == metrics_before


def test_weights_with_nan_are_never_checkpointed(tmp_path):
    features = synthetic_features()
    config = Config(name="t", steps=10, **SMALL)
    model = TwinBottleneckHashing(config, features.dim, len(features.train_features))
    actor = keras.optimizers.Adam()
    model.compile(actor_optimizer=actor, critic_optimizer=keras.optimizers.Adam(), optimizer=actor)
    model.build_all()
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, actor_optimizer=actor),
                                         str(tmp_path), max_to_keep=2)
    monitor = monitor_lib.TrainingMonitor(config, features, manager, tf.summary.create_noop_writer(), 1, True,
                                       tf.distribute.get_strategy(), tf.Variable("{}"))
    monitor.set_model(model)
    monitor.save(1)
    assert manager.latest_checkpoint.endswith("ckpt-1")
    model.decoder.hidden.kernel.assign(np.full(model.decoder.hidden.kernel.shape, np.nan, np.float32))
    with pytest.raises(train.TrainingError, match=r"decoder_hidden/kernel at step 2; checkpoint not written"):
        monitor.save(2)
    assert manager.latest_checkpoint.endswith("ckpt-1")
    assert not list(tmp_path.glob("ckpt-2*"))


@pytest.mark.parametrize("damage", ["truncated_data", "other_input_dim"])
def test_unusable_checkpoint_is_a_clear_error_and_left_alone(tmp_path, ten_step_run, damage):
    run_dir = copy_of(ten_step_run, tmp_path)
    features = synthetic_features()
    if damage == "truncated_data":
        data_file = next((run_dir / "checkpoints").glob("ckpt-10.data-*"))
        data_file.write_bytes(data_file.read_bytes()[:50])
    else:  # a run directory without data.json: only the checkpoint knows the input dim
        (run_dir / "data.json").unlink()
        features = synthetic_features(dim=20)
    before = snapshot(run_dir)
    with pytest.raises(train.TrainingError, match=r"cannot restore checkpoint .*ckpt-10 .*pass --fresh"):
        _train_small(run_dir, features, steps=20)
    assert snapshot(run_dir) == before


# ------------------------------------------------------------------ bad input: library
def test_incompatible_runs_leave_the_directory_untouched_unless_fresh(tmp_path, ten_step_run):
    features = synthetic_features()
    tmp_path = copy_of(ten_step_run, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"bits: 8 -> 16.*--fresh"):
        _train_small(tmp_path, features, steps=10, bits=16)
    with pytest.raises(DataError, match=r"dimension 20 .* 24-d features.*--fresh"):
        _train_small(tmp_path, synthetic_features(dim=20), steps=10)
    with pytest.raises(DataError, match=r"batch_size 64 exceeds the 40 training examples"):
        _train_small(tmp_path, synthetic_features(n=40), steps=10)
    with pytest.raises(ConfigError, match=r"batch_size 63 is not divisible by the 2 replicas"):
        config = Config(name="t", steps=10, **{**SMALL, "batch_size": 63})
        train.train(config, tmp_path, strategy=two_cpu_replicas(), feature_set=features)
    assert snapshot(tmp_path) == before
    fresh = train.train(Config(name="t", steps=5, **{**SMALL, "bits": 16, "checkpoint_every": 5}),
                           tmp_path, strategy=tf.distribute.get_strategy(), fresh=True, feature_set=features)
    assert fresh["bits"] == 16 and fresh["steps"] == 5
    assert json.loads((tmp_path / "config.json").read_text())["bits"] == 16
    assert checkpoint_step(tmp_path) == 5


def _write_bad_feature_file(path, problem):
    good = synthetic_features(n=60, q=10)
    arrays = {"train_features": good.train_features, "train_labels": good.train_labels,
              "test_features": good.test_features, "test_labels": good.test_labels}
    if problem == "missing":
        return path
    if problem in ("truncated", "corrupt"):
        save_features(path, good)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2] if problem == "truncated" else bytes(reversed(data)))
        return path
    if problem == "wrong_keys":
        arrays["features"] = arrays.pop("train_features")
    elif problem == "nan":
        arrays["train_features"][3, 2] = np.nan
    elif problem == "inf":
        arrays["test_features"][1, 0] = np.inf
    elif problem == "constant":
        arrays["train_features"] = np.ones_like(arrays["train_features"])
    elif problem == "label_count":
        arrays["train_labels"] = arrays["train_labels"][:-1]
    np.savez(path, **arrays)
    return path


DATA_PROBLEMS = {  # problem -> what the error must say
    "missing": r"feature file not found; pass --features",
    "truncated": r"not a readable \.npz file .*truncated or corrupt",
    "corrupt": r"not a readable \.npz file .*truncated or corrupt",
    "wrong_keys": r"missing key\(s\) train_features",
    "nan": r"'train_features' holds 1 NaN/Inf values \(first in row 3\)",
    "inf": r"'test_features' holds 1 NaN/Inf values",
    "constant": r"'train_features' are constant",
    "label_count": r"'train_labels' has 59 rows but the matching features have 60",
}


@pytest.mark.parametrize("problem", DATA_PROBLEMS)
def test_bad_feature_files_are_rejected_naming_file_and_key(tmp_path, problem):
    path = _write_bad_feature_file(tmp_path / f"{problem}.npz", problem)
    with pytest.raises(DataError, match=DATA_PROBLEMS[problem]) as error:
        load_features(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


# ------------------------------------------------------------------ bad input: command line
@pytest.mark.parametrize("problem", ["nan", "truncated", "wrong_keys"])
def test_cli_rejects_bad_feature_files_with_one_line(tmp_path, problem, reference):
    path = _write_bad_feature_file(tmp_path / f"{problem}.npz", problem)
    before = snapshot(reference["dir"])
    result = run_cli(train_command(path, reference["dir"]))
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert str(path) in line and re.search(DATA_PROBLEMS[problem], line), line
    assert snapshot(reference["dir"]) == before


def _config_file(tmp_path, body):
    path = tmp_path / "config.py"
    path.write_text(f"from tbhvae.config import Config\n\ndef get_config():\n    return Config({body})\n")
    return path


@pytest.mark.parametrize("case", ["unknown_override", "unknown_in_file", "wrong_type", "wrong_type_json",
                                  "zero_bits"])
def test_cli_rejects_bad_configs_with_one_line(tmp_path, case, feature_file, reference):
    extra, expected = {
        "unknown_override": (["--set", "bitz=8"], r"override 'bitz=8': unknown config key 'bitz'"),
        "unknown_in_file": (["--config", str(_config_file(tmp_path, "name='x', bitz=8"))],
                            r"config\.py: .*unexpected keyword argument 'bitz'"),
        "wrong_type": (["--set", "batch_size=many"], r"'batch_size=many': expected a value of type int"),
        "wrong_type_json": (["--config", str(tmp_path / "config.json")],
                            r"config\.json: config key 'bits' must be int, got str '8'"),
        "zero_bits": (["--bits", "0"], r"config key 'bits' must be > 0, got 0"),
    }[case]
    (tmp_path / "config.json").write_text(json.dumps({"name": "x", "bits": "8"}))
    before = snapshot(reference["dir"])
    result = run_cli(train_command(feature_file, reference["dir"], *extra))
    assert result.returncode == 2
    assert re.search(expected, error_line(result.stderr)), result.stderr[-500:]
    assert snapshot(reference["dir"]) == before


def test_cli_refuses_a_run_directory_of_another_architecture(feature_file, reference):
    before = snapshot(reference["dir"])
    result = run_cli(train_command(feature_file, reference["dir"], "--bits", "16"))
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert str(reference["dir"]) in line and "bits: 8 -> 16" in line and "--fresh" in line
    assert snapshot(reference["dir"]) == before
