"""The run directory as a safe store (issue 16): --fresh, the trainer lock, checkpoint fallback,
partial saves, versioned TFLite exports, and config files that exit."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from tbhvae import train
from tbhvae.config import Config, ConfigError, load_config
from tbhvae.data import save_features
from tbhvae.train import rundir
from test_reliability import (
    SMALL,
    error_line,
    first_logged_step_per_session,
    plant_leftovers_of_a_killed_save,
    run_cli,
    snapshot,
    train_command,
)
from test_training import synthetic_features


def _train(model_dir, steps, fresh=False, **changes):
    """A TBH run with tiny dimensions on synthetic_features(), in this process."""
    config = Config(name="t", steps=steps, **{**SMALL, **changes})
    return train.train(config, model_dir, strategy=tf.distribute.get_strategy(), fresh=fresh,
                          feature_set=synthetic_features())


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    return save_features(tmp_path_factory.mktemp("data") / "features.npz", synthetic_features())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, feature_file):
    """A finished 20-step TBH run on synthetic_features() with ckpt-10 and ckpt-20; copy before changing it."""
    model_dir = tmp_path_factory.mktemp("finished") / "run"
    _train(model_dir, steps=20, features=str(feature_file))
    return model_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / "run", symlinks=True))


def _contents(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ --fresh
@pytest.mark.parametrize("linked", ["logs", "checkpoints", "logs/train", "metrics.json",
                                    "checkpoints/ckpt-20.index"])
def test_fresh_never_deletes_through_a_symbolic_link(run_copy, tmp_path, linked):
    """A directory or a file of the run moved elsewhere and replaced by a link to it: nothing is deleted."""
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run_copy / linked, elsewhere)
    if elsewhere.is_dir():
        (elsewhere / "precious.txt").write_text("not tbhvae's")
    (run_copy / linked).symlink_to(elsewhere, target_is_directory=elsewhere.is_dir())
    target_before = _contents(elsewhere) if elsewhere.is_dir() else elsewhere.read_bytes()
    run_before = snapshot(run_copy)
    with pytest.raises(train.TrainingError, match=rf"{re.escape(linked)} is a symbolic link .*nothing deleted"):
        _train(run_copy, steps=10, fresh=True, bits=16)
    assert (_contents(elsewhere) if elsewhere.is_dir() else elsewhere.read_bytes()) == target_before
    assert snapshot(run_copy) == run_before and (run_copy / linked).is_symlink()


def test_fresh_refuses_a_directory_that_is_not_a_tbhvae_run(tmp_path, feature_file):
    other = tmp_path / "other_tool"
    (other / "checkpoints").mkdir(parents=True)
    (other / "logs").mkdir()
    (other / "config.json").write_text(json.dumps({"epochs": 3, "optimizer": "sgd"}))
    (other / "checkpoints" / "other.h5").write_bytes(b"\x89HDF weights")
    (other / "logs" / "important.txt").write_text("keep me")
    before = _contents(other)
    result = run_cli(train_command(feature_file, other, "--fresh"))
    assert result.returncode == 2, result.stderr[-2000:]
    line = error_line(result.stderr)
    assert f"{other} is not a tbhvae run directory" in line and "nothing deleted" in line, line
    assert _contents(other) == before and sorted(p.name for p in other.iterdir()) == ["checkpoints", "config.json",
                                                                                     "logs"]


def test_fresh_removes_only_the_runs_own_files(run_copy):
    foreign = {"notes.md": b"my notes", "checkpoints/other.h5": b"weights of another tool",
               "logs/important.txt": b"keep me", "logs/train/readme.txt": b"also mine"}
    for name, data in foreign.items():
        (run_copy / name).write_bytes(data)
    plant_leftovers_of_a_killed_save(run_copy / "checkpoints", 30)
    old_events = {p.name for p in (run_copy / "logs" / "train").glob("events.out.tfevents.*")}
    metrics = _train(run_copy, steps=10, fresh=True, bits=16)
    assert metrics["steps"] == 10 and metrics["bits"] == 16
    for name, data in foreign.items():
        assert (run_copy / name).read_bytes() == data, name
    new_events = {p.name for p in (run_copy / "logs" / "train").glob("events.out.tfevents.*")}
    assert new_events and not new_events & old_events
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == [
        "checkpoint", "ckpt-10.data-00000-of-00001", "ckpt-10.index", "other.h5"]
    assert json.loads((run_copy / "config.json").read_text())["bits"] == 16
    assert (run_copy / rundir.MARKER).is_file() and not (run_copy / rundir.LOCK_FILE).exists()


@pytest.mark.parametrize("directory", ["run_without_marker", "empty", "missing"])
def test_fresh_accepts_runs_older_than_the_marker_and_new_directories(run_copy, tmp_path, directory):
    if directory == "run_without_marker":  # written before the marker existed: recognised by its own files
        (run_copy / rundir.MARKER).unlink()
        target = run_copy
    else:
        target = tmp_path / "new"
        if directory == "empty":
            target.mkdir()
    metrics = _train(target, steps=5, fresh=True, checkpoint_every=5)
    assert metrics["steps"] == 5 and (target / rundir.MARKER).is_file()
    assert tf.train.latest_checkpoint(str(target / "checkpoints")).endswith("ckpt-5")


# ------------------------------------------------------------------ the lock
HOLDER = """
import sys, time
from tbhvae.train.rundir import RunDirectory
with RunDirectory(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(600)
"""


def test_second_trainer_is_refused_naming_the_holder_and_a_kill_releases_the_lock(tmp_path, feature_file):
    model_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(model_dir)], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(model_dir)
        result = run_cli(train_command(feature_file, model_dir))
        assert result.returncode == 2, result.stderr[-2000:]
        line = error_line(result.stderr)
        assert f"{model_dir} is in use by another trainer (pid {holder.pid} on {socket.gethostname()})" in line
        assert snapshot(model_dir) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert (model_dir / rundir.LOCK_FILE).exists()  # a SIGKILL leaves the file, but not the lock
    metrics = _train(model_dir, steps=5, checkpoint_every=5)
    assert metrics["steps"] == 5 and not (model_dir / rundir.LOCK_FILE).exists()


def test_only_the_chief_takes_the_lock(run_copy, monkeypatch):
    with rundir.RunDirectory(run_copy).lock():  # as if the chief were running
        with pytest.raises(rundir.RunDirError, match=rf"in use by another trainer \(pid {os.getpid()} on "):
            _train(run_copy, steps=20)
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                    "task": {"type": "worker", "index": 1}}))
        assert not train.is_chief()
        before = snapshot(run_copy)
        assert _train(run_copy, steps=20)["steps"] == 20
        assert snapshot(run_copy) == before


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("damage, resumed_from", [("latest_missing", 10), ("index_unreadable", 20)])
def test_damaged_index_resumes_from_the_newest_intact_checkpoint(run_copy, capsys, damage, resumed_from):
    checkpoints = run_copy / "checkpoints"
    if damage == "latest_missing":
        for path in checkpoints.glob("ckpt-20.*"):
            path.unlink()
    else:
        (checkpoints / "checkpoint").write_bytes(b"\xff\xfe\x00 random bytes \x9c")
    metrics = _train(run_copy, steps=30)
    assert "resuming from the newest intact checkpoint" in capsys.readouterr().err
    assert metrics["steps"] == 30
    assert first_logged_step_per_session(run_copy)[-1] == resumed_from + SMALL["log_every"]  # not from step 0
    assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-30")
    assert (checkpoints / "ckpt-10.index").is_file()


def test_index_with_no_intact_checkpoint_left_stops_instead_of_restarting(run_copy):
    for path in (run_copy / "checkpoints").glob("ckpt-*"):
        path.unlink()
    before = snapshot(run_copy)
    with pytest.raises(train.TrainingError, match=r"no intact checkpoint is left .*pass --fresh"):
        _train(run_copy, steps=20)
    assert snapshot(run_copy) == before


def test_partial_saves_are_removed_at_the_next_start(run_copy):
    checkpoints = run_copy / "checkpoints"
    plant_leftovers_of_a_killed_save(checkpoints, 30)
    (checkpoints / "ckpt-40_temp_0123abcd").mkdir()
    (checkpoints / "ckpt-40_temp_0123abcd" / "part-00000-of-00001.index").write_bytes(b"\x01" * 10)
    intact = _contents(checkpoints)
    _train(run_copy, steps=20)
    assert not list(checkpoints.glob("*_temp*")) and not list(checkpoints.glob("checkpoint.tmp*"))
    assert all(_contents(checkpoints)[name] == data for name, data in intact.items() if name.startswith("ckpt-20"))
    assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-20")


# ------------------------------------------------------------------ TFLite export
def test_tflite_exports_into_one_directory_get_new_versions(finished_run, tmp_path):
    command = [sys.executable, "export.py", "--model_dir", str(finished_run), "--out", str(tmp_path / "base"),
               "--name", "tbh", "--tflite_dir", str(tmp_path / "lite"), "--latency_repeats", "1",
               "--representative_examples", "20", "--parity_examples", "10"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    exported = _contents(tmp_path / "lite" / "1")
    assert {"parity.json", "float32.tflite", "int8.tflite"} <= set(exported)
    second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert _contents(tmp_path / "lite" / "1") == exported
    assert sorted(p.name for p in (tmp_path / "lite").iterdir()) == ["1", "2"]
    assert f"parity report written to {tmp_path / 'lite' / '2' / 'parity.json'}" in second.stdout
    assert json.loads((tmp_path / "lite" / "2" / "parity.json").read_text())["saved_model"].endswith("tbh/2")


# ------------------------------------------------------------------ config files
EXITING_CONFIGS = {
    "exit_on_import": "import sys\nsys.exit(0)\n",
    "exit_in_get_config": "import sys\n\ndef get_config():\n    sys.exit(0)\n",
    "raise_system_exit": "def get_config():\n    raise SystemExit('done')\n",
}


@pytest.mark.parametrize("case", EXITING_CONFIGS)
def test_config_file_that_exits_is_a_config_error(tmp_path, case):
    path = tmp_path / f"{case}.py"
    path.write_text(EXITING_CONFIGS[case])
    with pytest.raises(ConfigError, match=r"exits \(SystemExit .*\) instead of returning a Config") as error:
        load_config(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_cli_with_a_config_file_that_exits_fails_with_one_line(tmp_path, feature_file):
    path = tmp_path / "exits.py"
    path.write_text(EXITING_CONFIGS["exit_in_get_config"])
    result = run_cli(train_command(feature_file, tmp_path / "run", "--config", str(path)))
    assert result.returncode == 2
    assert "instead of returning a Config" in error_line(result.stderr)
    assert not (tmp_path / "run").exists()


def test_rerunning_a_finished_run_changes_nothing_unless_asked(tmp_path):
    from test_reliability import run_cli, train_command
    features = tmp_path / "features.npz"
    save_features(features, synthetic_features(n=256, q=32))
    model_dir = tmp_path / "run"
    command = train_command(features, model_dir, "--steps", "20", "--set", "eval_every=0")
    first = run_cli(command)
    assert first.returncode == 0, first.stderr
    metrics = (model_dir / "metrics.json").read_bytes()
    saved = json.loads(metrics)
    assert saved["train_seconds"] > 0 and saved["evaluation_seconds"] > 0
    events = sorted((model_dir / "logs" / "train").iterdir())
    again = run_cli(command)
    assert again.returncode == 0, again.stderr
    assert "run already complete (20 steps)" in again.stdout
    assert (model_dir / "metrics.json").read_bytes() == metrics
    assert sorted((model_dir / "logs" / "train").iterdir()) == events
    reevaluated = run_cli(command + ["--reevaluate"])
    assert reevaluated.returncode == 0, reevaluated.stderr
    # no step trained: the training time stays (up to the tail after the last checkpoint)
    assert json.loads((model_dir / "metrics.json").read_text())["train_seconds"] == pytest.approx(
        saved["train_seconds"], rel=0.15)


def test_train_help_lists_every_flag_and_config_key_and_print_config_resolves():
    import dataclasses

    from tbhvae.config import Config
    help_text = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--help"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=120).stdout
    flat = " ".join(help_text.split())
    for flag in ("--config", "--set", "--model_dir", "--features", "--bits", "--steps", "--strategy", "--[no]fresh",
                 "--[no]reevaluate", "--[no]print_config"):
        assert flag in flat, flag
    for field in dataclasses.fields(Config):
        assert f"{field.name} (" in flat, field.name
    printed = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--config",
                              str(REPO_ROOT / "configs" / "cifar10_tbhvae.py"), "--bits", "16", "--set",
                              "seed=3", "--print_config"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    resolved = json.loads(printed.stdout)
    assert resolved["bits"] == 16 and resolved["seed"] == 3 and resolved["binary_bottleneck"] == "betatcvae"


def test_offline_download_fails_fast_and_every_suggested_flag_parses(tmp_path, monkeypatch):
    import time as time_module

    from tbhvae.data import DataError, images
    monkeypatch.setattr(images, "DOWNLOAD_HOST", ("127.0.0.1", 9))  # nothing listens on the discard port
    started = time_module.monotonic()
    with pytest.raises(DataError, match="unreachable") as caught:
        images._check_online("tfds:cifar10")
    assert time_module.monotonic() - started < 10
    # every flag the offline hints name is a real flag of train.py (and of the extraction CLI)
    hints = caught.value.args[0] + " " + __import__("tbhvae.data.extraction", fromlist=["x"]).WEIGHTS_HINT
    suggested = sorted(set(re.findall(r"--[a-z_]+", hints)))
    assert {"--features", "--images", "--weights", "--data_dir"} <= set(suggested)
    for flag in suggested:
        value = str(tmp_path / "absent")
        result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), f"{flag}={value}", "--print_config"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert "Unknown command line flag" not in result.stderr, (flag, result.stderr)


def test_fresh_clears_the_projector_files_and_keeps_foreign_ones(tmp_path):
    run = rundir.RunDirectory(tmp_path)
    run.write_config(Config(name="t", **SMALL), 24, 512)
    projector = tmp_path / "logs" / "projector"
    projector.mkdir(parents=True)
    ours = ["projector_config.pbtxt", "metadata.tsv", "sprite.png", "checkpoint", "embedding-1.index",
            "embedding-1.data-00000-of-00001"]
    for name in ours + ["notes.txt"]:
        (projector / name).write_text("x")
    run.clear()
    assert sorted(p.name for p in projector.iterdir()) == ["notes.txt"]
    (projector / "notes.txt").unlink()
    run.write_config(Config(name="t", **SMALL), 24, 512)
    for name in ours:
        (projector / name).write_text("x")
    run.clear()
    assert not (tmp_path / "logs").exists()
