"""Tests for tbhvae.index.HammingIndex against a brute-force reference."""
import importlib.util

import numpy as np
import pytest

import tbhvae.codes as codes_module
import tbhvae.index as index_module
import tbhvae.search as search_module
from tbhvae.codes import pack_codes
from tbhvae.index import EncoderProbe, HammingIndex

HAS_FAISS = importlib.util.find_spec("faiss") is not None
BACKENDS = ["numpy", pytest.param("faiss", marks=pytest.mark.skipif(
    not HAS_FAISS, reason="faiss not installed (pip install faiss-cpu)"))]


def random_codes(n, bits, seed):
    return np.random.default_rng(seed).integers(0, 2, size=(n, bits), dtype=np.uint8)


def brute_force(db_codes, query_codes):
    """(distances [q, n], positions [q, n]) by distance, ties by position."""
    distances = (query_codes[:, None, :] != db_codes[None, :, :]).sum(axis=2)
    order = np.argsort(distances, axis=1, kind="stable")
    return np.take_along_axis(distances, order, axis=1), order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits, n", [(8, 5000), (16, 5000), (12, 3000), (64, 2000), (70, 1500),
                                     (300, 400)])
def test_search_matches_brute_force(backend, bits, n):
    db = random_codes(n, bits, seed=bits)
    queries = np.concatenate([random_codes(40, bits, seed=bits + 1), db[:3]])
    index = HammingIndex(db, backend=backend)
    ref_distances, ref_positions = brute_force(db, queries)
    for k in (1, 7, 25, 100, 250, n - 1, n, n + 25):
        distances, ids = index.search(queries, k)
        kept = min(k, n)
        assert distances.shape == ids.shape == (len(queries), kept)
        assert distances.dtype == np.int32 and ids.dtype == np.int64
        np.testing.assert_array_equal(distances, ref_distances[:, :kept])
        np.testing.assert_array_equal(ids, ref_positions[:, :kept])


def test_auto_backend_uses_faiss_only_for_long_codes():
    short = HammingIndex(random_codes(10, 16, seed=2))
    long = HammingIndex(random_codes(300, 512, seed=3))
    assert short.backend == "numpy"
    assert long.backend == ("faiss" if HAS_FAISS else "numpy")
    queries = random_codes(5, 512, seed=4)
    ref_distances, ref_positions = brute_force(long.codes, queries)
    distances, ids = long.search(queries, 30)
    np.testing.assert_array_equal(distances, ref_distances[:, :30])
    np.testing.assert_array_equal(ids, ref_positions[:, :30])


def test_search_chunked_and_threaded_matches_brute_force(monkeypatch):
    # Tiny blocks force several database blocks, query chunks and two workers.
    monkeypatch.setattr(codes_module, "_DB_BLOCK", 700)
    monkeypatch.setattr(search_module, "_DISTANCE_BLOCK_BYTES", 3 * 2000)
    monkeypatch.setattr(search_module, "_MIN_PARALLEL_PAIRS", 0)
    db, queries = random_codes(2000, 20, seed=5), random_codes(33, 20, seed=6)
    index = HammingIndex(db, backend="numpy", workers=2)
    ref_distances, ref_positions = brute_force(db, queries)
    distances, ids = index.search(queries, 50)
    np.testing.assert_array_equal(distances, ref_distances[:, :50])
    np.testing.assert_array_equal(ids, ref_positions[:, :50])
    for (got_distances, got_ids), ref_row, ref_order in zip(
            index.radius_search(queries, 6), ref_distances, ref_positions):
        within = ref_row <= 6
        np.testing.assert_array_equal(got_distances, ref_row[within])
        np.testing.assert_array_equal(got_ids, ref_order[within])


