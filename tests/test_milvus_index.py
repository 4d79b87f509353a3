"""The Milvus backend, against Milvus Lite on this machine: answers as HammingIndex, delete, persistence."""
import numpy as np
import pytest

from tbhvae.index import HammingIndex

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
from tbhvae.milvus_index import MilvusError, MilvusHammingIndex  # noqa: E402


def codes(n, bits, seed):
    return np.random.default_rng(seed).integers(0, 2, (n, bits), dtype=np.uint8)


def test_search_delete_and_reopen_answer_as_the_exact_index(tmp_path):
    db, queries = codes(600, 24, 0), codes(8, 24, 1)
    ids = np.arange(600) * 3 + 5
    uri = str(tmp_path / "codes.db")
    index = MilvusHammingIndex(uri, bits=24, nprobe=1024)  # every cluster: exact
    index.add(db, ids)
    assert len(index) == 600 and index.storage in ("binary", "float")
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
    index.close()

    reopened = MilvusHammingIndex(uri, bits=24, nprobe=1024)  # the codes persist across restarts
    assert len(reopened) == 600 - len(set(nearest.tolist())) and reopened.storage == index.storage
    kept = ~np.isin(ids, nearest)
    expected = HammingIndex(db[kept], ids=ids[kept]).search(queries, 10)[0]
    np.testing.assert_array_equal(reopened.search(queries, 10)[0], expected)
    reopened.close()


def test_wrong_code_lengths_and_foreign_collections_are_refused(tmp_path):
    uri = str(tmp_path / "codes.db")
    index = MilvusHammingIndex(uri, bits=16)
    index.add(codes(20, 16, 2), np.arange(20))
    with pytest.raises(ValueError, match="12 bits but the collection holds 16-bit"):
        index.search(codes(2, 12, 3), 5)
    with pytest.raises(ValueError, match="distinct ids"):
        index.add(codes(2, 16, 4), [1, 1])
    with pytest.raises(ValueError, match="k: expected a positive integer"):
        index.search(codes(1, 16, 5), 0)
    index.close()
    with pytest.raises(MilvusError, match="another length"):
        MilvusHammingIndex(uri, bits=32)
