"""Which rows are queries and which samples are drawn (tbhvae.protocol)."""
import numpy as np
import pytest

from tbhvae.protocol import relevant, stratified_sample


def test_a_stratified_sample_keeps_the_class_shares_of_a_class_sorted_file():
    labels = np.repeat(np.arange(4), [500, 300, 150, 50])  # sorted by class, as the CIFAR files
    rows = stratified_sample(labels, 100, seed=3)
    assert len(rows) == 100 and len(np.unique(rows)) == 100 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(np.bincount(labels[rows]), [50, 30, 15, 5])
    np.testing.assert_array_equal(rows, stratified_sample(labels, 100, seed=3))
    assert not np.array_equal(rows, stratified_sample(labels, 100, seed=4))
    # shares that do not divide evenly: exactly `count` rows, every class within one of its share
    odd = stratified_sample(labels, 7)
    assert len(odd) == 7 and np.all(np.abs(np.bincount(labels[odd], minlength=4) - 7 * np.array([.5, .3, .15, .05]))
                                    < 1)
    np.testing.assert_array_equal(stratified_sample(labels, 5000), np.arange(1000))  # more than there are


def test_a_stratified_sample_of_multi_hot_rows_follows_their_first_label():
    labels = np.zeros((40, 3), np.uint8)
    labels[:30, 0] = 1
    labels[30:, 2] = 1
    labels[::2, 1] = 1
    rows = stratified_sample(labels, 8)
    assert np.bincount(np.argmax(labels[rows], axis=1), minlength=3).tolist() == [6, 1, 1]  # 30, 5, 5 rows


@pytest.mark.parametrize("multi_hot", [False, True])
def test_relevance_is_a_shared_class_or_label(multi_hot):
    if multi_hot:
        queries, results = np.array([[1, 0, 1]]), np.array([[[0, 1, 0], [0, 0, 1]]])
    else:
        queries, results = np.array([2]), np.array([[1, 2]])
    np.testing.assert_array_equal(relevant(queries, results), [[False, True]])