@pytest.mark.parametrize("bits, n", [(16, 5000), (12, 800), (70, 600)])
def test_radius_search_matches_brute_force(bits, n):
    db = random_codes(n, bits, seed=7)
    queries = random_codes(25, bits, seed=8)
    index = HammingIndex(db)
    ref_distances, ref_positions = brute_force(db, queries)
    for radius in (0, 2, bits // 3, bits):
        results = index.radius_search(queries, radius)
        assert len(results) == len(queries)
        for (distances, ids), ref_row, ref_order in zip(results, ref_distances, ref_positions):
            within = ref_row <= radius
            assert distances.dtype == np.int32 and ids.dtype == np.int64
            np.testing.assert_array_equal(distances, ref_row[within])
            np.testing.assert_array_equal(ids, ref_order[within])


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ids_keep_position_tie_order(backend):
    db, queries = random_codes(3000, 10, seed=9), random_codes(20, 10, seed=10)
    custom_ids = np.random.default_rng(11).permutation(3000).astype(np.int64) * 3 + 1000
    index = HammingIndex(db, ids=custom_ids, backend=backend)
    ref_distances, ref_positions = brute_force(db, queries)
    distances, ids = index.search(queries, 60)
    np.testing.assert_array_equal(distances, ref_distances[:, :60])
    np.testing.assert_array_equal(ids, custom_ids[ref_positions[:, :60]])
    radius_ids = index.radius_search(queries[:1], 3)[0][1]
    np.testing.assert_array_equal(radius_ids, custom_ids[ref_positions[0][ref_distances[0] <= 3]])


def test_duplicate_or_misshaped_ids_are_rejected():
    db = random_codes(5, 8, seed=12)
    with pytest.raises(ValueError, match="id 3 occurs more than once"):
        HammingIndex(db, ids=[0, 3, 1, 3, 2])
    with pytest.raises(ValueError, match=r"ids: expected shape \(5,\)"):
        HammingIndex(db, ids=[0, 1, 2])
    with pytest.raises(ValueError, match="integers"):
        HammingIndex(db, ids=[0.5, 1, 2, 3, 4])


def test_add_equals_building_at_once():
    first, second = random_codes(1200, 24, seed=13), random_codes(800, 24, seed=14)
    queries = random_codes(15, 24, seed=15)
    grown = HammingIndex(first, labels=np.arange(1200) % 10, paths=[f"a{i}" for i in range(1200)])
    grown.add(second, labels=np.arange(800) % 10, paths=[f"b{i}" for i in range(800)])
    whole = HammingIndex(np.concatenate([first, second]))
    assert len(grown) == 2000
    np.testing.assert_array_equal(grown.ids, np.arange(2000))
    assert grown.paths[1200] == "b0" and grown.labels.shape == (2000,)
    for got, expected in zip(grown.search(queries, 40), whole.search(queries, 40)):
        np.testing.assert_array_equal(got, expected)


def test_add_validates_ids_lengths_and_metadata():
    index = HammingIndex(random_codes(10, 16, seed=16), ids=np.arange(10) + 100)
    index.add(random_codes(2, 16, seed=17))
    np.testing.assert_array_equal(index.ids[-2:], [110, 111])
    with pytest.raises(ValueError, match="id 105 occurs more than once"):
        index.add(random_codes(1, 16, seed=18), ids=[105])
    with pytest.raises(ValueError, match="17 bits but the index holds 16-bit"):
        index.add(random_codes(1, 17, seed=19))
    with pytest.raises(ValueError, match="built without labels"):
        index.add(random_codes(1, 16, seed=20), labels=[1])
    assert len(index) == 12


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed (pip install faiss-cpu)")
def test_faiss_backend_follows_add():
    first, second = random_codes(900, 16, seed=21), random_codes(300, 16, seed=22)
    queries = random_codes(12, 16, seed=23)
    index = HammingIndex(first, backend="faiss")
    index.search(queries, 5)  # builds the faiss index before the add
    index.add(second)
    ref_distances, ref_positions = brute_force(np.concatenate([first, second]), queries)
    distances, ids = index.search(queries, 300)
    np.testing.assert_array_equal(distances, ref_distances[:, :300])
    np.testing.assert_array_equal(ids, ref_positions[:, :300])


class ReversedTiesBinaryFlat:
    """Stand-in for faiss.IndexBinaryFlat that returns ties in reverse position order."""

    def __init__(self, dim):
        self.code_size = dim // 8
        self.packed = np.zeros((0, self.code_size), dtype=np.uint8)

    def add(self, packed):
        self.packed = np.concatenate([self.packed, packed])

    def search(self, packed_queries, k):
        distances = (np.unpackbits(packed_queries, axis=1)[:, None, :]
                     != np.unpackbits(self.packed, axis=1)[None, :, :]).sum(axis=2)
        positions = np.arange(distances.shape[1])
        order = np.stack([np.lexsort((-positions, row)) for row in distances])[:, :k]
        return (np.take_along_axis(distances, order, axis=1).astype(np.int32),
                order.astype(np.int64))


def test_faiss_candidates_are_reranked_to_position_order(monkeypatch):
    fake_faiss = type("FakeFaiss", (), {"IndexBinaryFlat": ReversedTiesBinaryFlat})
    monkeypatch.setattr(index_module, "_faiss_module", lambda: fake_faiss)
    db, queries = random_codes(1500, 8, seed=36), random_codes(10, 8, seed=37)
    index = HammingIndex(db, backend="faiss")
    ref_distances, ref_positions = brute_force(db, queries)
    for k in (3, 25, 200, 1500):
        distances, ids = index.search(queries, k)
        np.testing.assert_array_equal(distances, ref_distances[:, :k])
        np.testing.assert_array_equal(ids, ref_positions[:, :k])


def test_wrong_code_length_names_both_lengths():
    index = HammingIndex(random_codes(50, 64, seed=24))
    with pytest.raises(ValueError, match="query_codes: codes have 32 bits but the index holds 64"):
        index.search(random_codes(3, 32, seed=25), 5)
    with pytest.raises(ValueError, match="32 bits .* 64-bit"):
        index.radius_search(random_codes(3, 32, seed=25), 2)


def test_bad_arguments_are_rejected():
    index = HammingIndex(random_codes(20, 8, seed=26))
    queries = random_codes(2, 8, seed=27)
    with pytest.raises(ValueError, match="k: expected a positive integer"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match="radius: expected a non-negative integer"):
        index.radius_search(queries, -1)
    with pytest.raises(ValueError, match="only 0 and 1"):
        index.search(queries * 2, 3)
    with pytest.raises(ValueError, match="backend: expected one of"):
        HammingIndex(random_codes(3, 8, seed=28), backend="gpu")


def test_codes_are_stored_in_shared_bit_order():
    codes = random_codes(30, 70, seed=29)
    index = HammingIndex(codes)
    assert index.bits == 70
    np.testing.assert_array_equal(index.packed, pack_codes(codes))
    np.testing.assert_array_equal(index.codes, codes)
    rebuilt = HammingIndex.from_packed(pack_codes(codes), 70)
    np.testing.assert_array_equal(rebuilt.codes, codes)
    dirty = pack_codes(codes)
    dirty[0, -1] |= 1  # a padding bit past bit 70
    with pytest.raises(ValueError, match="padding bits"):
        HammingIndex.from_packed(dirty, 70)


@pytest.mark.parametrize("with_metadata", [True, False])
def test_save_load_round_trip(tmp_path, with_metadata):
    codes, queries = random_codes(700, 70, seed=30), random_codes(9, 70, seed=31)
    ids = np.arange(700)[::-1] * 7
    labels = random_codes(700, 5, seed=32) if with_metadata else None
    paths = [f"img/{i:04d}.jpg" for i in range(700)] if with_metadata else None
    index = HammingIndex(codes, ids=ids, labels=labels, paths=paths)
    path = tmp_path / "codes.index"
    index.save(path)
    loaded = HammingIndex.load(path)
    assert loaded.bits == 70 and len(loaded) == 700
    np.testing.assert_array_equal(loaded.codes, codes)
    np.testing.assert_array_equal(loaded.ids, ids)
    if with_metadata:
        np.testing.assert_array_equal(loaded.labels, labels)
        assert list(loaded.paths) == paths
    else:
        assert loaded.labels is None and loaded.paths is None
    for got, expected in zip(loaded.search(queries, 25), index.search(queries, 25)):
        np.testing.assert_array_equal(got, expected)


def test_load_reports_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such index file"):
        HammingIndex.load(tmp_path / "absent.npz")
    good = tmp_path / "good.npz"
    HammingIndex(random_codes(400, 32, seed=33)).save(good)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"definitely not an index" * 10)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, codes=np.zeros((3, 8)))
    single_array = tmp_path / "array.npy"
    np.save(single_array, np.zeros(3))
    for path, message in [(truncated, "corrupt"), (garbage, r"corrupt index file \(not an .npz archive\)"),
                          (foreign, "not a tbhvae Hamming index"), (single_array, "corrupt")]:
        with pytest.raises(ValueError, match=message) as error:
            HammingIndex.load(path)
        assert str(path) in str(error.value)

    inconsistent = tmp_path / "inconsistent.npz"
    with np.load(good) as archive:
        contents = dict(archive)
    contents["ids"] = contents["ids"][:-1]
    np.savez(inconsistent, **contents)
    with pytest.raises(ValueError, match="corrupt index file .*ids"):
        HammingIndex.load(inconsistent)


