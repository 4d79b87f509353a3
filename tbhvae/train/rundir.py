"""The run directory: the one owner of what train.py writes and what export, retrieval and bench read.

  .tbhvae-run     marker: --fresh clears only directories holding it (or older runs' own files)
  .tbhvae-lock    flock-ed by the one trainer writing here (names it); removed when it ends
  config.json     the resolved config (written before training starts)
  data.json       the features' input_dim and dataset_size (the model needs both to be rebuilt)
                  and, when the feature file records it, the extractor that made them
  checkpoints/    tf.train.CheckpointManager: model, optimisers, GECO state and the
                  run's totals (training time, mAP history, last loss terms)
  logs/           TensorBoard event files (scalars, histograms, images, hparams)
  metrics.json    final evaluation
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import tensorflow as tf

from tbhvae import config as config_lib
from tbhvae.checks import atomic_write
from tbhvae.config import Config, ConfigError
from tbhvae.data import DataError

# Keys whose change makes an existing checkpoint unusable.
ARCHITECTURE_KEYS = ("model", "bits", "continuous_dim", "hidden_dim", "binary_bottleneck", "continuous_bottleneck",
                     "discriminator", "discriminator_hidden", "input_scaling")


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says what to do."""


class RunDirError(TrainingError):
    """A run directory that cannot be used or cleared safely; nothing in it was changed."""


MARKER = ".tbhvae-run"  # written with config.json: --fresh clears only directories holding it
LOCK_FILE = ".tbhvae-lock"  # flock-ed by the trainer writing the run, removed when it ends
_RUN_FILES = (MARKER, "config.json", "data.json", "metrics.json")
# What tf.train.CheckpointManager writes in checkpoints/: the index (and its temporary copies),
# the checkpoints, and the shards of a save in progress.
_CHECKPOINT_ENTRY = re.compile(r"checkpoint(\.tmp[0-9a-f]+)?|ckpt-\d+(\.index|\.data-\d{5}-of-\d{5}|_temp.*)")
_PARTIAL_SAVE = re.compile(r"checkpoint\.tmp[0-9a-f]+|ckpt-\d+_temp.*")
_EVENTS_FILE = re.compile(r"events\.out\.tfevents\..+")
_PROJECTOR_FILE = re.compile(r"projector_config\.pbtxt|metadata\.tsv|sprite\.png|checkpoint|"
                             r"embedding-\d+(\.index|\.data-\d{5}-of-\d{5})")


