"""Image sources: JPEG .npz files and TFDS (mocked, no download).

The JPEG files are the real CIFAR-10 / COCO ones of ../shared/data where present and
synthetic files of the same layout otherwise (fixtures `cifar_jpeg`, `coco_jpeg` in conftest).
"""
import io
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tbhvae.data.features import DataError
from tbhvae.data.images import ImageSource, JpegNpzSource, TfdsSource, image_source


def jpeg_subset(source: Path, count: int) -> dict:
    """First `count` images of each split of a JPEG .npz, as the arrays of a new .npz."""
    arrays = {}
    with np.load(source) as data:
        for split in ("train", "test"):
            offsets = data[f"{split}_offsets"][:count + 1]
            arrays[f"{split}_bytes"] = data[f"{split}_bytes"][:offsets[-1]]
            arrays[f"{split}_offsets"] = offsets
            arrays[f"{split}_labels"] = data[f"{split}_labels"][:count]
        arrays["class_names"] = data["class_names"]
    return arrays


def test_cifar_jpeg_npz_yields_decoded_images_and_class_ids(cifar_jpeg):
    source = image_source(str(cifar_jpeg), "test")
    with np.load(cifar_jpeg) as data:
        count = len(data["test_labels"])
        expected_labels = data["test_labels"][:6]
        first_jpeg = data["test_bytes"][:data["test_offsets"][1]].tobytes()
    assert count in (10000, 100)  # the real test split, or the synthetic one
    assert (source.num_examples, source.num_classes, source.multi_label) == (count, 10, False)
    assert source.class_names[0] == "airplane" and len(source.class_names) == 10
    images, labels = zip(*[(im.numpy(), lab.numpy()) for im, lab in source.dataset().take(6)])
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images)
    np.testing.assert_array_equal(labels, expected_labels)
    # libjpeg's accurate DCT, as PIL decodes (TF's default fast DCT differs by a few levels)
    accurate = tf.io.decode_jpeg(first_jpeg, channels=3, dct_method="INTEGER_ACCURATE").numpy()
    np.testing.assert_array_equal(images[0], accurate)
    from PIL import Image
    np.testing.assert_array_equal(images[0], np.asarray(Image.open(io.BytesIO(first_jpeg)).convert("RGB")))
    # pixel statistics of photos (or textured synthetic images), not a blank decode
    assert 40 < np.mean(images) < 200 and np.std(images) > 20


def test_start_skips_images_in_order(cifar_jpeg):
    source = image_source(str(cifar_jpeg), "test")
    full = [im.numpy() for im, _ in source.dataset().take(5)]
    skipped = [im.numpy() for im, _ in source.dataset(start=3).take(2)]
    np.testing.assert_array_equal(skipped[0], full[3])
    np.testing.assert_array_equal(skipped[1], full[4])
    assert not np.array_equal(full[3], full[4])
    assert len(list(source.dataset(start=source.num_examples - 1))) == 1
    assert len(list(source.dataset(start=source.num_examples))) == 0


def test_coco_jpeg_npz_has_variable_sizes_and_multi_hot_labels(coco_jpeg):
    source = image_source(str(coco_jpeg), "train")
    with np.load(coco_jpeg) as data:
        expected = data["train_labels"]
    count = len(expected)
    assert count in (128, 64)  # the real train split, or the synthetic one
    assert (source.num_examples, source.num_classes, source.multi_label) == (count, 80, True)
    pairs = [(im.numpy(), lab.numpy()) for im, lab in source.dataset()]
    assert len(pairs) == count
    assert len({im.shape for im, _ in pairs}) > 1
    assert all(im.ndim == 3 and im.shape[2] == 3 and max(im.shape[:2]) <= 160 for im, _ in pairs)
    labels = np.stack([lab for _, lab in pairs])
    assert labels.dtype == np.uint8 and (labels.sum(axis=1) > 1).any()
    np.testing.assert_array_equal(labels, expected)


def _write(path: Path, arrays: dict) -> Path:
    np.savez(path, **arrays)
    return path


def _bad_offsets_not_monotone(a):
    a["train_offsets"] = a["train_offsets"].copy()
    a["train_offsets"][2] = a["train_offsets"][1]


def _bad_offsets_end(a):
    a["train_bytes"] = np.concatenate([a["train_bytes"], np.zeros(5, np.uint8)])


def _bad_label_count(a):
    a["train_labels"] = a["train_labels"][:-1]


def _bad_class_names(a):
    a["class_names"] = a["class_names"][:79]


def _bad_missing_key(a):
    del a["train_offsets"]


def _bad_labels_not_binary(a):
    a["train_labels"] = a["train_labels"] * 2


@pytest.mark.parametrize("corrupt, words", [
    (_bad_offsets_not_monotone, ["train_offsets", "strictly increasing", "image 1"]),
    (_bad_offsets_end, ["train_offsets", "len(train_bytes)"]),
    (_bad_label_count, ["train_labels", "3 rows", "4 images"]),
    (_bad_class_names, ["train_labels", "80 classes", "class_names"]),
    (_bad_missing_key, ["missing key", "train_offsets"]),
    (_bad_labels_not_binary, ["train_labels", "multi-hot"]),
])
def test_jpeg_npz_validation_names_file_and_key(tmp_path, coco_jpeg, corrupt, words):
    arrays = jpeg_subset(coco_jpeg, 4)
    corrupt(arrays)
    path = _write(tmp_path / "bad.npz", arrays)
    with pytest.raises(DataError) as caught:
        JpegNpzSource(path, "train")
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message