def test_empty_index_returns_empty_results():
    index = HammingIndex(np.zeros((0, 16), dtype=np.uint8))
    distances, ids = index.search(random_codes(3, 16, seed=34), 10)
    assert distances.shape == ids.shape == (3, 0)
    assert [len(d) for d, _ in index.radius_search(random_codes(2, 16, seed=35), 16)] == [0, 0]


def test_the_encoder_probe_is_saved_and_compared(tmp_path):
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 2, (50, 12), dtype=np.uint8)
    index = HammingIndex(codes)
    index.encoder_probe = EncoderProbe(rng.normal(size=(8, 6)).astype(np.float32), codes[:8])
    index.save(tmp_path / "i.npz")
    loaded = HammingIndex.load(tmp_path / "i.npz")
    np.testing.assert_array_equal(loaded.encoder_probe.inputs, index.encoder_probe.inputs)
    np.testing.assert_array_equal(loaded.encoder_probe.codes, codes[:8])
    flipped = codes[:8].copy()
    flipped[:, :3] ^= 1
    assert loaded.encoder_probe.agreement(codes[:8]) == 1.0
    assert loaded.encoder_probe.agreement(flipped) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="the probe's"):
        loaded.encoder_probe.agreement(codes[:4])
    HammingIndex(codes).save(tmp_path / "plain.npz")
    assert HammingIndex.load(tmp_path / "plain.npz").encoder_probe is None


