import itertools

import numpy as np
import pytest

import tbhvae.codes as codes_module
import tbhvae.evaluation as evaluation_module
from tbhvae.codes import hamming_distances, pack_codes, to_words, unpack_codes
from tbhvae.evaluation import (
    distance_histograms,
    evaluate_codes,
    mean_average_precision,
    mean_average_precision_index_ties,
)
from tbhvae.tie_aware import tie_aware_precision_at


def _relevance(query_label, db_labels):
    if db_labels.ndim == 1:
        return db_labels == query_label
    return (db_labels & query_label).any(axis=1)


def _ap(rel):
    """AP of one ranked bool vector; 0 without a relevant item."""
    if rel.sum() == 0:
        return 0.0
    return float((np.cumsum(rel) / np.arange(1, len(rel) + 1) * rel).sum() / rel.sum())


def index_ties_reference(query_codes, db_codes, query_labels, db_labels, top_k):
    """Plain per-query implementation of the older convention (ties by index, no-hit queries skipped)."""
    aps = []
    for code, label in zip(query_codes, query_labels):
        order = np.argsort((code[None, :] != db_codes).sum(axis=1), kind="stable")[:top_k]
        rel = _relevance(label, db_labels)[order]
        if rel.sum():
            aps.append(_ap(rel))
    return float(np.mean(aps)) if aps else 0.0


def _tie_orders(dist):
    """Every ranking that orders by distance, ties in any order."""
    groups = [list(itertools.permutations(np.flatnonzero(dist == d))) for d in np.unique(dist)]
    for combo in itertools.product(*groups):
        yield np.concatenate(combo)


def enumerated_map(query_codes, db_codes, query_labels, db_labels, top_k):
    """Tie-aware mAP@K by brute force: AP@K averaged over all orders within ties, mean over all queries."""
    aps = []
    for code, label in zip(query_codes, query_labels):
        dist = (code[None, :] != db_codes).sum(axis=1)
        rel = _relevance(label, db_labels)
        aps.append(np.mean([_ap(rel[order][:top_k]) for order in _tie_orders(dist)]))
    return float(np.mean(aps))


def sampled_map(query_codes, db_codes, query_labels, db_labels, top_k, draws, rng):
    """Tie-aware mAP@K by Monte Carlo: random tie orders (a random key under the distance)."""
    dist = (query_codes[:, None, :] != db_codes[None, :, :]).sum(axis=2)
    values = []
    for _ in range(draws):
        order = np.lexsort((rng.random(dist.shape), dist), axis=1)
        values.append(np.mean([_ap(_relevance(label, db_labels)[row][:top_k])
                               for label, row in zip(query_labels, order)]))
    return float(np.mean(values)), float(np.std(values) / np.sqrt(draws))


def test_hand_computed_case():
    # Query 0000; database distances 0, 1, 1, 2; relevant items 0, 2, 3.
    db = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]], np.uint8)
    query = np.zeros((1, 4), np.uint8)
    db_labels = np.array([1, 0, 1, 1])
    # Orders 0,1,2,3 (rel 1,0,1,1) and 0,2,1,3 (rel 1,1,0,1), each with probability 1/2.
    full = ((1 + 2 / 3 + 3 / 4) / 3 + (1 + 1 + 3 / 4) / 3) / 2
    assert mean_average_precision(query, db, np.array([1]), db_labels, top_k=None) == pytest.approx(full)
    # Top 2: rel 1,0 (AP 1) or 1,1 (AP 1).
    assert mean_average_precision(query, db, np.array([1]), db_labels, top_k=2) == pytest.approx(1.0)
    # A query with no relevant item counts as 0 in the mean.
    two = np.zeros((2, 4), np.uint8)
    assert mean_average_precision(two, db, np.array([1, 5]), db_labels, top_k=None) == pytest.approx(full / 2)
    # The older convention breaks ties by index and skips the second query.
    old = (1 + 2 / 3 + 3 / 4) / 3
    assert mean_average_precision_index_ties(two, db, np.array([1, 5]), db_labels, top_k=None) == pytest.approx(old)


