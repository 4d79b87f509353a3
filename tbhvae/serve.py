"""Image search service: an HTTP API and a web page over a Hamming index and an exported encoder.

    python -m tbhvae.serve --encoder exported/tbh --index cifar10_train.index.npz \\
        --images cifar10_jpeg.npz --port 8000

`--encoder` is an exported SavedModel (with image signatures, i.e. exported with a
backbone, for image queries); `--index` a HammingIndex built by it
(`python -m tbhvae.retrieval build`, refused when another encoder built it);
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
from importlib import resources
from pathlib import Path

import numpy as np

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
    """`count` distinct rows for the page's picker: `protocol.stratified_sample`, ordered one
    class after another in turn (so the first rows show every class); random without labels."""
    from tbhvae import protocol

    count = min(count, total)
    if labels is None:
        return np.random.default_rng(seed).permutation(total)[:count].tolist()
    rows = protocol.stratified_sample(labels, count, seed)
    classes = labels[rows] if labels.ndim == 1 else np.argmax(labels[rows], axis=1)
    order = np.argsort(classes, kind="stable")
    rank = np.empty(len(rows), np.int64)  # each row's place within its class
    rank[order] = np.arange(len(rows)) - np.searchsorted(classes[order], classes[order])
    return rows[np.lexsort((classes, rank))].tolist()


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
        return HTMLResponse(page_html().replace("/*CONFIG*/null", config))

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


def page_html() -> str:
    """The search page (search_page.html, self-contained); the app fills in its CONFIG."""
    return resources.files("tbhvae").joinpath("search_page.html").read_text(encoding="utf-8")


if __name__ == "__main__":  # python -m tbhvae.serve: the same command as tbhvae-serve
    from tbhvae.cli.serve import run

    run()