def test_a_probe_of_jpeg_files_is_saved_without_pickle(tmp_path):
    rng = np.random.default_rng(6)
    codes = rng.integers(0, 2, (20, 10), dtype=np.uint8)
    files = tuple(rng.integers(0, 256, rng.integers(1, 40), dtype=np.uint8).tobytes() for _ in range(5)) + (b"",)
    index = HammingIndex(codes)
    index.encoder_probe = EncoderProbe(files, codes[:6], kind="jpeg")
    index.save(tmp_path / "i.npz")
    with np.load(tmp_path / "i.npz", allow_pickle=False) as archive:  # plain arrays: bytes + offsets
        assert archive["probe_jpeg_bytes"].dtype == np.uint8 and archive["probe_jpeg_offsets"].dtype == np.int64
        assert "probe_inputs" not in archive.files  # a tbhvae without kinds sees no probe rather than a wrong one
        arrays = dict(archive)
    loaded = HammingIndex.load(tmp_path / "i.npz").encoder_probe
    assert loaded.kind == "jpeg" and loaded.inputs == files
    np.testing.assert_array_equal(loaded.codes, codes[:6])
    arrays["probe_jpeg_offsets"] = arrays["probe_jpeg_offsets"][::-1].copy()
    np.savez(tmp_path / "damaged.npz", **arrays)
    with pytest.raises(ValueError, match="corrupt index file .*consecutive files"):
        HammingIndex.load(tmp_path / "damaged.npz")
    with pytest.raises(ValueError, match="5 inputs but 6 codes"):
        EncoderProbe(files[:5], codes[:6], kind="jpeg")
    with pytest.raises(ValueError, match="probe kind"):
        EncoderProbe(files, codes[:6], kind="png")


