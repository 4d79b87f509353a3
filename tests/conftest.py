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


# --------------------------------------------------------------------------- JPEG image files
# The JPEG tests run on ../shared/data/cifar10_jpeg.npz and coco_mini.npz where they exist, and
# on small synthetic files of the same layout (made here) where they do not, as in CI.
# TBHVAE_TEST_DATA=synthetic uses the synthetic files even where the real ones exist.
SYNTHETIC_DATA = os.environ.get("TBHVAE_TEST_DATA") == "synthetic"
CIFAR_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                     "truck")


def write_jpeg_npz(path: Path, splits: dict, **extra) -> Path:
    """splits: name -> (list of JPEG bytes, labels); writes the layout of cifar10_jpeg.npz."""
    import numpy as np

    arrays = {}
    for split, (files, labels) in splits.items():
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(files), np.uint8)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
        arrays[f"{split}_labels"] = np.asarray(labels, np.uint8)
    np.savez(path, **arrays, **extra)
    return path


def _encode_jpeg(pixels, quality: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _class_colours(count: int, seed: int):
    """count well-spread RGB colours float [count, 3] in 40..215."""
    import numpy as np

    hues = (np.arange(count) * 0.618034) % 1.0
    value = 0.55 + 0.3 * (np.arange(count) % 3) / 2
    rng = np.random.default_rng(seed)
    rgb = np.stack([np.cos(2 * np.pi * (hues - shift)) for shift in (0, 1 / 3, 2 / 3)], axis=1)
    return 128 + 87 * value[:, None] * rgb + rng.uniform(-5, 5, (count, 3))


def synthetic_cifar_jpeg(path: Path, train_per_class: int = 20, test_per_class: int = 10,
                         seed: int = 0) -> Path:
    """A CIFAR-10-like JPEG .npz: 32x32 images (quality 75), 10 classes grouped by class.

    Each class has its own colour and stripe direction and frequency, plus per-image noise
    and phase, so that images of a class look alike and retrieval by image is meaningful.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    colours = _class_colours(10, seed)
    rows, cols = np.mgrid[0:32, 0:32]
    splits = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(10), per_class)
        files = []
        for label in labels:
            angle = np.pi * label / 10
            stripes = np.sin((np.cos(angle) * rows + np.sin(angle) * cols) * (0.4 + 0.05 * label)
                             + rng.uniform(0, 2 * np.pi))
            pixels = colours[label] + 45 * stripes[..., None] + rng.normal(0, 12, (32, 32, 3))
            files.append(_encode_jpeg(np.clip(pixels, 0, 255).astype(np.uint8), 75))
        splits[split] = (files, labels)
    return write_jpeg_npz(path, splits, class_names=np.array(CIFAR_CLASS_NAMES))


def synthetic_coco_jpeg(path: Path, per_split: int = 64, seed: int = 0) -> Path:
    """A coco_mini.npz-like JPEG .npz: 80 classes, multi-hot uint8 labels (1-5 per image),
    images of varying size (longest side 48..160 px, quality 85), one coloured block per label."""
    import numpy as np

    rng = np.random.default_rng(seed)
    colours = _class_colours(80, seed + 1)
    splits = {}
    coco_ids = np.sort(rng.choice(10 ** 6, 2 * per_split, replace=False))
    ids = {"train_coco_ids": coco_ids[::2], "test_coco_ids": coco_ids[1::2]}
    for split in ("train", "test"):
        files, labels = [], np.zeros((per_split, 80), np.uint8)
        for row in range(per_split):
            longest = int(rng.integers(48, 161))
            other = int(rng.integers(24, longest + 1))
            height, width = (longest, other) if rng.random() < 0.5 else (other, longest)
            pixels = rng.normal(110, 25, (height, width, 3))
            for label in rng.choice(80, size=int(rng.integers(1, 6)), replace=False):
                labels[row, label] = 1
                top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
                pixels[top:top + height // 2, left:left + width // 2] = colours[label] + rng.normal(
                    0, 8, (height // 2, width // 2, 3))
            files.append(_encode_jpeg(np.clip(pixels, 0, 255).astype(np.uint8), 85))
        splits[split] = (files, labels)
    return write_jpeg_npz(path, splits, class_names=np.array([f"object_{i:02d}" for i in range(80)]), **ids)


def _real_or_synthetic(name: str, make, tmp_path_factory) -> Path:
    path = SHARED_DATA / name
    if path.is_file() and not SYNTHETIC_DATA:
        return path
    return make(tmp_path_factory.mktemp("synthetic_jpeg") / name)


@pytest.fixture(scope="session")
def cifar_jpeg(tmp_path_factory) -> Path:
    """../shared/data/cifar10_jpeg.npz, or a 300-image synthetic file of its layout where absent."""
    return _real_or_synthetic("cifar10_jpeg.npz", synthetic_cifar_jpeg, tmp_path_factory)


@pytest.fixture(scope="session")
def coco_jpeg(tmp_path_factory) -> Path:
    """../shared/data/coco_mini.npz, or a 128-image synthetic file of its layout where absent."""
    return _real_or_synthetic("coco_mini.npz", synthetic_coco_jpeg, tmp_path_factory)


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
