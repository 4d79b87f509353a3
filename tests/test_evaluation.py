import numpy as np
import pytest

import tbhvae.codes as codes_module
import tbhvae.evaluation as evaluation_module
from tbhvae.codes import hamming_distances, pack_codes, to_words, unpack_codes
from tbhvae.evaluation import evaluate_codes, mean_average_precision


def reference_map(query_codes, db_codes, query_labels, db_labels, top_k):
    """Plain per-query implementation of the protocol in ../shared/data/README.md."""
    aps = []
    for code, label in zip(query_codes, query_labels):
        dist = (code[None, :] != db_codes).sum(axis=1)
        order = np.argsort(dist, kind="stable")
        if top_k is not None:
            order = order[:top_k]
        if db_labels.ndim == 1:
            rel = db_labels[order] == label
        else:
            rel = (db_labels[order] & label).any(axis=1)
        if rel.sum() == 0:
            continue
        precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        aps.append((precision * rel).sum() / rel.sum())
    return float(np.mean(aps)) if aps else 0.0


def test_hand_computed_case():
    # Query 0000; database distances 0, 1, 1, 2 with ties kept in database order.
    db = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]], np.uint8)
    query = np.zeros((1, 4), np.uint8)
    db_labels = np.array([1, 0, 1, 1])
    # Ranking: items 0,1,2,3 -> rel 1,0,1,1 -> AP = (1/1 + 2/3 + 3/4) / 3
    expected = (1 + 2 / 3 + 3 / 4) / 3
    assert mean_average_precision(query, db, np.array([1]), db_labels, top_k=None) == pytest.approx(expected)
    # Top 2: rel 1,0 -> AP = 1 (R counts relevant items within the top K only)
    assert mean_average_precision(query, db, np.array([1]), db_labels, top_k=2) == pytest.approx(1.0)
    # A query with no relevant item is left out of the mean.
    two = np.zeros((2, 4), np.uint8)
    assert mean_average_precision(two, db, np.array([1, 5]), db_labels, top_k=None) == pytest.approx(expected)


@pytest.mark.parametrize("bits,top_k", [(8, 50), (16, 100), (16, None), (70, 30)])
def test_against_brute_force_with_ties(bits, top_k):
    rng = np.random.default_rng(bits)
    db = rng.integers(0, 2, (600, bits), dtype=np.uint8)
    queries = rng.integers(0, 2, (40, bits), dtype=np.uint8)
    db_labels = rng.integers(0, 5, 600)
    query_labels = rng.integers(0, 5, 40)
    expected = reference_map(queries, db, query_labels, db_labels, top_k)
    assert mean_average_precision(queries, db, query_labels, db_labels, top_k=top_k) == pytest.approx(expected)


@pytest.mark.parametrize("chunk_elements", [1 << 22, 1000])
def test_multi_label_against_brute_force(monkeypatch, chunk_elements):
    # 1000 entries per chunk = one query per chunk of the mAP@K path.
    monkeypatch.setattr(evaluation_module, "_TOP_K_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(3)
    db = rng.integers(0, 2, (300, 12), dtype=np.uint8)
    queries = rng.integers(0, 2, (30, 12), dtype=np.uint8)
    db_labels = (rng.random((300, 6)) < 0.2).astype(np.uint8)
    query_labels = (rng.random((30, 6)) < 0.2).astype(np.uint8)
    expected = reference_map(queries, db, query_labels, db_labels, 100)
    assert mean_average_precision(queries, db, query_labels, db_labels, top_k=100) == pytest.approx(expected)


def test_evaluate_codes_curves_match_definitions():
    rng = np.random.default_rng(5)
    bits = 10
    db = rng.integers(0, 2, (400, bits), dtype=np.uint8)
    queries = rng.integers(0, 2, (25, bits), dtype=np.uint8)
    db_labels, query_labels = rng.integers(0, 3, 400), rng.integers(0, 3, 25)
    metrics = evaluate_codes(queries, db, query_labels, db_labels, top_k=100, curves=True)
    assert metrics["map@100"] == pytest.approx(reference_map(queries, db, query_labels, db_labels, 100))
    assert metrics["map"] == pytest.approx(reference_map(queries, db, query_labels, db_labels, None))
    dist = (queries[:, None, :] != db[None, :, :]).sum(axis=2)
    rel = query_labels[:, None] == db_labels[None, :]
    for radius in (0, 2, 5, bits):
        inside = dist <= radius
        precision = np.where(inside.sum(1) > 0, (inside & rel).sum(1) / np.maximum(inside.sum(1), 1), 0)
        recall = (inside & rel).sum(1) / rel.sum(1)
        assert metrics["pr_curve"]["precision"][radius] == pytest.approx(precision.mean())
        assert metrics["pr_curve"]["recall"][radius] == pytest.approx(recall.mean())
    assert metrics["precision@r2"] == pytest.approx(metrics["pr_curve"]["precision"][2])
    order = np.argsort(dist, axis=1, kind="stable")
    top10 = np.take_along_axis(rel, order, axis=1)[:, :10].mean()
    assert metrics["precision_at_n"][10] == pytest.approx(top10)


@pytest.mark.parametrize("bits", [7, 64, 65, 200])
def test_hamming_distances_blocked_multiword(monkeypatch, bits):
    # A 300-column block forces several database blocks; 65+ bits several words.
    monkeypatch.setattr(codes_module, "_DB_BLOCK", 300)
    rng = np.random.default_rng(bits)
    queries, db = (rng.integers(0, 2, (n, bits), dtype=np.uint8) for n in (9, 1000))
    expected = (queries[:, None, :] != db[None, :, :]).sum(axis=2)
    dist = hamming_distances(to_words(pack_codes(queries)), to_words(pack_codes(db)))
    assert dist.dtype == (np.uint8 if bits <= 192 else np.uint16)
    np.testing.assert_array_equal(dist, expected)
    out = np.full((9, 1000), 7, dtype=np.uint16)
    hamming_distances(to_words(pack_codes(queries)), to_words(pack_codes(db)), out=out)
    np.testing.assert_array_equal(out, expected)


def test_pack_round_trip_and_bad_inputs():
    codes = np.random.default_rng(0).integers(0, 2, (5, 13), dtype=np.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (5, 2)
    np.testing.assert_array_equal(unpack_codes(packed, 13), codes)
    with pytest.raises(ValueError, match="only 0 and 1"):
        mean_average_precision(codes * 2, codes, np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="bits"):
        mean_average_precision(codes[:, :8], codes, np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="query_labels"):
        mean_average_precision(codes, codes, np.zeros(4), np.zeros(5))


def test_code_statistics_flags_collapse():
    from tbhvae.evaluation import code_statistics
    balanced = np.array([[0, 1], [1, 0], [1, 1], [0, 0]], np.uint8)
    assert code_statistics(balanced) == {"bit_balance": 1.0, "distinct_codes": 4}
    collapsed = np.ones((5, 3), np.uint8)
    assert code_statistics(collapsed) == {"bit_balance": 0.0, "distinct_codes": 1}
