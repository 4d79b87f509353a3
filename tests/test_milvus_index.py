"""The Milvus backend against Milvus Lite and a real Milvus server (the embedded `milvus` package) on this
machine: answers as HammingIndex, reads that see every write, delete, persistence, refused inputs."""
import socket
import subprocess
import time
from typing import NamedTuple

import numpy as np
import pytest

from tbhvae.index import HammingIndex

pymilvus = pytest.importorskip("pymilvus")
from tbhvae.milvus_index import MilvusError, MilvusHammingIndex  # noqa: E402

SERVER_START_SECONDS = 60  # a cold start (unpacking the 250 MB binary) takes ~10 s on 2 busy cores


def codes(n, bits, seed):
    return np.random.default_rng(seed).integers(0, 2, (n, bits), dtype=np.uint8)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedServer:
    """A Milvus 2.3 standalone server (pip package `milvus`) on a loopback port, its data in base_dir.

    With a collection loaded, a 2.3.5 server asked to stop waits `common.gracefulStopTimeout` (30 min)
    for its query node; the package kills it after 1 s, and one killed so never became ready again on
    the same data here. So it quits after 2 s, and the sessions it leaves in its etcd expire after 10 s
    instead of 30: a Strong read after a restart waits for them (its channels' time ticks).
    """

    def __init__(self, milvus, base_dir):
        config = milvus.MilvusServerConfig()
        config.set("common.gracefulStopTimeout", 2)
        config.set("common.session.ttl", 10)
        self._server = milvus.MilvusServer(config, wait_for_started=False)
        self._server.set_base_dir(str(base_dir))
        self._server.listen_port = free_port()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self._server.listen_port}"  # a restart moves on when the port is still taken

    def start(self) -> None:
        """Starts the server, or raises TimeoutError / RuntimeError / OSError within SERVER_START_SECONDS."""
        self._server.start()
        self._server.wait_started(timeout=SERVER_START_SECONDS * 1000)

    def stop(self) -> None:
        if self._server.server_proc is not None:
            self._server.server_proc.terminate()
            try:
                self._server.server_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass  # killed below
        self._server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    milvus = pytest.importorskip("milvus", reason="the Milvus server tests need the embedded server: "
                                                  "pip install 'milvus>=2.3,<2.4'")
    embedded = EmbeddedServer(milvus, tmp_path_factory.mktemp("milvus_server"))
    try:
        try:
            embedded.start()
        except (TimeoutError, RuntimeError, OSError) as err:
            pytest.skip(f"the embedded Milvus server did not start within {SERVER_START_SECONDS} s: {err}")
        yield embedded
    finally:
        embedded.stop()


class Backend(NamedTuple):
    kind: str  # "lite" or "server"
    uri: str
    collection: str  # one per test: the server is shared by the module's tests


@pytest.fixture(params=["lite", "server"])
def backend(request, tmp_path) -> Backend:
    collection = request.function.__name__
    if request.param == "lite":
        pytest.importorskip("milvus_lite")
        return Backend("lite", str(tmp_path / "codes.db"), collection)
    return Backend("server", request.getfixturevalue("server").uri, collection)


def assert_binary_on_server(backend: Backend, index: MilvusHammingIndex) -> None:
    """On a server the codes are BINARY_VECTOR with a HAMMING index; Lite has no binary vectors."""
    if backend.kind == "lite":
        assert index.storage in ("binary", "float")
        return
    assert index.storage == "binary"
    client = pymilvus.MilvusClient(backend.uri)
    fields = {f["name"]: f for f in client.describe_collection(backend.collection)["fields"]}
    assert fields["code"]["type"] == pymilvus.DataType.BINARY_VECTOR
    assert client.describe_index(backend.collection, "code")["metric_type"] == "HAMMING"
    client.close()


