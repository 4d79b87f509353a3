"""Retrieval with an exported encoder: index build/query, results, the examples figure."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import REPO_ROOT
from tbhvae import encoders, export, protocol, retrieval, train
from tbhvae.config import Config
from tbhvae.data import FeatureSet, save_features
from tbhvae.index import HammingIndex

CLASS_COLOURS = np.array([[230, 30, 30], [30, 200, 30], [30, 30, 230], [220, 220, 40]], np.uint8)


def jpeg(colour, rng, size=(32, 32)) -> bytes:
    pixels = np.clip(colour + rng.normal(0, 20, (*size, 3)), 0, 255).astype(np.uint8)
    return tf.io.encode_jpeg(pixels).numpy()


def write_jpeg_npz(path, splits: dict) -> None:
    """splits: name -> (list of JPEG bytes, labels); layout of cifar10_jpeg.npz."""
    arrays = {}
    for split, (files, labels) in splits.items():
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(files), np.uint8)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
        arrays[f"{split}_labels"] = np.asarray(labels, np.uint8)
    np.savez(path, **arrays)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny trained run, its SavedModel, features and aligned JPEG images (4 classes)."""
    folder = tmp_path_factory.mktemp("retrieval")
    rng = np.random.default_rng(0)
    centres = rng.gamma(1.0, 1.0, (4, 24))
    labels = {"train": rng.integers(0, 4, 256), "test": rng.integers(0, 4, 40)}
    features = {s: np.maximum(centres[y] + rng.normal(0, 0.4, (len(y), 24)), 0).astype(np.float32)
                for s, y in labels.items()}
    feature_set = FeatureSet(features["train"], labels["train"], features["test"], labels["test"])
    features_path = save_features(folder / "features.npz", feature_set)
    images_path = folder / "images.npz"
    write_jpeg_npz(images_path, {s: ([jpeg(CLASS_COLOURS[c], rng) for c in y], y) for s, y in labels.items()})
    config = Config(name="r", features=str(features_path), bits=16, hidden_dim=32, continuous_dim=16,
                    batch_size=64, steps=30, log_every=10, checkpoint_every=10, eval_every=0, eval_queries=20,
                    jit_compile=False, steps_per_execution=10, learning_rate=1e-3, reconstruction="mean")
    train.train(config, folder / "run", strategy=tf.distribute.get_strategy(), feature_set=feature_set)
    run = export.load_run(folder / "run")
    export.export_saved_model(run, folder / "exported", "tbh")
    return dict(folder=folder, run=run, features=str(features_path), images=str(images_path),
                saved_model=str(folder / "exported" / "tbh"), feature_set=feature_set)


def test_figure_geometry_and_frame_colours():
    rng = np.random.default_rng(1)
    correct = np.array([[True, False, True, True], [False, False, True, False], [True, True, True, False]])
    queries = [jpeg(CLASS_COLOURS[0], rng) for _ in range(3)]
    results = [[jpeg(CLASS_COLOURS[1], rng, size=(24, 40)) for _ in range(4)] for _ in range(3)]
    picture = retrieval.retrieval_figure(queries, results, correct, cell=20, border=3)
    # header 16 + 3 rows of (20 + 2 * 3 frame + 2 spacing) + 2; 2 + 26 + 12 gap + 4 * (26 + 2)
    assert picture.shape == (102, 152, 3) == (*retrieval.figure_size(3, 4, 20, 3), 3)
    for r in range(3):
        top = 16 + 2 + r * 28
        assert tuple(picture[top, 2]) == retrieval.FRAME_QUERY
        for j in range(4):
            left = 2 + 26 + 12 + j * 28
            expected = retrieval.FRAME_CORRECT if correct[r, j] else retrieval.FRAME_WRONG
            assert tuple(picture[top + 1, left + 1]) == expected, (r, j)
            centre = picture[top + 13, left + 13].astype(int)
            assert abs(centre - CLASS_COLOURS[1]).max() < 80  # the image itself, not the frame
    with pytest.raises(ValueError, match="3 x 4 results"):
        retrieval.retrieval_figure(queries, results[:2], correct)


