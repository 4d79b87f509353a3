"""Test setup: two logical CPU devices (for MirroredStrategy tests) and data paths."""
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """Path of a file in ../shared/data, skipping the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def cifar_features():
    """A small real slice of the shared CIFAR-10 features: 2,000 train / 300 test (all classes)."""
    import numpy as np

    from tbhvae.data import FeatureSet, load_features

    full = load_features(shared_file("cifar10_effnetlite0.npz"))
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(len(full.train_features), 2000, replace=False))
    test = np.sort(rng.choice(len(full.test_features), 300, replace=False))
    return FeatureSet(full.train_features[train], full.train_labels[train],
                      full.test_features[test], full.test_labels[test], full.class_names)


_MIRRORED = []


def two_cpu_replicas():
    """One MirroredStrategy over the two logical CPUs, shared by every test.

    Several MirroredStrategy objects in one process can issue colliding
    collective instances, so tests reuse this one.
    """
    if not _MIRRORED:
        _MIRRORED.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _MIRRORED[0]


@pytest.fixture
def online(monkeypatch):
    """Pretends the TFDS download host answers (for tests that mock TFDS's download or data)."""
    from tbhvae.data import images
    monkeypatch.setattr(images, "_check_online", lambda what: None)