@pytest.mark.parametrize("seed", range(12))
def test_exact_against_all_tie_orders(seed):
    # Few bits and items: large tie groups, cuts straddling groups, every order enumerated.
    rng = np.random.default_rng(seed)
    bits, n = int(rng.integers(1, 4)), int(rng.integers(3, 8))
    db = rng.integers(0, 2, (n, bits), dtype=np.uint8)
    queries = rng.integers(0, 2, (4, bits), dtype=np.uint8)
    if seed % 3 == 2:  # multi-hot, including rows without labels
        db_labels = (rng.random((n, 3)) < 0.4).astype(np.uint8)
        query_labels = (rng.random((4, 3)) < 0.5).astype(np.uint8)
    else:
        db_labels, query_labels = rng.integers(0, 3, n), rng.integers(0, 3, 4)
    for top_k in (1, 2, 3, 5, None):
        expected = enumerated_map(queries, db, query_labels, db_labels, top_k)
        got = mean_average_precision(queries, db, query_labels, db_labels, top_k=top_k)
        assert got == pytest.approx(expected, abs=1e-12), top_k


@pytest.mark.parametrize("multi_label", [False, True])
def test_exact_against_random_tie_orders(multi_label):
    rng = np.random.default_rng(7)
    db = rng.integers(0, 2, (400, 6), dtype=np.uint8)  # 7 distances: groups of ~60 straddle K
    queries = rng.integers(0, 2, (20, 6), dtype=np.uint8)
    if multi_label:
        db_labels = (rng.random((400, 5)) < 0.3).astype(np.uint8)
        query_labels = (rng.random((20, 5)) < 0.3).astype(np.uint8)
    else:
        db_labels, query_labels = rng.integers(0, 4, 400), rng.integers(0, 4, 20)
    for top_k in (50, 130):
        mean, error = sampled_map(queries, db, query_labels, db_labels, top_k, 300, rng)
        got = mean_average_precision(queries, db, query_labels, db_labels, top_k=top_k)
        assert abs(got - mean) < 4 * error + 1e-9, (top_k, got, mean, error)
        # the older convention is a different number on this tie-heavy case
        assert abs(mean_average_precision_index_ties(queries, db, query_labels, db_labels, top_k) - got) > 4 * error


def test_invariant_to_database_order():
    rng = np.random.default_rng(11)
    db = rng.integers(0, 2, (3000, 8), dtype=np.uint8)
    queries = rng.integers(0, 2, (50, 8), dtype=np.uint8)
    db_labels, query_labels = rng.integers(0, 10, 3000), rng.integers(0, 10, 50)
    permutation = rng.permutation(3000)
    before = evaluate_codes(queries, db, query_labels, db_labels, top_k=100, curves=True)
    after = evaluate_codes(queries, db[permutation], query_labels, db_labels[permutation], top_k=100, curves=True)
    for key in ("map@100", "map", "precision@r2"):
        assert after[key] == pytest.approx(before[key], abs=1e-9)
    for n, value in before["precision_at_n"].items():
        assert after["precision_at_n"][n] == pytest.approx(value, abs=1e-9)


def test_constant_encoder_scores_the_class_prior_and_perfect_codes_one():
    # A class-sorted database, as the shared CIFAR-10 files are.
    db_labels, query_labels = np.repeat(np.arange(10), 1000), np.repeat(np.arange(10), 100)
    constant_db, constant_queries = np.ones((10000, 16), np.uint8), np.ones((1000, 16), np.uint8)
    for top_k in (1000, None):
        score = mean_average_precision(constant_queries, constant_db, query_labels, db_labels, top_k=top_k)
        assert score == pytest.approx(0.1, abs=0.01)
    # the older convention is fooled by the class order
    assert mean_average_precision_index_ties(constant_queries, constant_db, query_labels, db_labels) == 1.0
    perfect = np.unpackbits(np.arange(10, dtype=np.uint8)[:, None], axis=1)
    assert mean_average_precision(perfect[query_labels], perfect[db_labels], query_labels, db_labels) == 1.0
    assert mean_average_precision(perfect[query_labels], perfect[db_labels], query_labels, db_labels,
                                  top_k=None) == 1.0