# ------------------------------------------------------------------ approximate backend (faiss IVF)
def clustered_codes(n, bits, clusters, flip, seed):
    """Codes around `clusters` random centres, each bit flipped with probability `flip`."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2, (clusters, bits), dtype=np.uint8)
    return centres[rng.integers(0, clusters, n)] ^ (rng.random((n, bits)) < flip).astype(np.uint8)


def recall_at_k(approx_distances, exact_distances):
    """Tie-aware recall@k: share of the k results within the exact k-th distance."""
    return float(np.mean((approx_distances <= exact_distances[:, -1:]).mean(axis=1)))


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed (pip install faiss-cpu)")
def test_ivf_backend_is_a_close_approximation_in_position_order():
    db = clustered_codes(20000, 32, clusters=40, flip=0.1, seed=30)
    queries = clustered_codes(50, 32, clusters=40, flip=0.1, seed=30)[::-1].copy()
    exact = HammingIndex(db, backend="numpy")
    approximate = HammingIndex(db, backend="faiss_ivf", ids=np.arange(20000) + 7)
    assert approximate.backend == "faiss_ivf"
    exact_distances, _ = exact.search(queries, 50)
    distances, ids = approximate.search(queries, 50)
    assert distances.dtype == np.int32 and ids.dtype == np.int64 and distances.shape == (50, 50)
    true_distances = (queries[:, None, :] != db[ids - 7]).sum(axis=2)
    np.testing.assert_array_equal(distances, true_distances)  # exact distances of what it found
    assert (distances >= exact_distances).all()  # never nearer than the true neighbours
    assert recall_at_k(distances, exact_distances) >= 0.95
    key = distances.astype(np.int64) * 10**6 + ids
    assert (np.diff(key, axis=1) > 0).all()  # by distance, then position; no repeats
    # probing every cluster is an exhaustive search: the exact distances
    approximate.ivf = index_module.IVFSettings(nprobe=approximate.ivf.resolved(20000)[0])
    np.testing.assert_array_equal(approximate.search(queries, 50)[0], exact_distances)
    approximate.ivf = index_module.IVFSettings(nlist=16, nprobe=16)  # a new nlist: rebuilt
    np.testing.assert_array_equal(approximate.search(queries, 50)[0], exact_distances)
    with pytest.raises(ValueError, match="for backend='faiss_ivf'"):
        exact.ivf = index_module.IVFSettings(nprobe=4)


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed (pip install faiss-cpu)")
def test_ivf_answers_exactly_where_its_clusters_hold_fewer_than_k_and_follows_add():
    db = clustered_codes(400, 16, clusters=8, flip=0.05, seed=31)
    queries = clustered_codes(10, 16, clusters=8, flip=0.05, seed=32)
    index = HammingIndex(db, backend="faiss_ivf", ivf=index_module.IVFSettings(nlist=8, nprobe=1))
    ref_distances, ref_positions = brute_force(db, queries)
    distances, ids = index.search(queries, 300)  # one cluster of ~50 codes cannot give 300
    np.testing.assert_array_equal(distances, ref_distances[:, :300])
    np.testing.assert_array_equal(ids, ref_positions[:, :300])
    index.add(db[:5] ^ 1, ids=np.arange(1000, 1005))  # after the IVF was built
    found = index.search(db[:5] ^ 1, 1)
    np.testing.assert_array_equal(found[0], 0)
    assert set(found[1][:, 0]) <= set(range(1000, 1005)) | set(np.flatnonzero((db == db[0] ^ 1).all(1)))


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed (pip install faiss-cpu)")
def test_ivf_settings_are_checked():
    db = random_codes(100, 16, seed=33)
    with pytest.raises(ValueError, match="for backend='faiss_ivf'"):
        HammingIndex(db, backend="faiss", ivf=index_module.IVFSettings(nprobe=2))
    with pytest.raises(ValueError, match="nlist <= n"):
        HammingIndex(db, backend="faiss_ivf", ivf=index_module.IVFSettings(nlist=500))
    assert index_module.IVFSettings().resolved(10**6) == (1000, 125)
    assert index_module.IVFSettings().resolved(100) == (2, 1)
