"""What the bench scripts share: default paths, flag parsing, progress lines, JSON output, deep runs."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from tbhvae.checks import atomic_write

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FEATURES = REPO_ROOT.parent / "shared" / "data" / "cifar10_effnetlite0.npz"
DEFAULT_WORKDIR = Path("~/.cache/tbhvae/bench_table")  # deep runs of bench.table; bench.curve uses a sibling
DEEP_CONFIGS = {
    "tbh": "cifar10_tbh.py",
    "tbhvae": "cifar10_tbhvae.py",
    "tbh_betatcvae": "cifar10_tbh_betatcvae.py",
    "tbh_geco": "cifar10_tbh_geco.py",
    "tbh_reference": "cifar10_tbh_reference.py",
    "tbhvae_paper": "cifar10_tbhvae_paper.py",
    # the other deep methods of the paper's table, on the same trainer (tbhvae.hashing_model.FAMILIES)
    "greedyhash": "cifar10_greedyhash.py",
    "sgh": "cifar10_sgh.py",
    "pseudolabel": "cifar10_pseudolabel.py",
    "distillhash": "cifar10_distillhash.py",
}


# Keras dtype policy -> the dtype of its matrix products (the roofline's matmul)
PRECISIONS = {"float32": "float32", "mixed_bfloat16": "bfloat16"}


def random_features(train_rows: int, test_rows: int, dim: int, classes: int = 10, seed: int = 0):
    """A FeatureSet of uniform [0, 1) features and random labels, for speed benchmarks without data."""
    from tbhvae.data import FeatureSet

    rng = np.random.default_rng(seed)
    return FeatureSet(rng.random((train_rows, dim), np.float32), rng.integers(0, classes, train_rows),
                      rng.random((test_rows, dim), np.float32), rng.integers(0, classes, test_rows))


class BenchError(ValueError):
    """Bad flags or inputs; the message names the flag and the fix."""


def int_list(text: str, flag: str, minimum: int) -> list[int]:
    """Comma-separated integers >= `minimum` ("16,32,64" -> [16, 32, 64]), else BenchError naming `flag`."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        raise BenchError(f"{flag}: expected comma-separated integers >= {minimum}, got {text!r}")
    return values


def progress(message: str) -> None:
    """One progress line on stderr (stdout holds the tables)."""
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_keras():
    """Sends Keras progress bars to absl logging (hidden) instead of stdout within the block."""
    import keras

    enabled = keras.config.is_interactive_logging_enabled()
    keras.config.disable_interactive_logging()
    try:
        yield
    finally:
        if enabled:
            keras.config.enable_interactive_logging()


def jsonable(metrics: dict) -> dict:
    """The metrics as they read back from JSON (e.g. precision_at_n keys become strings)."""
    return json.loads(json.dumps(metrics))


def write_json(path: str | os.PathLike, data) -> Path:
    """Writes `data` as indented JSON, atomically, creating the parent directory; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(data, indent=2) + "\n")


def command_line(script: str, argv: list[str] | None) -> str:
    """The command of bench `script` ("table") with its arguments `argv` (else sys.argv[1:])."""
    return " ".join(["python -m", f"bench.{script}", *(argv if argv is not None else sys.argv[1:])])


def machine_description() -> dict:
    """CPU model and count, Python / numpy / TensorFlow versions, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    if "tensorflow" in sys.modules:
        versions["tensorflow"] = sys.modules["tensorflow"].__version__
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "load_average": list(os.getloadavg()), **versions}


def overrides_tag(overrides: list[str]) -> str:
    """Run-directory name suffix: empty without config overrides, else "-" + a short hash of them."""
    return "-" + hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:8] if overrides else ""


def deep_config(method: str, bits: int, seed: int, budget: int, queries: str, features: Path,
                overrides: list[str]):
    """The Config of one deep run: configs/<method>, then `overrides` (key=value), then the bench's keys."""
    from tbhvae.config import apply_overrides, load_config

    config = apply_overrides(load_config(REPO_ROOT / "configs" / DEEP_CONFIGS[method]), overrides)
    return config.replace(bits=bits, steps=budget, seed=seed, eval_every=0, checkpoint_every=budget,
                          features=str(features), final_eval_queries=queries)
