"""Image search service: upload a JPEG, get the most similar indexed images (HTTP API and web page).

    tbhvae-serve --encoder exported/tbhvae --index train.index.npz \
        --images ../shared/data/cifar10_jpeg.npz --port 8000     # or python -m tbhvae.serve

Then open http://127.0.0.1:8000/. The API (POST /search, /search_test, GET /healthz,
/test_images, /thumbnail) is described in `tbhvae.serve`.
"""
import logging
import socket

from absl import flags

from tbhvae.cli import expect_no_arguments, fail, run_main, start_tensorflow

FLAGS = flags.FLAGS


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
    start_tensorflow()
    from tbhvae.export import ExportError
    from tbhvae.retrieval import RetrievalError
    from tbhvae.serve import SearchService, create_app, log

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


if __name__ == "__main__":
    run()
