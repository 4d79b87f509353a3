"""Image search service: an HTTP API and a web page over a Hamming index and an exported encoder.

    python -m tbhvae.serve --encoder exported/tbh --index cifar10_train.index.npz \\
        --images cifar10_jpeg.npz --port 8000

`--encoder` is an exported SavedModel (with image signatures, i.e. exported with a
backbone, for image queries); `--index` a HammingIndex built by it
(`python -m tbhvae.cli.retrieval build`, refused when another encoder built it);
`--images` the JPEG .npz whose train rows are the index ids (thumbnails, test-image
queries). Then open http://127.0.0.1:8000/ in a browser. The API:

  GET  /healthz                  {"status": "ok"} once the encoder and index are loaded
  POST /search?k=K               multipart file field `image` (JPEG/PNG), or JSON {"features": [floats]}
  POST /search_test?row=R&k=K    query with test image R of --images; reports precision@k
  GET  /test_images?count=N      N test rows, class-stratified: {"images": [{"row", "label"}], "class_names"}
  GET  /thumbnail/{split}/{row}  the JPEG of an image of --images (split train or test)
  GET  /                         the search page (self-contained HTML)

A search answers {"results": [{"id", "distance", "label"}, ...], "bits": the query's
0/1 code}, results by ascending Hamming distance, ties by index position (= by id for
an index of `retrieval build`), exactly `HammingIndex.search`; a test-image query also
has "query" ({"split", "row", "label"}) and, when labels are known, "precision"
(precision@k, relevance as in `tbhvae.protocol.relevant`). A label is a class id, a
list of class ids (multi-hot labels) or null. A bad request gets a 4xx answer
{"error": "<one line>"} and one log line; the service goes on.
"""
import io
import json
import logging
import socket
from pathlib import Path

import numpy as np
from absl import flags

from tbhvae.cli import expect_no_arguments, fail, run_main

FLAGS = flags.FLAGS
MAX_UPLOAD_BYTES = 10 * 2**20  # a larger request body is refused with 413 before it is read whole
MAX_PIXELS = 40_000_000  # uploads beyond this are refused (a small file can decode to gigabytes)
MAX_TEST_IMAGES = 200  # most rows /test_images lists at once
DEFAULT_K = 10
DEFAULT_TEST_IMAGES = 24
SPLITS = ("train", "test")
log = logging.getLogger("tbhvae.serve")