def test_search_delete_and_reopen_answer_as_the_exact_index(backend):
    db, queries = codes(600, 24, 0), codes(8, 24, 1)
    ids = np.arange(600) * 3 + 5
    index = MilvusHammingIndex(backend.uri, bits=24, collection=backend.collection, nprobe=1024)  # exact
    index.add(db, ids)
    assert len(index) == 600  # read right after the write: a Bounded read on a server sees nothing yet
    assert_binary_on_server(backend, index)
    exact_distances, exact_ids = HammingIndex(db, ids=ids).search(queries, 10)
    distances, found = index.search(queries, 10)
    np.testing.assert_array_equal(distances, exact_distances)
    true = (queries[:, None, :] != db[(found - 5) // 3]).sum(axis=2)
    np.testing.assert_array_equal(distances, true)  # each id's own distance
    assert (np.diff(distances.astype(np.int64) * 10**6 + found, axis=1) > 0).all()  # by (distance, id)

    nearest = found[:, 0]
    index.delete(nearest)
    assert len(index) == 600 - len(set(nearest.tolist()))
    assert not set(index.search(queries, 10)[1].ravel()) & set(nearest.tolist())
    replaced = np.flatnonzero(~np.isin(ids, nearest))[:1]  # an existing id is replaced by its new code
    index.add(queries[:1], ids[replaced])
    db[replaced] = queries[:1]
    assert len(index) == 600 - len(set(nearest.tolist()))
    assert [a.tolist() for a in index.search(queries[:1], 1)] == [[[0]], [ids[replaced].tolist()]]
    index.close()

    # the codes persist: a new client (Lite: a restarted process) on the same URI and collection
    reopened = MilvusHammingIndex(backend.uri, bits=24, collection=backend.collection, nprobe=1024)
    assert len(reopened) == 600 - len(set(nearest.tolist())) and reopened.storage == index.storage
    kept = ~np.isin(ids, nearest)
    expected = HammingIndex(db[kept], ids=ids[kept]).search(queries, 10)[0]
    np.testing.assert_array_equal(reopened.search(queries, 10)[0], expected)
    reopened.close()


def test_wrong_code_lengths_and_foreign_collections_are_refused(backend):
    index = MilvusHammingIndex(backend.uri, bits=16, collection=backend.collection)
    index.add(codes(20, 16, 2), np.arange(20))
    with pytest.raises(ValueError, match="12 bits but the collection holds 16-bit"):
        index.search(codes(2, 12, 3), 5)
    with pytest.raises(ValueError, match="distinct ids"):
        index.add(codes(2, 16, 4), [1, 1])
    with pytest.raises(ValueError, match="k: expected a positive integer"):
        index.search(codes(1, 16, 5), 0)
    index.close()
    with pytest.raises(MilvusError, match="another length"):
        MilvusHammingIndex(backend.uri, bits=32, collection=backend.collection)


def test_a_uri_where_no_server_listens_is_a_one_line_error_at_once():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(MilvusError, match=f"Milvus at {uri}: .*server unavailable") as refused:
        MilvusHammingIndex(uri, bits=16, token="root:Milvus")
    assert time.monotonic() - started < 5  # not pymilvus's 10 s connection timeout, nor a hang
    assert "\n" not in str(refused.value)


def test_the_codes_survive_a_server_restart(server):
    db, queries = codes(300, 40, 6), codes(5, 40, 7)
    index = MilvusHammingIndex(server.uri, bits=40, collection="restart", nprobe=1024)
    index.add(db, np.arange(300))
    index.delete([0, 1, 2])
    index.close()
    server.stop()
    server.start()  # on the same base dir
    reopened = MilvusHammingIndex(server.uri, bits=40, collection="restart", nprobe=1024)
    assert len(reopened) == 297 and reopened.storage == "binary"
    expected = HammingIndex(db[3:], ids=np.arange(3, 300)).search(queries, 5)[0]
    np.testing.assert_array_equal(reopened.search(queries, 5)[0], expected)
    reopened.close()