def test_jpeg_npz_missing_file_and_unknown_split(tmp_path, coco_jpeg):
    with pytest.raises(DataError, match="not found"):
        image_source(str(tmp_path / "nothing.npz"), "train")
    path = _write(tmp_path / "ok.npz", jpeg_subset(coco_jpeg, 2))
    with pytest.raises(DataError, match="unknown split 'validation'"):
        image_source(str(path), "validation")


def test_tfds_cifar10_with_mock_data(online):
    with tfds.testing.mock_data(num_examples=7):
        source = image_source("tfds:cifar10", "train")
        pairs = [(im.numpy(), lab.numpy()) for im, lab in source.dataset()]
        later = [im.numpy() for im, _ in source.dataset(start=5)]
    assert (source.num_classes, source.multi_label, len(source.class_names)) == (10, False, 10)
    assert len(pairs) == 7 and len(later) == 2
    np.testing.assert_array_equal(later[0], pairs[5][0])
    for image, label in pairs:
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert label.dtype == np.int64 and 0 <= label < 10


def _mock_coco(requested_splits: list, objects_per_image: list[list[int]]):
    """as_dataset_fn for mock_data: one encoded JPEG per entry, with those object class ids."""
    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        requested_splits.append(split)
        rng = np.random.RandomState(0)
        examples = []
        for index, ids in enumerate(objects_per_image):
            pixels = rng.randint(0, 256, (20 + index, 30, 3)).astype(np.uint8)
            examples.append((tf.io.encode_jpeg(pixels).numpy(), np.array(ids, np.int64)))

        def generate():
            for encoded, ids in examples:
                yield {"image": encoded, "objects": {"label": ids}}

        return tf.data.Dataset.from_generator(generate, output_signature={
            "image": tf.TensorSpec([], tf.string),
            "objects": {"label": tf.TensorSpec([None], tf.int64)}})
    return as_dataset


def test_tfds_coco_multi_hot_drops_images_without_objects(online):
    requested = []
    objects = [[3, 3, 17], [], [0, 79], [45]]
    with tfds.testing.mock_data(as_dataset_fn=_mock_coco(requested, objects)):
        source = image_source("tfds:coco/2017", "test")
        pairs = [(im.numpy(), lab.numpy()) for im, lab in source.dataset()]
        skipped = [lab.numpy() for _, lab in source.dataset(start=1)]
    assert requested == ["validation", "validation"]  # COCO's test split has no labels
    assert (source.num_classes, source.multi_label) == (80, True)
    assert len(source.class_names) == 80
    assert [im.shape for im, _ in pairs] == [(20, 30, 3), (22, 30, 3), (23, 30, 3)]
    labels = np.stack([lab for _, lab in pairs])
    assert labels.shape == (3, 80) and labels.dtype == np.uint8
    assert [list(np.flatnonzero(row)) for row in labels] == [[3, 17], [0, 79], [45]]
    np.testing.assert_array_equal(np.stack(skipped), labels[1:])


def test_tfds_download_failure_gives_one_line_offline_hint(tmp_path, monkeypatch, online):
    def offline(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'\nmore detail")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(DataError) as caught:
        image_source("tfds:cifar10", "train", data_dir=str(tmp_path))
    message = str(caught.value)
    assert "\n" not in message
    for words in ("tfds:cifar10", str(tmp_path), "ConnectionError", "--features", "--images", "--data_dir"):
        assert words in message


def test_tfds_without_download_and_unprepared(tmp_path):
    with pytest.raises(DataError, match="not prepared"):
        TfdsSource("cifar10", "train", data_dir=str(tmp_path), download=False)


def test_tfds_unknown_dataset():
    with pytest.raises(DataError, match="tfds:no_such_dataset_xyz"):
        image_source("tfds:no_such_dataset_xyz", "train")


def test_a_row_selection_resumes_within_the_selected_rows():
    class Grey(ImageSource):  # image i is a uniform grey of value i
        def __init__(self):
            super().__init__("grey", None, 3, False, 10)

        def encoded(self):
            files = [tf.io.encode_png(np.full((4, 4, 3), i, np.uint8)).numpy() for i in range(10)]
            return tf.data.Dataset.from_tensor_slices((files, np.arange(10) % 3))

    source = Grey()
    seen = [(int(image[0, 0, 0]), int(label)) for image, label in source.dataset(1, np.array([2, 5, 9]))]
    assert seen == [(5, 2), (9, 0)]  # rows 2, 5, 9; the first (row 2) done before the resume
    assert [int(image[0, 0, 0]) for image, _ in source.dataset(0, np.array([0, 9]))] == [0, 9]
    np.testing.assert_array_equal(source.labels(), np.arange(10) % 3)