class RunDirectory:
    """Paths, lock, config bookkeeping and checkpoint housekeeping of one run."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.checkpoints = self.path / "checkpoints"
        self.logs = self.path / "logs"
        self.metrics_path = self.path / "metrics.json"
        self.data_path = self.path / "data.json"

    def saved_config(self) -> Config | None:
        if not self.config_path.is_file():
            return None
        try:
            values = json.loads(self.config_path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{self.config_path}: unreadable ({err}); remove it or pass --fresh") from None
        return config_lib.from_dict(values, str(self.config_path))

    def data_info(self) -> tuple[int, int]:
        """(input_dim, dataset_size) from data.json; ValueError when it is missing or lacks either."""
        try:
            meta = json.loads(self.data_path.read_text())
            return int(meta["input_dim"]), int(meta["dataset_size"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{self.path}: data.json is missing or lacks input_dim/dataset_size") from None

    def extractor(self) -> dict | None:
        """The feature extractor recorded in data.json ({"backbone", "weights", "input_size"}), None if unknown."""
        try:
            return json.loads(self.data_path.read_text()).get("extractor")
        except (OSError, json.JSONDecodeError, AttributeError):
            return None

    def saved_metrics(self) -> dict | None:
        """metrics.json as written by the final evaluation, None when the run has not finished."""
        if not self.metrics_path.is_file():
            return None
        return json.loads(self.metrics_path.read_text())

    def check_compatible(self, config: Config, input_dim: int) -> None:
        saved = self.saved_config()
        if saved is None:
            return
        changed = [k for k in ARCHITECTURE_KEYS if getattr(saved, k) != getattr(config, k)]
        if changed:
            detail = ", ".join(f"{k}: {getattr(saved, k)} -> {getattr(config, k)}" for k in changed)
            raise ConfigError(f"{self.path} holds a run with a different architecture ({detail}); "
                              f"use another --model_dir or pass --fresh to start over")
        if self.data_path.is_file():
            try:
                saved_dim = json.loads(self.data_path.read_text()).get("input_dim")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise DataError(f"{self.data_path}: unreadable (not a JSON object); the run directory is "
                                f"damaged: pass --fresh to start over or use another --model_dir") from None
            if saved_dim is not None and saved_dim != input_dim:
                raise DataError(f"features have dimension {input_dim} but the run in {self.path} was "
                                f"trained on {saved_dim}-d features; use matching features or --fresh")

    def write_config(self, config: Config, input_dim: int, dataset_size: int, extractor: dict | None = None) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / MARKER).is_file():
            atomic_write(self.path / MARKER, "a tbhvae training run: train.py --fresh deletes only the files "
                                              "tbhvae wrote here\n")
        atomic_write(self.config_path, config.to_json())
        atomic_write(self.data_path, json.dumps({"input_dim": input_dim, "dataset_size": dataset_size,
                                                 "extractor": extractor}))

    def cannot_write(self, err: OSError) -> ConfigError:
        return ConfigError(f"--model_dir {self.path}: cannot write there ({err.strerror or err}); "
                           f"choose a writable directory")

    @contextlib.contextmanager
    def lock(self):
        """Holds an exclusive flock on LOCK_FILE (creating the directory) for the block.

        The kernel drops the lock when the process ends, however it ends; the file
        names the holder (pid, host) and is removed on a normal release. Raises
        RunDirError naming the holder when another process has it.
        """
        path = self.path / LOCK_FILE
        while True:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise self.cannot_write(err) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "holder unknown"
                os.close(fd)
                raise RunDirError(f"--model_dir {self.path} is in use by another trainer ({holder}); wait for it "
                                  f"to finish or use another --model_dir") from None
            try:  # the file we locked may have been removed by its previous holder meanwhile
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            yield
        finally:
            path.unlink(missing_ok=True)  # while still locked, so no other process holds this file
            os.close(fd)

    def is_run(self) -> bool:
        """Holds MARKER, or (runs older than the marker) a tbhvae config.json and data.json."""
        if (self.path / MARKER).is_file():
            return True
        try:
            return self.saved_config() is not None and self.data_path.is_file()
        except (ValueError, TypeError):  # ConfigError, or a config.json that is not a JSON object of keys
            return False

    def own_entries(self) -> list[Path]:
        """The files and partial-save directories tbhvae writes here, plus any symbolic link
        where tbhvae keeps a directory (never looked into)."""
        found = [p for name in _RUN_FILES for p in (self.path / name, self.path / f"{name}.tmp")
                 if os.path.lexists(p)]
        for chain, pattern in (((self.checkpoints,), _CHECKPOINT_ENTRY),
                               ((self.logs, self.logs / "train"), _EVENTS_FILE),
                               ((self.logs, self.logs / "projector"), _PROJECTOR_FILE)):
            link = next((d for d in chain if d.is_symlink()), None)
            if link is not None:
                found.append(link)
            elif chain[-1].is_dir():
                found += sorted(p for p in chain[-1].iterdir() if pattern.fullmatch(p.name))
        return found

    def clear(self) -> None:
        """--fresh: deletes own_entries() and the directories they leave empty, nothing else.

        Raises RunDirError, deleting nothing, when the directory holds files but is
        not a tbhvae run, or when one of its entries is a symbolic link.
        """
        if not self.path.is_dir():
            return
        if not self.is_run() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            raise RunDirError(f"--fresh: {self.path} is not a tbhvae run directory (no {MARKER}, nor a tbhvae "
                              f"config.json with data.json); nothing deleted: use another --model_dir")
        entries = self.own_entries()
        link = next((p for p in entries if p.is_symlink()), None)
        if link is not None:
            raise RunDirError(f"--fresh: {link} is a symbolic link and --fresh never deletes through links; "
                              f"nothing deleted: remove the link yourself or use another --model_dir")
        for entry in entries:
            _remove(entry)
        for directory in (self.logs / "train", self.logs / "projector", self.logs, self.checkpoints):
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()

    def remove_partial_saves(self) -> None:
        """Deletes what interrupted checkpoint saves left (ckpt-N_temp*, checkpoint.tmp*)."""
        if self.checkpoints.is_dir() and not self.checkpoints.is_symlink():
            for entry in self.checkpoints.iterdir():
                if _PARTIAL_SAVE.fullmatch(entry.name):
                    _remove(entry)

    def _checkpoint_state(self):
        try:
            return tf.train.get_checkpoint_state(str(self.checkpoints))
        except (UnicodeDecodeError, ValueError):  # random bytes; no model_checkpoint_path
            return None

    def intact_checkpoints(self) -> list[str]:
        """Prefixes of the checkpoints here whose index reads and whose data shards all exist, oldest first."""
        state = self._checkpoint_state()
        listed = list(state.all_model_checkpoint_paths) if state else []
        scanned = [str(p)[:-len(".index")] for p in self.checkpoints.glob("ckpt-*.index")]
        prefixes = {os.path.join(str(self.checkpoints), os.path.basename(p)) for p in listed + scanned}
        return sorted((p for p in prefixes if _intact(p)), key=_checkpoint_number)

    def resume_checkpoint(self) -> str | None:
        """The checkpoint to resume from: the latest the index names, else (its files missing
        or damaged) the newest intact one. None when no checkpoint was ever completed.

        Raises RunDirError when the index exists but no intact checkpoint is left, so a
        run never silently restarts from step 0 over its checkpoints.
        """
        state = self._checkpoint_state()
        if state is not None and _intact(state.model_checkpoint_path):
            return state.model_checkpoint_path
        intact = self.intact_checkpoints()
        index = self.checkpoints / "checkpoint"
        if intact:
            problem = (f"names {os.path.basename(state.model_checkpoint_path)}, which is missing or incomplete"
                       if state else "is unreadable" if os.path.lexists(index) else "is missing")
            print(f"warning: {index} {problem}; resuming from the newest intact checkpoint {intact[-1]}",
                  file=sys.stderr)
            return intact[-1]
        if os.path.lexists(index):
            raise RunDirError(f"{index} exists but no intact checkpoint is left in {self.checkpoints}; "
                              f"pass --fresh to start over or use another --model_dir")
        return None

    def name_latest(self, prefix: str) -> None:
        """Rewrites the checkpoint index to name `prefix` as the latest (after a fallback)."""
        state = self._checkpoint_state()
        if state is not None and state.model_checkpoint_path == prefix:
            return
        names = [os.path.basename(p) for p in self.intact_checkpoints()]
        atomic_write(self.checkpoints / "checkpoint",
                      "".join([f'model_checkpoint_path: "{os.path.basename(prefix)}"\n',
                               *(f'all_model_checkpoint_paths: "{name}"\n' for name in names)]))


def finished_steps(model_dir: str | os.PathLike, config: Config) -> int | None:
    """The step count of a finished run of `config` in `model_dir` (metrics.json written at config.steps), else None."""
    run = RunDirectory(model_dir)
    try:
        if run.saved_config() != config or not run.metrics_path.is_file():
            return None
        steps = json.loads(run.metrics_path.read_text()).get("steps")
    except (ValueError, TypeError, OSError):  # anything unreadable: let train() report it
        return None
    return steps if steps == config.steps else None


def _checkpoint_number(prefix: str) -> int:
    return int(prefix.rsplit("-", 1)[1]) if re.fullmatch(r"ckpt-\d+", os.path.basename(prefix)) else -1


def _intact(prefix: str) -> bool:
    """The checkpoint's index reads and every data shard it names exists (sizes are not checked)."""
    shards = glob.glob(glob.escape(prefix) + ".data-?????-of-?????")
    if not shards or len(shards) != int(shards[0].rsplit("-of-", 1)[1]):
        return False
    try:
        tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError):
        return False
    return True


def _remove(path: Path) -> None:
    """Deletes a file, a link (not its target) or a directory tree (links inside are not followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)