@pytest.mark.parametrize("bits,top_k", [(8, 50), (16, 100), (16, None), (70, 30)])
def test_index_ties_protocol_against_brute_force(bits, top_k):
    rng = np.random.default_rng(bits)
    db = rng.integers(0, 2, (600, bits), dtype=np.uint8)
    queries = rng.integers(0, 2, (40, bits), dtype=np.uint8)
    db_labels = rng.integers(0, 5, 600)
    query_labels = rng.integers(0, 5, 40)
    expected = index_ties_reference(queries, db, query_labels, db_labels, top_k)
    got = mean_average_precision_index_ties(queries, db, query_labels, db_labels, top_k=top_k)
    assert got == pytest.approx(expected)


def test_index_ties_protocol_regression():
    # Figures of the pre-tie-aware implementation on a fixed case (kept bit-for-bit).
    rng = np.random.default_rng(2024)
    db = rng.integers(0, 2, (500, 6), dtype=np.uint8)
    queries = rng.integers(0, 2, (30, 6), dtype=np.uint8)
    db_labels, query_labels = np.sort(rng.integers(0, 4, 500)), rng.integers(0, 4, 30)
    # the value the previous `mean_average_precision` (ties by index) returned on this case
    assert mean_average_precision_index_ties(queries, db, query_labels, db_labels, 100) == pytest.approx(
        0.2940238735750359, abs=1e-12)