def test_relevance_single_and_multi_label():
    np.testing.assert_array_equal(protocol.relevant(np.array([1, 2]), np.array([[1, 0], [2, 2]])),
                                  [[True, False], [True, True]])
    query = np.array([[1, 0, 1]], np.uint8)
    results = np.array([[[0, 1, 0], [0, 0, 1]]], np.uint8)
    np.testing.assert_array_equal(protocol.relevant(query, results), [[False, True]])


def test_build_query_and_figure(data, tmp_path):
    index_path = tmp_path / "index.npz"
    retrieval.build(data["saved_model"], data["features"], None, str(index_path))
    index = HammingIndex.load(index_path)
    reference = encoders.KerasEncoder(data["run"])
    db_codes = reference.encode(data["feature_set"].train_features)["bits"]
    np.testing.assert_array_equal(index.codes, db_codes)
    np.testing.assert_array_equal(index.labels, data["feature_set"].train_labels)

    summary = retrieval.query(data["saved_model"], data["features"], None, str(index_path), k=7, num_queries=12,
                              results_path=str(tmp_path / "results.json"), show=2, compute_map=True)
    results = json.loads((tmp_path / "results.json").read_text())
    query_codes = reference.encode(data["feature_set"].test_features[:12])["bits"]
    distances = (query_codes[:, None, :] != db_codes[None, :, :]).sum(axis=2)
    brute_force = np.argsort(distances, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(results["ids"], brute_force)
    np.testing.assert_array_equal(results["distances"], np.take_along_axis(distances, brute_force, axis=1))
    hits = data["feature_set"].train_labels[brute_force] == data["feature_set"].test_labels[:12, None]
    assert summary["precision@7"] == pytest.approx(hits.mean())
    assert summary["precision@7"] > 0.4 and 0 < summary["map@1000"] <= 1  # 4 classes: chance is 0.25

    figure, logdir = tmp_path / "figure.png", tmp_path / "logs"
    picture = retrieval.draw(data["saved_model"], data["features"], data["images"], str(index_path), str(figure),
                             rows=5, k=6, cell=24, seed=0, logdir=str(logdir))
    with Image.open(figure) as png:
        assert png.size == (picture.shape[1], picture.shape[0])
        assert (png.height, png.width) == retrieval.figure_size(5, 6, 24, 4)
    tags = [value.tag for name in os.listdir(logdir) for event in tf.compat.v1.train.summary_iterator(
        str(logdir / name)) for value in event.summary.value]
    assert "retrieval/examples" in tags


def test_an_index_refuses_an_encoder_other_than_the_one_that_built_it(data, tmp_path):
    index_path = tmp_path / "index.npz"
    retrieval.build(data["saved_model"], data["features"], None, str(index_path))
    probe = HammingIndex.load(index_path).encoder_probe
    assert probe.inputs.shape == (64, 24) and probe.codes.shape == (64, 16)
    # the same model in another format (the training run's Keras model) is accepted
    retrieval.query(str(data["folder"] / "run"), data["features"], None, str(index_path), 5, 4, None, 0, False)
    other_config = data["run"].config.replace(seed=7, steps=10)
    train.train(other_config, tmp_path / "other", strategy=tf.distribute.get_strategy(),
                feature_set=data["feature_set"])
    with pytest.raises(retrieval.RetrievalError, match=r"built by another encoder: on its 64 probe rows .* agrees on "
                                                       r"\d+% of the bits"):
        retrieval.query(str(tmp_path / "other"), data["features"], None, str(index_path), 5, 4, None, 0, False)
    with pytest.raises(retrieval.RetrievalError, match="built by another encoder"):
        retrieval.draw(str(tmp_path / "other"), data["features"], data["images"], str(index_path),
                       str(tmp_path / "f.png"), rows=2, k=3, cell=16, seed=0, logdir=None)


def test_an_index_without_an_encoder_record_is_searched_with_a_warning(data, tmp_path, capsys):
    index_path = tmp_path / "index.npz"
    retrieval.build(data["saved_model"], data["features"], None, str(index_path))
    retrieval.query(data["saved_model"], data["features"], None, str(index_path), 5, 4, None, 0, False)
    assert "warning" not in capsys.readouterr().err  # a recorded and matching encoder: nothing to say
    old = HammingIndex.load(index_path)
    old.encoder_probe = None  # as an index written before indexes recorded their encoder
    old.save(index_path)
    summary = retrieval.query(data["saved_model"], data["features"], None, str(index_path), 5, 4, None, 0, False)
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "cannot be checked" in warning[0] and "rebuild the index" in warning[0]
    assert summary["queries"] == 4


def test_figure_needs_aligned_images(data, tmp_path):
    index_path = tmp_path / "index.npz"
    retrieval.build(data["saved_model"], data["features"], None, str(index_path))
    rng = np.random.default_rng(2)
    short = tmp_path / "short.npz"
    write_jpeg_npz(short, {s: ([jpeg(CLASS_COLOURS[0], rng)] * 5, [0] * 5) for s in ("train", "test")})
    with pytest.raises(retrieval.RetrievalError, match="do not align"):
        retrieval.draw(data["saved_model"], data["features"], str(short), str(index_path),
                       str(tmp_path / "f.png"), rows=2, k=3, cell=16, seed=0, logdir=None)
    with pytest.raises(retrieval.RetrievalError, match="row 9"):
        retrieval.jpeg_rows(short, "train", [0, 9])
    with pytest.raises(retrieval.RetrievalError, match="fewer than the 41 asked for"):
        retrieval.query(data["saved_model"], data["features"], None, str(index_path), 5, 41, None, 0, False)
    with pytest.raises(retrieval.RetrievalError, match="--index"):
        retrieval.query(data["saved_model"], data["features"], None, str(tmp_path / "absent.npz"), 5, 0, None, 0,
                        False)


def test_a_jpeg_file_is_read_once_per_split_until_it_changes(tmp_path, monkeypatch):
    """The figure asks for a split's rows one query at a time: the split's arrays are read once, and again
    only after the file is rewritten."""
    rng = np.random.default_rng(3)
    path = tmp_path / "images.npz"
    write_jpeg_npz(path, {"train": ([jpeg(CLASS_COLOURS[i % 2], rng) for i in range(6)], [0] * 6)})
    opened = []
    real_open = retrieval.open_npz
    monkeypatch.setattr(retrieval, "open_npz", lambda p: opened.append(p) or real_open(p))
    first = [retrieval.jpeg_rows(path, "train", [r]) for r in range(6)]
    assert len(opened) == 1 and [f[0][:2] for f in first] == [b"\xff\xd8"] * 6
    write_jpeg_npz(path, {"train": ([jpeg(CLASS_COLOURS[2], rng)] * 2, [0] * 2)})
    os.utime(path, ns=(1, 1))  # a new mtime, as a rewrite within the clock's resolution might not give
    with pytest.raises(retrieval.RetrievalError, match="'train' has 2 images"):
        retrieval.jpeg_rows(path, "train", [5])
    assert len(opened) == 2


def test_command_line_build_and_query(data, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    index_path, figure = tmp_path / "index.npz", tmp_path / "examples.png"
    common = ["--encoder", str(data["folder"] / "run"), "--features", data["features"], "--index", str(index_path)]
    build = subprocess.run([sys.executable, "-m", "tbhvae.cli.retrieval", "build", *common], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120, env=env)
    assert build.returncode == 0, build.stderr[-2000:]
    assert len(HammingIndex.load(index_path)) == 256
    query = subprocess.run([sys.executable, "-m", "tbhvae.cli.retrieval", "query", *common, "--k", "10",
                            "--images", data["images"], "--figure", str(figure), "--figure_rows", "4"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert query.returncode == 0, query.stderr[-2000:]
    assert "precision@10" in query.stdout and "query 0: ids" in query.stdout
    with Image.open(figure) as png:
        assert (png.height, png.width) == retrieval.figure_size(4, 10, 64, 4)
        assert png.mode == "RGB"


@pytest.mark.parametrize("flag", ["--queries=-3", "--k=0", "--show=-1", "--figure_rows=0"])
def test_command_line_refuses_out_of_range_counts(data, tmp_path, flag):
    result = subprocess.run([sys.executable, "-m", "tbhvae.cli.retrieval", "query",
                             "--encoder", str(data["folder"] / "run"), "--features", data["features"],
                             "--index", str(tmp_path / "index.npz"), flag],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert flag.split("=")[0] in result.stderr and "nan" not in result.stdout
