"""The image search service: its HTTP API against the index's own answers, bad requests, the page in Chromium."""
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import REPO_ROOT, synthetic_cifar_jpeg
from tbhvae import export, retrieval, serve, train
from tbhvae.config import Config
from tbhvae.data import FeatureSet, save_features
from tbhvae.data.images import decode_rgb_arrays
from tbhvae.encoders import SavedModelEncoder
from tbhvae.index import HammingIndex

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny run trained on the features of a (random) MobileNetV2 of synthetic CIFAR-like images,
    exported with that backbone, and the index of its train images."""
    folder = tmp_path_factory.mktemp("serve")
    keras.utils.set_random_seed(0)  # the backbone's random weights
    images = synthetic_cifar_jpeg(folder / "images.npz", train_per_class=12, test_per_class=3)
    backbone = export.load_backbone("mobilenet_v2", "none", 1280, input_size=32)
    files = {split: retrieval.jpeg_rows(images, split, range(retrieval.image_count(images, split)))
             for split in ("train", "test")}
    features = {split: backbone.model(backbone.preprocess(decode_rgb_arrays(f)), training=False).numpy()
                for split, f in files.items()}
    with np.load(images) as data:
        labels = {split: data[f"{split}_labels"] for split in ("train", "test")}
    feature_set = FeatureSet(features["train"], labels["train"], features["test"], labels["test"])
    features_path = save_features(folder / "features.npz", feature_set)
    config = Config(name="serve", features=str(features_path), bits=16, hidden_dim=32, continuous_dim=16,
                    batch_size=60, steps=100, log_every=50, checkpoint_every=50, eval_every=0, eval_queries=20,
                    jit_compile=False, steps_per_execution=20, learning_rate=1e-3,
                    input_scaling="standardize", similarity_weight=16.0)  # random backbone: features ~1e-13
    train.train(config, folder / "run", strategy=tf.distribute.get_strategy(), feature_set=feature_set)
    run = export.load_run(folder / "run")
    encoder = str(export.export_saved_model(run, folder / "exported", "tbh", backbone))
    features_only = str(export.export_saved_model(run, folder / "exported", "features_only"))
    index_path = str(folder / "train.index.npz")
    retrieval.build(encoder, None, str(images), index_path)
    service = serve.SearchService.open(encoder, index_path, str(images), max_k=50)
    return dict(folder=folder, images=str(images), encoder=encoder, features_only=features_only,
                index=index_path, service=service, files=files, features=features, labels=labels,
                client=TestClient(serve.create_app(service)))


def index_answer(served, code, k):
    """(ids, distances) of HammingIndex.search for one 0/1 code."""
    distances, ids = HammingIndex.load(served["index"]).search(code[None], k)
    return ids[0].tolist(), distances[0].tolist()


def jpeg_of_test_row(served, row):
    return served["files"]["test"][row]


# ------------------------------------------------------------------ answers
def test_upload_answers_as_the_index_does(served):
    data = jpeg_of_test_row(served, 7)
    response = served["client"].post("/search?k=9", files={"image": ("query.jpg", data, "image/jpeg")})
    assert response.status_code == 200, response.text
    answer = response.json()
    code = SavedModelEncoder(served["encoder"]).encode_jpeg([data])["bits"][0]
    ids, distances = index_answer(served, code, 9)
    assert [r["id"] for r in answer["results"]] == ids
    assert [r["distance"] for r in answer["results"]] == distances
    assert [r["label"] for r in answer["results"]] == served["labels"]["train"][ids].tolist()
    assert answer["bits"] == code.tolist()
    assert "precision" not in answer  # an upload has no known label


def test_png_upload_is_accepted(served):
    pixels = decode_rgb_arrays([jpeg_of_test_row(served, 3)])[0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    response = served["client"].post("/search?k=4", files={"image": ("q.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 200, response.text
    # the PNG holds the JPEG's decoded pixels, so both give one code
    code = SavedModelEncoder(served["encoder"]).encode_jpeg([jpeg_of_test_row(served, 3)])["bits"][0]
    assert [r["id"] for r in response.json()["results"]] == index_answer(served, code, 4)[0]


def test_feature_query_answers_as_the_index_does(served):
    features = served["features"]["test"][11]
    response = served["client"].post("/search?k=6", json={"features": features.tolist()})
    assert response.status_code == 200, response.text
    code = SavedModelEncoder(served["encoder"]).encode(features[None])["bits"][0]
    assert [r["id"] for r in response.json()["results"]] == index_answer(served, code, 6)[0]


def test_test_image_query_reports_precision(served):
    row = 20
    response = served["client"].post(f"/search_test?row={row}&k=8")
    assert response.status_code == 200, response.text
    answer = response.json()
    label = int(served["labels"]["test"][row])
    assert answer["query"] == {"split": "test", "row": row, "label": label}
    result_labels = np.array([r["label"] for r in answer["results"]])
    assert answer["precision"] == pytest.approx((result_labels == label).mean())
    code = SavedModelEncoder(served["encoder"]).encode_jpeg([jpeg_of_test_row(served, row)])["bits"][0]
    assert [r["id"] for r in answer["results"]] == index_answer(served, code, 8)[0]


def test_retrieval_beats_chance_on_the_test_images(served):
    """The codes carry the classes (10 colours/stripe patterns): precision@5 above twice chance (0.1)."""
    client = served["client"]
    precision = [client.post(f"/search_test?row={row}&k=5").json()["precision"] for row in range(30)]
    assert np.mean(precision) > 0.2


def test_listing_thumbnails_health_and_page(served):
    client = served["client"]
    assert client.get("/healthz").json() == {"status": "ok"}
    listing = client.get("/test_images?count=10").json()
    rows = [item["row"] for item in listing["images"]]
    assert len(set(rows)) == 10
    assert sorted(item["label"] for item in listing["images"]) == list(range(10))  # one per class
    assert listing["class_names"][0] == "airplane"
    thumbnail = client.get(f"/thumbnail/test/{rows[0]}")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert thumbnail.content == jpeg_of_test_row(served, rows[0])
    assert client.get("/thumbnail/train/5").content == served["files"]["train"][5]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    config = json.loads(page.text.split("const CONFIG = ", 1)[1].split(";\n", 1)[0])
    assert config["bits"] == 16 and config["size"] == 120 and config["image_queries"] and config["labels"]
    assert config["max_k"] == 50 and config["default_k"] == 10


# ------------------------------------------------------------------ bad requests
def huge_png() -> bytes:
    """A small file that decodes to 8,000 x 6,000 pixels (over MAX_PIXELS)."""
    buffer = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD = [
    ("post", "/search?k=0", dict(json={"features": [0.0] * 1280}), 400, r"k: expected an integer in 1\.\.50, got 0"),
    ("post", "/search?k=51", dict(json={"features": [0.0] * 1280}), 400, r"in 1\.\.50, got 51"),
    ("post", "/search?k=ten", dict(json={"features": [0.0] * 1280}), 400, "got 'ten'"),
    ("post", "/search", dict(json={"features": [0.0] * 3}), 400, "expected 1280 numbers .* got 3"),
    ("post", "/search", dict(content=b'{"features": [' + b"0, " * 1279 + b"NaN]}",
                             headers={"content-type": "application/json"}), 400, "finite"),
    ("post", "/search", dict(content=b'{"features": [' + b"0, " * 1279 + b"1e400]}",
                             headers={"content-type": "application/json"}), 400, "finite"),
    ("post", "/search", dict(content=b'{"features": [' + b"0, " * 1279 + b"1" + b"0" * 400 + b"]}",
                             headers={"content-type": "application/json"}), 400, "float32 range"),
    ("post", "/search", dict(json={"features": ["a"] * 1280}), 400, "list of 1280 numbers"),
    ("post", "/search", dict(json={"features": [0.0] * 1280, "extra": 1}), 400, 'single key "features"'),
    ("post", "/search", dict(content=b"{not json", headers={"content-type": "application/json"}), 400,
     "not valid JSON"),
    ("post", "/search", dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "multipart"),
    ("post", "/search", dict(files={"image": ("a.jpg", b"not an image", "image/jpeg")}), 400, "not a JPEG or PNG"),
    ("post", "/search", dict(files={"image": ("a.jpg", b"", "image/jpeg")}), 400, "empty"),
    ("post", "/search", dict(files={"photo": ("a.jpg", b"x", "image/jpeg")}), 400, "file field 'image'"),
    ("post", "/search", dict(files={"image": ("a.png", huge_png(), "image/png")}), 413, "megapixel"),
    ("post", "/search_test?row=30", {}, 404, r"row: expected an integer in 0\.\.29, got 30"),
    ("post", "/search_test", {}, 400, "row: missing"),
    ("get", "/thumbnail/valid/0", {}, 404, "unknown split"),
    ("get", "/thumbnail/train/-1", {}, 404, "row"),
    ("get", "/test_images?count=1000", {}, 400, "count"),
    ("get", "/nowhere", {}, 404, "no such page /nowhere"),
    ("get", "/search", {}, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("method, url, kwargs, status, message", BAD, ids=[f"{b[1]}-{b[3]}-{i}" for i, b in
                                                                           enumerate(BAD)])
def test_bad_requests_get_one_line_json_errors(served, method, url, kwargs, status, message):
    response = getattr(served["client"], method)(url, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert "\n" not in error
    assert re.search(message, error), error
    assert served["client"].get("/healthz").status_code == 200  # and the service goes on


def test_request_bodies_over_the_limit_are_refused_before_use(served):
    data = jpeg_of_test_row(served, 0)
    client = TestClient(serve.create_app(served["service"], max_upload_bytes=len(data) + 1000))
    small = client.post("/search?k=3", files={"image": ("a.jpg", data, "image/jpeg")})
    assert small.status_code == 200, small.text
    response = client.post("/search", files={"image": ("a.jpg", data * 3, "image/jpeg")})
    assert response.status_code == 413 and "limit" in response.json()["error"]
    streamed = client.post("/search", content=iter([b"x" * 800] * 10),  # no Content-Length: counted as read
                           headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_a_features_only_encoder_takes_features_and_refuses_images(served, tmp_path):
    index_path = str(tmp_path / "features.index.npz")
    features_path = str(served["folder"] / "features.npz")
    retrieval.build(served["features_only"], features_path, None, index_path)
    service = serve.SearchService.open(served["features_only"], index_path, served["images"])
    client = TestClient(serve.create_app(service))
    assert not service.page_config()["image_queries"]
    response = client.post("/search", files={"image": ("a.jpg", jpeg_of_test_row(served, 0), "image/jpeg")})
    assert response.status_code == 400 and "no image signatures" in response.json()["error"]
    features = served["features"]["test"][4]
    response = client.post("/search?k=5", json={"features": features.tolist()})
    code = SavedModelEncoder(served["features_only"]).encode(features[None])["bits"][0]
    assert [r["id"] for r in response.json()["results"]] == index_answer(served, code, 5)[0]
    without_images = TestClient(serve.create_app(serve.SearchService.open(served["features_only"], index_path)))
    assert without_images.get("/thumbnail/train/0").status_code == 404
    assert "without --images" in without_images.get("/test_images").json()["error"]


def test_opening_refuses_what_does_not_fit(served, tmp_path):
    with pytest.raises(retrieval.RetrievalError, match="--index"):
        serve.SearchService.open(served["encoder"], str(tmp_path / "missing.npz"))
    few = synthetic_cifar_jpeg(tmp_path / "few.npz", train_per_class=2, test_per_class=1)
    with pytest.raises(retrieval.RetrievalError, match="do not cover the ids"):
        serve.SearchService.open(served["encoder"], served["index"], str(few))
    other = HammingIndex(np.zeros((4, 8), np.uint8))
    other.save(tmp_path / "eight.index.npz")
    with pytest.raises(retrieval.RetrievalError, match="8-bit codes but .* makes 16-bit"):
        serve.SearchService.open(served["encoder"], str(tmp_path / "eight.index.npz"))
    np.savez(tmp_path / "notimages.npz", x=np.zeros(3))
    with pytest.raises(retrieval.RetrievalError, match="missing train_bytes"):
        serve.ImageStore(tmp_path / "notimages.npz")
    with pytest.raises(retrieval.RetrievalError, match="--max_k 0"):
        serve.SearchService.open(served["encoder"], served["index"], max_k=0)


def test_an_index_built_from_images_refuses_another_encoder(served, tmp_path, capsys):
    index = HammingIndex.load(served["index"])
    probe = index.encoder_probe  # 64 of the train JPEG files, as bytes, and their codes
    assert probe.kind == "jpeg" and len(probe.inputs) == 64 and probe.codes.shape == (64, 16)
    assert set(probe.inputs) <= set(served["files"]["train"])
    index.save(tmp_path / "saved_again.npz")  # the record survives another save and load
    again = str(tmp_path / "saved_again.npz")
    assert HammingIndex.load(again).encoder_probe.inputs == probe.inputs
    retrieval.query(served["encoder"], None, served["images"], again, 5, 6, None, 0, False)
    serve.SearchService.open(served["encoder"], again, served["images"])
    assert "warning" not in capsys.readouterr().err
    # the same hash head behind another (random) backbone: the same code length, other codes of the images
    keras.utils.set_random_seed(1)
    backbone = export.load_backbone("mobilenet_v2", "none", 1280, input_size=32)
    other = str(export.export_saved_model(export.load_run(served["folder"] / "run"), tmp_path, "other", backbone))
    refused = r"built by another encoder: on its 64 probe images .* agrees on \d+% of the bits"
    with pytest.raises(retrieval.RetrievalError, match=refused):
        retrieval.query(other, None, served["images"], again, 5, 6, None, 0, False)
    with pytest.raises(retrieval.RetrievalError, match=refused):
        serve.SearchService.open(other, served["index"], served["images"])
    # an images_*.tflite takes pixels: the probe files are decoded for it as encode_jpeg decodes them
    (tmp_path / "images_float32.tflite").write_bytes(export.convert_tflite(served["encoder"], "float32",
                                                                          signature="encode_images"))
    retrieval.check_same_encoder(index, str(tmp_path / "images_float32.tflite"), again)
    # an encoder of features only cannot encode the probe images: said in one line, not silently skipped
    serve.SearchService.open(served["features_only"], served["index"])
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "built from images" in warning[0] and "cannot be checked" in warning[0]


def test_stratified_rows_cover_the_classes_in_turn():
    labels = np.repeat(np.arange(3), [5, 1, 4])
    rows = serve.stratified_rows(labels, 6, len(labels))
    assert sorted(labels[rows[:3]].tolist()) == [0, 1, 2] and len(set(rows)) == 6
    assert sorted(labels[rows].tolist()) == [0, 0, 0, 1, 2, 2]  # class 1 has run out
    assert len(serve.stratified_rows(None, 20, 7)) == 7


# ------------------------------------------------------------------ the command line and the page in a browser
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(served, port, *extra):
    return [sys.executable, "-m", "tbhvae.serve", "--encoder", served["encoder"], "--index", served["index"],
            "--images", served["images"], "--port", str(port), *extra]


def test_command_line_errors_are_one_line(served, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    missing = subprocess.run([sys.executable, "-m", "tbhvae.serve", "--encoder", served["encoder"], "--index",
                              str(tmp_path / "none.npz")], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode != 0 and "--index" in missing.stderr and "Traceback" not in missing.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = subprocess.run(serve_command(served, busy.getsockname()[1]), cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
    assert taken.returncode != 0 and "choose another --port" in taken.stderr and "Traceback" not in taken.stderr


def test_python_m_retrieval_builds_the_index_the_service_takes(served, tmp_path):
    """`python -m tbhvae.retrieval build` (the command the README gives before `tbhvae.serve`)."""
    index_path = tmp_path / "cli.index.npz"
    built = subprocess.run([sys.executable, "-m", "tbhvae.retrieval", "build", "--encoder", served["encoder"],
                            "--images", served["images"], "--index", str(index_path)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert built.returncode == 0, built.stderr[-2000:]
    np.testing.assert_array_equal(HammingIndex.load(index_path).codes, HammingIndex.load(served["index"]).codes)


@pytest.fixture(scope="module")
def service_url(served):
    """The service started by its command line on a free port of 127.0.0.1."""
    port = free_port()
    log = open(served["folder"] / "serve.log", "w")
    process = subprocess.Popen(serve_command(served, port), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:
                if json.load(answer) == {"status": "ok"}:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the service did not start:\n" + (served["folder"] / "serve.log").read_text()[-3000:])
        time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture
def browser_page():
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 900})
        finally:
            browser.close()


def shown_results(page):
    cards = page.query_selector_all("#grid .card")
    return ([int(card.get_attribute("data-id")) for card in cards],
            [int(card.get_attribute("data-distance")) for card in cards],
            [card.get_attribute("class") for card in cards])


def test_the_page_in_chromium_shows_the_index_answer(served, service_url, browser_page, tmp_path):
    page = browser_page
    page.goto(service_url + "/")
    page.wait_for_selector("#picker button")
    assert len(page.query_selector_all("#picker button")) == serve.DEFAULT_TEST_IMAGES

    # upload a JPEG, ask for 7 results
    query = tmp_path / "query.jpg"
    query.write_bytes(jpeg_of_test_row(served, 13))
    page.fill("#k", "7")
    page.set_input_files("#upload", str(query))
    page.wait_for_selector('#results[data-state="done"]')
    ids, distances, _ = shown_results(page)
    code = SavedModelEncoder(served["encoder"]).encode_jpeg([query.read_bytes()])["bits"][0]
    assert (ids, distances) == index_answer(served, code, 7)
    assert page.query_selector("#query-image").evaluate("img => img.complete && img.naturalWidth") == 32
    for image in page.query_selector_all("#grid img"):
        image.scroll_into_view_if_needed()
        assert image.evaluate("img => img.decode().then(() => img.naturalWidth)") == 32
    page.screenshot(path=str(tmp_path / "upload.png"), full_page=True)

    # pick a test image: frames green/red by label, precision@k shown
    button = page.query_selector_all("#picker button")[5]
    row = int(button.get_attribute("data-row"))
    button.click()
    page.wait_for_selector('#results[data-search="2"]')
    ids, distances, classes = shown_results(page)
    code = SavedModelEncoder(served["encoder"]).encode_jpeg([jpeg_of_test_row(served, row)])["bits"][0]
    assert (ids, distances) == index_answer(served, code, 7)
    label = served["labels"]["test"][row]
    hits = served["labels"]["train"][ids] == label
    assert classes == ["card hit" if hit else "card miss" for hit in hits]
    assert page.inner_text("#precision") == f"{hits.mean():.2f}"
    page.screenshot(path=str(tmp_path / "test_image.png"), full_page=True)
    screenshots = os.environ.get("TBHVAE_SCREENSHOTS")  # keep the picture of the page where asked
    if screenshots:
        shutil.copy(tmp_path / "test_image.png", screenshots)

    # a bad upload shows the service's error on the page
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    page.set_input_files("#upload", str(junk))
    page.wait_for_selector('#results[data-state="error"]')
    assert "not a JPEG or PNG" in page.inner_text("#status")