@pytest.mark.parametrize("chunk_elements", [1 << 22, 1000])
def test_multi_label_index_ties_against_brute_force(monkeypatch, chunk_elements):
    # 1000 entries per chunk = one query per chunk.
    monkeypatch.setattr(evaluation_module, "_TOP_K_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(3)
    db = rng.integers(0, 2, (300, 12), dtype=np.uint8)
    queries = rng.integers(0, 2, (30, 12), dtype=np.uint8)
    db_labels = (rng.random((300, 6)) < 0.2).astype(np.uint8)
    query_labels = (rng.random((30, 6)) < 0.2).astype(np.uint8)
    expected = index_ties_reference(queries, db, query_labels, db_labels, 100)
    assert mean_average_precision_index_ties(queries, db, query_labels, db_labels, top_k=100) == pytest.approx(expected)


@pytest.mark.parametrize("chunk_elements", [1 << 21, 700])
def test_histograms_chunked_and_grouped_by_class(monkeypatch, chunk_elements):
    # 700 pairs per chunk = one query per chunk; class ids need not be dense.
    monkeypatch.setattr(evaluation_module, "_CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(5)
    db, queries = rng.integers(0, 2, (700, 9), dtype=np.uint8), rng.integers(0, 2, (13, 9), dtype=np.uint8)
    db_labels, query_labels = rng.choice([3, 8, 40], 700), rng.choice([3, 8, 40, 99], 13)
    histograms = distance_histograms(queries, db, query_labels, db_labels)
    dist = (queries[:, None, :] != db[None, :, :]).sum(axis=2)
    rel = query_labels[:, None] == db_labels[None, :]
    for d in range(10):
        np.testing.assert_array_equal(histograms.counts[:, d], (dist == d).sum(axis=1))
        np.testing.assert_array_equal(histograms.relevant[:, d], ((dist == d) & rel).sum(axis=1))


def test_evaluate_codes_curves_match_definitions():
    rng = np.random.default_rng(5)
    bits = 10
    db = rng.integers(0, 2, (400, bits), dtype=np.uint8)
    queries = rng.integers(0, 2, (25, bits), dtype=np.uint8)
    db_labels, query_labels = rng.integers(0, 3, 400), rng.integers(0, 3, 25)
    metrics = evaluate_codes(queries, db, query_labels, db_labels, top_k=100, curves=True, index_ties=True)
    assert metrics["map@100"] == pytest.approx(mean_average_precision(queries, db, query_labels, db_labels, 100))
    assert metrics["map"] == pytest.approx(mean_average_precision(queries, db, query_labels, db_labels, None))
    assert metrics["map@100_index_ties"] == pytest.approx(
        index_ties_reference(queries, db, query_labels, db_labels, 100))
    dist = (queries[:, None, :] != db[None, :, :]).sum(axis=2)
    rel = query_labels[:, None] == db_labels[None, :]
    for radius in (0, 2, 5, bits):
        inside = dist <= radius
        precision = np.where(inside.sum(1) > 0, (inside & rel).sum(1) / np.maximum(inside.sum(1), 1), 0)
        recall = (inside & rel).sum(1) / rel.sum(1)
        assert metrics["pr_curve"]["precision"][radius] == pytest.approx(precision.mean())
        assert metrics["pr_curve"]["recall"][radius] == pytest.approx(recall.mean())
    assert metrics["precision@r2"] == pytest.approx(metrics["pr_curve"]["precision"][2])
    # expected precision@10 over tie orders: the straddling group contributes its relevant share
    expected = []
    for row, hits in zip(dist, rel):
        order = np.argsort(row, kind="stable")
        edge = row[order[9]]
        before = row < edge
        share = hits[row == edge].mean()
        expected.append((hits[before].sum() + (10 - before.sum()) * share) / 10)
    assert metrics["precision_at_n"][10] == pytest.approx(np.mean(expected))


def test_precision_at_n_against_all_tie_orders():
    rng = np.random.default_rng(9)
    db, queries = rng.integers(0, 2, (6, 2), dtype=np.uint8), rng.integers(0, 2, (3, 2), dtype=np.uint8)
    db_labels, query_labels = rng.integers(0, 2, 6), rng.integers(0, 2, 3)
    got = tie_aware_precision_at(distance_histograms(queries, db, query_labels, db_labels), [1, 3, 4, 6])
    for i, (code, label) in enumerate(zip(queries, query_labels)):
        dist = (code[None, :] != db).sum(axis=1)
        rel = db_labels == label
        for j, top in enumerate([1, 3, 4, 6]):
            assert got[i, j] == pytest.approx(np.mean([rel[o][:top].mean() for o in _tie_orders(dist)]))


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
    assert code_statistics(balanced) == {"bit_balance": 1.0, "min_bit_balance": 1.0, "distinct_codes": 4}
    collapsed = np.ones((5, 3), np.uint8)
    assert code_statistics(collapsed) == {"bit_balance": 0.0, "min_bit_balance": 0.0, "distinct_codes": 1}
    one_constant = np.array([[0, 1], [1, 1], [1, 1], [0, 1]], np.uint8)
    assert code_statistics(one_constant) == {"bit_balance": 0.5, "min_bit_balance": 0.0, "distinct_codes": 2}


@pytest.mark.parametrize("query_labels,db_labels,message", [
    (np.array([[0, 2]]), np.array([[0, 1]] * 4), "only 0 and 1"),
    (np.array([[0, -1]]), np.array([[0, 1]] * 4), "only 0 and 1"),
    (np.array([1]), np.array([0, -1, 1, 1]), "non-negative integers"),
    (np.array([0.5]), np.array([0, 1, 1, 1]), "non-negative integers"),
    (np.array([[0, 1]]), np.array([[0, 1, 0]] * 4), "widths differ"),
    (np.array([None]), np.array([None] * 4), "numeric"),
    (np.array([np.nan]), np.array([0.0, 1, 1, 1]), "NaN"),
])
def test_bad_labels_are_refused(query_labels, db_labels, message):
    codes = np.zeros((4, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        mean_average_precision(codes[:1], codes, query_labels, db_labels)


@pytest.mark.parametrize("top_k", [0, -3, 2.5, True, "10"])
def test_bad_top_k_is_refused(top_k):
    codes = np.zeros((4, 3), np.uint8)
    with pytest.raises(ValueError, match="top_k"):
        mean_average_precision(codes, codes, np.zeros(4, int), np.zeros(4, int), top_k=top_k)


def test_chance_map_and_health_warnings():
    from tbhvae.evaluation import code_statistics, health_warnings
    db_labels, query_labels = np.repeat(np.arange(10), 300), np.repeat(np.arange(10), 20)
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 2, (3000, 12), dtype=np.uint8)
    chance = evaluate_codes(codes[::15], codes, query_labels, db_labels)["chance_map@1000"]
    assert chance == pytest.approx(0.1, abs=0.01)
    constant = np.zeros((3000, 1), np.uint8)  # the constant encoder itself scores exactly that
    assert mean_average_precision(constant[:200], constant, query_labels, db_labels) == pytest.approx(chance, abs=1e-12)
    collapsed = np.ones((3000, 16), np.uint8)
    metrics = {"map@1000": chance, **code_statistics(collapsed)}
    warnings = health_warnings(metrics, chance, 3000)
    assert len(warnings) == 4 and "at chance" in warnings[0] and "collapsed" in warnings[1]
    perfect = np.unpackbits(np.arange(10, dtype=np.uint8)[:, None], axis=1)[db_labels]
    rng = np.random.default_rng(0)
    healthy = np.concatenate([perfect, rng.integers(0, 2, (3000, 8), dtype=np.uint8)], axis=1)
    healthy[:, :4] = rng.integers(0, 2, (3000, 4))  # the 4 always-zero high bits of a class id < 16
    metrics = {"map@1000": 0.6, **code_statistics(healthy)}
    assert health_warnings(metrics, chance, 3000) == []


def test_queries_that_cannot_score_are_warned_about_and_count_as_zero():
    codes = np.array([[0, 0], [0, 1], [1, 1]], np.uint8)
    with pytest.warns(UserWarning, match="1 of 2 queries have no relevant item"):
        score = mean_average_precision(codes[:2], codes, np.array([0, 7]), np.array([0, 0, 1]), top_k=None)
    assert score == pytest.approx(0.5)  # query 0: AP 1, query 1 (class 7 absent): AP 0
    with pytest.warns(UserWarning, match="no relevant item"):  # a multi-hot query without labels
        mean_average_precision(codes[:1], codes, np.array([[0, 0]]), np.array([[1, 0], [0, 1], [1, 1]]))
    with pytest.warns(UserWarning, match="every database item is relevant"):
        mean_average_precision(codes, codes, np.zeros(3, int), np.zeros(3, int))


@pytest.mark.parametrize("unscorable", ["class_absent_from_database", "multi_hot_row_without_labels"])
def test_every_metric_counts_a_query_without_relevant_items_the_same_documented_way(unscorable):
    """Issue 16 item 7: such a query is 0 in every mean (mAP@K, full mAP, precision@r2, precision@N,
    the PR curve's precision, the chance level), left out of recall, and skipped by the older protocol."""
    rng = np.random.default_rng(3)
    db_codes, query_code = rng.integers(0, 2, (60, 6), dtype=np.uint8), rng.integers(0, 2, (1, 6), dtype=np.uint8)
    classes = rng.integers(0, 3, 60)
    if unscorable == "class_absent_from_database":
        db_labels, good, bad = classes, np.array([1]), np.array([7])
    else:
        db_labels, good, bad = np.eye(4, dtype=np.uint8)[classes], np.array([[0, 1, 0, 0]]), np.zeros((1, 4), int)
    alone = evaluate_codes(query_code, db_codes, good, db_labels, top_k=20, curves=True, index_ties=True)
    with pytest.warns(UserWarning, match="1 of 2 queries have no relevant item"):
        both = evaluate_codes(np.repeat(query_code, 2, axis=0), db_codes, np.concatenate([good, bad]), db_labels,
                              top_k=20, curves=True, index_ties=True)
    assert alone["map@20"] > 0 and alone["precision_at_n"][10] > 0
    for key in ("map@20", "map", "precision@r2", "chance_map@20"):
        assert both[key] == pytest.approx(alone[key] / 2), key
    for n, value in alone["precision_at_n"].items():
        assert both["precision_at_n"][n] == pytest.approx(value / 2), n
    np.testing.assert_allclose(both["pr_curve"]["precision"], np.array(alone["pr_curve"]["precision"]) / 2)
    np.testing.assert_allclose(both["pr_curve"]["recall"], alone["pr_curve"]["recall"])
    assert both["map@20_index_ties"] == pytest.approx(alone["map@20_index_ties"])