class RequestError(Exception):
    """A bad request: HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())


# ------------------------------------------------------------------ images
class ImageStore:
    """The encoded images and labels of a JPEG .npz (layout of cifar10_jpeg.npz), held in memory."""

    def __init__(self, path: str | Path):
        from tbhvae.retrieval import RetrievalError

        self.path = Path(path)
        if not self.path.is_file():
            raise RetrievalError(f"--images {self.path}: JPEG .npz not found; pass e.g. "
                                 f"../shared/data/cifar10_jpeg.npz")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                missing = [f"{s}_{k}" for s in SPLITS for k in ("bytes", "offsets") if f"{s}_{k}" not in data.files]
                if missing:
                    raise RetrievalError(f"--images {self.path}: missing {', '.join(missing)}; expected the "
                                         f"layout of cifar10_jpeg.npz")
                self._bytes = {s: data[f"{s}_bytes"] for s in SPLITS}
                self._offsets = {s: data[f"{s}_offsets"].astype(np.int64) for s in SPLITS}
                self.labels = {s: data[f"{s}_labels"] if f"{s}_labels" in data.files else None for s in SPLITS}
                self.class_names = [str(c) for c in data["class_names"]] if "class_names" in data.files else None
        except (OSError, ValueError, EOFError) as err:  # not an .npz, corrupt archive
            raise RetrievalError(f"--images {self.path}: unreadable ({err})") from None

    def count(self, split: str) -> int:
        return len(self._offsets[split]) - 1

    def image(self, split: str, row: int) -> bytes:
        offsets = self._offsets[split]
        return self._bytes[split][offsets[row]:offsets[row + 1]].tobytes()


def label_json(label) -> int | list[int] | None:
    """A label for JSON: class id [] -> int, multi-hot [C] -> list of class ids, None -> None."""
    if label is None:
        return None
    label = np.asarray(label)
    return int(label) if label.ndim == 0 else np.flatnonzero(label).tolist()


def stratified_rows(labels: np.ndarray | None, count: int, total: int, seed: int = 0) -> list[int]:
    """`count` distinct rows: each class in turn (class ids), else a random sample (multi-hot or no labels)."""
    rng = np.random.default_rng(seed)
    count = min(count, total)
    if labels is None or labels.ndim != 1:
        return rng.permutation(total)[:count].tolist()
    queues = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    picks: list[int] = []
    while len(picks) < count:
        for queue in queues:
            if queue and len(picks) < count:
                picks.append(int(queue.pop(0)))
    return picks


def check_image(data: bytes) -> None:
    """RequestError unless `data` is a JPEG or PNG file of at most MAX_PIXELS pixels."""
    from PIL import Image

    if not data:
        raise RequestError(400, "image: the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        raise RequestError(413, f"image: over the {MAX_PIXELS // 10**6}-megapixel limit") from None
    except Exception:  # noqa: BLE001 - PIL raises many kinds for junk
        raise RequestError(400, "image: not a JPEG or PNG file") from None
    if kind not in ("JPEG", "PNG"):
        raise RequestError(400, f"image: a {kind} file; upload a JPEG or PNG")
    if width * height > MAX_PIXELS:
        raise RequestError(413, f"image: {width} x {height} pixels is over the {MAX_PIXELS // 10**6}-megapixel "
                                f"limit; upload a smaller image")


def parse_features(body: bytes, dim: int | None) -> np.ndarray:
    """A JSON body {"features": [dim floats]} -> float32 [1, dim]; RequestError otherwise."""
    if dim is None:
        raise RequestError(400, "features: this encoder takes images, not features; upload an image")
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, 'body: not valid JSON; send {"features": [floats]}') from None
    if not isinstance(request, dict) or set(request) != {"features"}:
        raise RequestError(400, 'body: expected a JSON object with the single key "features"')
    values = request["features"]
    if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise RequestError(400, f"features: expected a list of {dim} numbers")
    if len(values) != dim:
        raise RequestError(400, f"features: expected {dim} numbers (the encoder's input), got {len(values)}")
    try:
        array = np.asarray(values, np.float64)
    except OverflowError:  # an integer beyond float64
        raise RequestError(400, "features: values beyond the float32 range") from None
    if not np.isfinite(array).all():
        raise RequestError(400, "features: values must be finite numbers (no NaN or infinity)")
    if np.abs(array).max(initial=0) > np.finfo(np.float32).max:
        raise RequestError(400, "features: values beyond the float32 range")
    return array.astype(np.float32)[None]


def parse_int(name: str, raw: str | None, low: int, high: int, default: int | None = None,
              missing_status: int = 400, range_status: int = 400) -> int:
    """An integer parameter in low..high; RequestError naming it otherwise."""
    if raw is None:
        if default is None:
            raise RequestError(missing_status, f"{name}: missing; pass ?{name}=N")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RequestError(400, f"{name}: expected an integer in {low}..{high}, got {raw!r}") from None
    if not low <= value <= high:
        raise RequestError(range_status, f"{name}: expected an integer in {low}..{high}, got {value}")
    return value


# ------------------------------------------------------------------ the service
class SearchService:
    """The encoder, the index and (optionally) the images behind the HTTP API; no HTTP here."""

    def __init__(self, encoder, index, images: ImageStore | None = None, max_k: int = 100,
                 description: str = ""):
        from tbhvae.encoders import SavedModelEncoder

        self.encoder, self.index, self.images, self.max_k = encoder, index, images, int(max_k)
        self.description = description or getattr(encoder, "description", "")
        self.image_queries = isinstance(encoder, SavedModelEncoder) and "encode_jpeg" in encoder.loaded.signatures
        ids = np.asarray(index.ids)
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]

    @classmethod
    def open(cls, encoder_path: str, index_path: str, images_path: str | None = None,
             max_k: int = 100) -> "SearchService":
        """Loads and checks everything; RetrievalError or ExportError (one line) when unusable."""
        from tbhvae import retrieval
        from tbhvae.index import HammingIndex

        if max_k < 1:
            raise retrieval.RetrievalError(f"--max_k {max_k}: must be at least 1")
        try:
            index = HammingIndex.load(index_path)
        except (OSError, ValueError) as err:
            raise retrieval.RetrievalError(f"--index: {err}") from None
        images = ImageStore(images_path) if images_path else None
        encoder = retrieval._encoder(str(encoder_path))
        retrieval.check_same_encoder(index, str(encoder_path), index_path)
        if encoder.bits != index.bits:
            raise retrieval.RetrievalError(f"{index_path} holds {index.bits}-bit codes but {encoder_path} makes "
                                           f"{encoder.bits}-bit codes; build the index with this encoder")
        if images is not None and len(index) and (
                index.ids.min() < 0 or index.ids.max() >= images.count("train")):
            raise retrieval.RetrievalError(f"--images {images_path}: its {images.count('train')} train images do "
                                           f"not cover the ids of {index_path} (0..{index.ids.max()}); pass the "
                                           f"image file the index was built from")
        service = cls(encoder, index, images, max_k, description=str(encoder_path))
        if images is not None and not service.image_queries:
            log.warning("%s has no image signatures: test-image and upload queries will be refused", encoder_path)
        return service

    # -------------------------------------------------------------- queries
    def page_config(self) -> dict:
        return {"bits": self.index.bits, "size": len(self.index), "max_k": self.max_k,
                "default_k": min(DEFAULT_K, self.max_k), "images": self.images is not None,
                "image_queries": self.image_queries, "feature_dim": self.encoder.input_dim,
                "labels": self.index.labels is not None,
                "class_names": self.images.class_names if self.images is not None else None,
                "encoder": self.description, "max_upload_mib": MAX_UPLOAD_BYTES // 2**20}

    def parse_k(self, raw: str | None) -> int:
        return parse_int("k", raw, 1, self.max_k, default=min(DEFAULT_K, self.max_k))

    def answer(self, code: np.ndarray, k: int, query_label=None) -> dict:
        """The top-k of one 0/1 code [M] (precision@k when `query_label` and the index labels are known)."""
        distances, ids = self.index.search(code[None], k)
        labels = self.index.labels
        result_labels = None
        if labels is not None:
            result_labels = labels[self._order[np.searchsorted(self._sorted_ids, ids[0])]]
        results = [{"id": int(i), "distance": int(d),
                    "label": None if result_labels is None else label_json(result_labels[j])}
                   for j, (i, d) in enumerate(zip(ids[0], distances[0]))]
        answer = {"results": results, "bits": code.astype(int).tolist()}
        if query_label is not None and result_labels is not None and len(results):
            from tbhvae import protocol
            hits = protocol.relevant(np.asarray(query_label)[None], result_labels[None])
            answer["precision"] = float(hits.mean())
        return answer

    def _encode_images(self, files: list[bytes]) -> np.ndarray:
        import tensorflow as tf

        if not self.image_queries:
            raise RequestError(400, 'image: this encoder has no image signatures (exported without a backbone); '
                                    'send {"features": [floats]} instead')
        try:
            return self.encoder.encode_jpeg(files)["bits"]
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as err:
            reason = " ".join(str(getattr(err, "message", err)).split())[:160]
            raise RequestError(400, f"image: cannot be decoded ({reason})") from None

    def search_image(self, data: bytes, k: int) -> dict:
        check_image(data)
        return self.answer(self._encode_images([data])[0], k)

    def search_features(self, body: bytes, k: int) -> dict:
        features = parse_features(body, self.encoder.input_dim)
        return self.answer(self.encoder.encode(features)["bits"][0], k)

    def _require_images(self, what: str) -> ImageStore:
        if self.images is None:
            raise RequestError(404, f"{what}: the service was started without --images")
        return self.images

    def _row(self, split: str, raw: str | None) -> int:
        images = self._require_images(split)
        return parse_int("row", raw, 0, images.count(split) - 1, range_status=404)

    def search_test(self, raw_row: str | None, k: int) -> dict:
        row = self._row("test", raw_row)
        labels = self.images.labels["test"]
        label = None if labels is None else labels[row]
        answer = self.answer(self._encode_images([self.images.image("test", row)])[0], k, label)
        answer["query"] = {"split": "test", "row": row, "label": label_json(label)}
        return answer

    def thumbnail(self, split: str, raw_row: str) -> bytes:
        self._require_images("thumbnail")
        if split not in SPLITS:
            raise RequestError(404, f"split: unknown split {split!r}; use train or test")
        return self.images.image(split, self._row(split, raw_row))

    def test_images(self, raw_count: str | None) -> dict:
        images = self._require_images("test_images")
        count = parse_int("count", raw_count, 1, MAX_TEST_IMAGES, default=DEFAULT_TEST_IMAGES)
        labels = images.labels["test"]
        rows = stratified_rows(labels, count, images.count("test"))
        return {"images": [{"row": r, "label": None if labels is None else label_json(labels[r])} for r in rows],
                "class_names": images.class_names}


# ------------------------------------------------------------------ HTTP
def _media_type(data: bytes) -> str:
    return "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"


def create_app(service: SearchService, max_upload_bytes: int = MAX_UPLOAD_BYTES):
    """The FastAPI application of `service` (see the module docstring for the API)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    def error(method: str, path: str, status: int, message: str) -> JSONResponse:
        message = " ".join(str(message).split())
        log.warning("%s %s -> %d: %s", method, path, status, message)
        return JSONResponse({"error": message}, status_code=status)

    class BodyLimit:
        """Reads a request body whole, up to `limit` bytes (413 beyond), then hands it to the app."""

        def __init__(self, app, limit: int):
            self.app, self.limit = app, limit

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
                return await self.app(scope, receive, send)
            too_large = f"request body over the {self.limit // 2**20} MiB limit; upload a smaller image"
            headers = dict(scope["headers"])
            declared = headers.get(b"content-length")
            if declared is not None:
                try:
                    declared_size = int(declared)
                except ValueError:
                    declared_size = -1
                if declared_size < 0:
                    return await error(scope["method"], scope["path"], 400, "bad Content-Length")(
                        scope, receive, send)
                if declared_size > self.limit:
                    return await error(scope["method"], scope["path"], 413, too_large)(scope, receive, send)
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    return await error(scope["method"], scope["path"], 413, too_large)(scope, receive, send)
                chunks.append(chunk)
                more = message.get("more_body", False)
            body, delivered = b"".join(chunks), False

            async def replay():
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)

    app = FastAPI(title="tbhvae image search", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_upload_bytes)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        return error(request.method, request.url.path, err.status, err.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        detail = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 404 and detail == "Not Found":
            detail = f"no such page {request.url.path}; see / for the search page"
        return error(request.method, request.url.path, err.status_code, detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return error(request.method, request.url.path, 400, "; ".join(str(e.get("msg", e)) for e in err.errors()))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error(request.method, request.url.path, 500, f"internal error ({type(err).__name__})")

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    def page():
        config = json.dumps(service.page_config()).replace("</", "<\\/")
        return HTMLResponse(PAGE.replace("/*CONFIG*/null", config))

    @app.post("/search")
    async def search(request: Request):
        k = service.parse_k(request.query_params.get("k"))
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=10)
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise RequestError(400, "multipart upload: needs a file field 'image' (JPEG or PNG)")
            data = await upload.read()
            await form.close()
            return await run_in_threadpool(service.search_image, data, k)
        if kind == "application/json":
            return await run_in_threadpool(service.search_features, await request.body(), k)
        raise RequestError(415, f"content type {kind or 'missing'}: send multipart/form-data with a file field "
                                f"'image' or application/json {{\"features\": [floats]}}")

    @app.post("/search_test")
    async def search_test(request: Request):
        k = service.parse_k(request.query_params.get("k"))
        return await run_in_threadpool(service.search_test, request.query_params.get("row"), k)

    @app.get("/test_images")
    def test_images(request: Request):
        return service.test_images(request.query_params.get("count"))

    @app.get("/thumbnail/{split}/{row}")
    def thumbnail(split: str, row: str):
        data = service.thumbnail(split, row)
        return Response(data, media_type=_media_type(data), headers={"Cache-Control": "max-age=3600"})

    return app


# ------------------------------------------------------------------ command line
def define_flags() -> None:
    """Defines the flags (called by `run`, so that importing this module defines none)."""
    flags.DEFINE_string("encoder", None, "Exported SavedModel directory (with image signatures for image "
                        "queries) that built the index.", required=True)
    flags.DEFINE_string("index", None, "HammingIndex file (.npz) of `python -m tbhvae.cli.retrieval build`.",
                        required=True)
    flags.DEFINE_string("images", None, "JPEG .npz whose train rows are the index ids (cifar10_jpeg.npz): "
                        "thumbnails and test-image queries.")
    flags.DEFINE_integer("port", 8000, "TCP port to listen on.", lower_bound=1, upper_bound=65535)
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    flags.DEFINE_integer("max_k", 100, "Largest k a request may ask for.", lower_bound=1)


def _check_port(host: str, port: int) -> None:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:
        fail(f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); choose another --port")


def main(argv) -> None:
    expect_no_arguments(argv)
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn
    except ImportError as err:
        fail(f"the search service needs fastapi, uvicorn and python-multipart ({err}); "
             f"pip install 'tbhvae[serve]'")
    _check_port(FLAGS.host, FLAGS.port)  # before loading the model, which takes a while
    from tbhvae.export import ExportError
    from tbhvae.retrieval import RetrievalError

    logging.getLogger("tbhvae.serve").setLevel(logging.INFO)
    try:
        service = SearchService.open(FLAGS.encoder, FLAGS.index, FLAGS.images, FLAGS.max_k)
    except (RetrievalError, ExportError) as err:
        fail(str(err))
    log.info("serving %d codes of %d bits from %s on http://%s:%d/", len(service.index), service.index.bits,
             FLAGS.index, FLAGS.host, FLAGS.port)
    uvicorn.run(create_app(service), host=FLAGS.host, port=FLAGS.port, log_level="info")


def run() -> None:
    """Console entry point `tbhvae-serve`."""
    define_flags()
    run_main(main, __name__)


# ------------------------------------------------------------------ the page
PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>TBH-VAE image search</title>
<style>
:root { --hit: #1f9d55; --miss: #d64545; --neutral: #9aa1ad; --ink: #1d2433; --muted: #6b7280;
        --bg: #f2f4f8; --card: #fff; --accent: #3556d8; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", sans-serif;
       color: var(--ink); background: var(--bg); }
header { background: linear-gradient(135deg, #232c4a, #3556d8); color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 22px; font-weight: 650; letter-spacing: .01em; }
header p { margin: 4px 0 0; opacity: .85; font-size: 13px; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 32px 40px; }
.panel { background: var(--card); border-radius: 10px; box-shadow: 0 1px 3px rgba(20, 30, 60, .1);
         padding: 16px 20px; margin-bottom: 18px; }
.panel h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .08em; color: var(--muted);
            margin: 0 0 12px; font-weight: 650; }
.controls { display: flex; gap: 22px; align-items: center; flex-wrap: wrap; }
.drop { display: flex; align-items: center; gap: 12px; border: 2px dashed #c3c9d8; border-radius: 8px;
        padding: 12px 18px; cursor: pointer; color: var(--muted); transition: background .15s, border-color .15s; }
.drop:hover, .drop.over { border-color: var(--accent); background: #eef2ff; color: var(--ink); }
.drop input { display: none; }
.drop .button { background: var(--accent); color: #fff; border-radius: 6px; padding: 6px 14px; font-weight: 600; }
label.k { color: var(--muted); }
label.k input { width: 64px; margin-left: 6px; padding: 5px 8px; font: inherit; border: 1px solid #c3c9d8;
                border-radius: 6px; }
#picker { display: flex; gap: 8px; overflow-x: auto; padding: 2px 2px 8px; }
#picker button { flex: none; border: 3px solid transparent; padding: 0; border-radius: 7px; background: #e7eaf1;
                 cursor: pointer; transition: transform .1s, border-color .1s; }
#picker button:hover { transform: translateY(-2px); border-color: #9fb0ee; }
#picker button.selected { border-color: var(--accent); }
#picker img { width: 60px; height: 60px; display: block; border-radius: 4px; image-rendering: pixelated; }
.hint { color: var(--muted); font-size: 13px; margin: 8px 0 0; }
#status { min-height: 1.4em; color: var(--muted); font-size: 14px; }
#status.error { color: var(--miss); font-weight: 600; }
.layout { display: flex; gap: 30px; align-items: flex-start; }
.query { flex: none; width: 190px; text-align: center; }
.query img { width: 168px; height: 168px; object-fit: cover; border: 6px solid #5a6170; border-radius: 6px;
             image-rendering: pixelated; background: #e7eaf1; }
.query .name { font-weight: 600; margin-top: 6px; word-break: break-all; }
.score { margin-top: 14px; padding: 10px; border-radius: 8px; background: #f4f6fb; }
.score .value { font-size: 30px; font-weight: 700; line-height: 1.1; }
.score .what { color: var(--muted); font-size: 12px; }
.code { margin-top: 12px; font: 11px/1.3 ui-monospace, SFMono-Regular, Menlo, monospace; color: var(--muted);
        word-break: break-all; }
.legend { display: flex; gap: 16px; font-size: 13px; color: var(--muted); margin-bottom: 10px; }
.legend span::before { content: ""; display: inline-block; width: 11px; height: 11px; border-radius: 2px;
                       margin-right: 5px; vertical-align: -1px; background: var(--c); }
#grid { flex: 1; display: grid; grid-template-columns: repeat(auto-fill, minmax(118px, 1fr)); gap: 14px; }
.card { text-align: center; font-size: 12px; color: var(--muted); }
.card img, .card .noimg { width: 108px; height: 108px; display: block; margin: 0 auto 5px; border-radius: 5px;
                          border: 6px solid var(--neutral); image-rendering: pixelated; background: #e7eaf1; }
.card .noimg { display: flex; align-items: center; justify-content: center; font-size: 13px; }
.card.hit img, .card.hit .noimg { border-color: var(--hit); }
.card.miss img, .card.miss .noimg { border-color: var(--miss); }
.card .rank { color: var(--ink); font-weight: 650; }
.card .dist { display: inline-block; background: #edf0f7; color: var(--ink); border-radius: 9px;
              padding: 0 7px; font-weight: 600; }
.empty { color: var(--muted); padding: 26px 0; text-align: center; }
</style>
</head>
<body>
<header>
  <h1>TBH-VAE image search</h1>
  <p id="about"></p>
</header>
<main>
  <section class="panel">
    <h2>Query</h2>
    <div class="controls">
      <label class="drop" id="drop" title="or drop an image here">
        <span class="button">Upload an image</span><span>JPEG or PNG, or drop one here</span>
        <input type="file" id="upload" accept="image/jpeg,image/png">
      </label>
      <label class="k">results (k)<input type="number" id="k" min="1"></label>
      <div id="status" role="status"></div>
    </div>
    <div id="picker-box">
      <p class="hint">or pick a test image (its class is known, so results are marked and precision@k shown):</p>
      <div id="picker"></div>
    </div>
  </section>
  <section class="panel" id="results" data-state="idle">
    <h2 id="results-title">Results</h2>
    <div id="results-body"><div class="empty">Upload an image or pick a test image to search.</div></div>
  </section>
</main>
<script>
"use strict";
const CONFIG = /*CONFIG*/null;
const $ = (id) => document.getElementById(id);
let searches = 0;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}
function labelText(label) {
  if (label === null || label === undefined) return "";
  const names = CONFIG.class_names;
  const one = (c) => (names && names[c] !== undefined ? names[c] : "class " + c);
  return Array.isArray(label) ? (label.length ? label.map(one).join(", ") : "no label") : one(label);
}
function shares(query, result) {
  if (query === null || query === undefined || result === null || result === undefined) return null;
  if (Array.isArray(query)) return query.some((c) => result.includes(c));
  return query === result;
}
function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}
function currentK() {
  const k = parseInt($("k").value, 10);
  return Number.isFinite(k) ? k : CONFIG.default_k;
}
async function call(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) throw new Error((body && body.error) || response.status + " " + response.statusText);
  return body;
}
function thumbnail(split, row) { return "/thumbnail/" + split + "/" + row; }

function render(answer, query) {
  const results = answer.results;
  const known = query.label !== null && query.label !== undefined && CONFIG.labels;
  const body = $("results-body");
  body.replaceChildren();
  const side = el("div", {class: "query"},
    el("img", {src: query.src, alt: "query", id: "query-image"}),
    el("div", {class: "name"}, query.name),
    el("div", {}, known ? labelText(query.label) : "label unknown"));
  if (answer.precision !== undefined) {
    const hits = results.filter((r) => shares(query.label, r.label)).length;
    side.append(el("div", {class: "score"},
      el("div", {class: "value", id: "precision"}, answer.precision.toFixed(2)),
      el("div", {class: "what"},
         "precision@" + results.length + " (" + hits + " of " + results.length + " relevant)")));
  }
  side.append(el("div", {class: "code", title: "the query's binary code"}, answer.bits.join("")));
  const grid = el("div", {id: "grid"});
  results.forEach((result, rank) => {
    const same = known ? shares(query.label, result.label) : null;
    const card = el("div", {class: "card" + (same === true ? " hit" : same === false ? " miss" : ""),
                            "data-id": result.id, "data-distance": result.distance});
    card.append(CONFIG.images
      ? el("img", {src: thumbnail("train", result.id), alt: "result " + (rank + 1), loading: "lazy"})
      : el("div", {class: "noimg"}, "id " + result.id));
    card.append(el("div", {}, el("span", {class: "rank"}, "#" + (rank + 1)), " ",
                   el("span", {class: "dist", title: "Hamming distance"}, "d = " + result.distance)));
    card.append(el("div", {}, "id " + result.id + (result.label !== null ? " · " + labelText(result.label) : "")));
    grid.append(card);
  });
  const right = el("div", {style: "flex: 1"});
  if (known) {
    right.append(el("div", {class: "legend"},
      el("span", {style: "--c: var(--hit)"}, "shares the query's label"),
      el("span", {style: "--c: var(--miss)"}, "does not")));
  }
  right.append(grid);
  body.append(el("div", {class: "layout"}, side, right));
  $("results-title").textContent = "Top " + results.length + " of " + CONFIG.size.toLocaleString()
    + " by Hamming distance";
  $("results").dataset.state = "done";
  $("results").dataset.search = String(++searches);
  setStatus("");
}

async function run(request, query) {
  $("results").dataset.state = "searching";
  setStatus("searching…");
  try {
    render(await request(), query);
  } catch (err) {
    $("results").dataset.state = "error";
    setStatus(err.message, true);
  }
}
function searchFile(file) {
  if (!file) return;
  if (file.size > CONFIG.max_upload_mib * 1048576) {
    setStatus("that file is over the " + CONFIG.max_upload_mib + " MiB limit", true);
    return;
  }
  document.querySelectorAll("#picker button").forEach((b) => b.classList.remove("selected"));
  const form = new FormData();
  form.append("image", file);
  run(() => call("/search?k=" + currentK(), {method: "POST", body: form}),
      {src: URL.createObjectURL(file), name: file.name, label: null});
}
function searchTest(row, label, button) {
  document.querySelectorAll("#picker button").forEach((b) => b.classList.toggle("selected", b === button));
  run(() => call("/search_test?row=" + row + "&k=" + currentK(), {method: "POST"}),
      {src: thumbnail("test", row), name: "test image " + row, label: label});
}

async function start() {
  $("about").textContent = CONFIG.size.toLocaleString() + " images indexed by " + CONFIG.bits
    + "-bit codes · encoder " + CONFIG.encoder;
  $("k").max = CONFIG.max_k;
  $("k").value = CONFIG.default_k;
  $("upload").addEventListener("change", (event) => searchFile(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    searchFile(event.dataTransfer.files[0]);
  });
  if (!CONFIG.image_queries) {
    drop.style.display = "none";
    setStatus("this encoder takes features only: POST /search with {\"features\": [...]}");
  }
  if (!CONFIG.images || !CONFIG.image_queries) { $("picker-box").style.display = "none"; return; }
  try {
    const listing = await call("/test_images?count=24");
    for (const item of listing.images) {
      const button = el("button", {type: "button", title: "test " + item.row + " · " + labelText(item.label),
                                   "data-row": item.row},
                        el("img", {src: thumbnail("test", item.row), alt: "test image " + item.row}));
      button.addEventListener("click", () => searchTest(item.row, item.label, button));
      $("picker").append(button);
    }
  } catch (err) {
    setStatus("could not list the test images: " + err.message, true);
  }
}
start();
</script>
</body>
</html>
"""


if __name__ == "__main__":
    run()
