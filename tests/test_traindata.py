"""Loading --train-data from .npz files and image folders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from edgeopt.builder.traindata import ImagePreprocess, TrainDataError, load_train_data, random_resized_crops

GRAY_8X8 = ImagePreprocess(height=8, width=8, mean=0.0, std=255.0, grayscale=True)


def write_digit_images(root, per_class: int = 3, classes=(0, 1, 2)):
    digits = load_digits()
    for label in classes:
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True)
        images = digits.images[digits.target == label][:per_class]
        for index, image in enumerate(images):
            Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f"{index}.png")


def test_npz_with_labels(tmp_path):
    path = tmp_path / "train.npz"
    np.savez(path, x=np.ones((4, 1, 8, 8), dtype=np.float64), y=np.array([0, 1, 2, 3], dtype=np.int32))

    data = load_train_data(path)

    assert data.x.dtype == np.float32
    assert data.y.dtype == np.int64
    assert data.labeled
    assert len(data) == 4


def test_npz_without_labels(tmp_path):
    path = tmp_path / "unlabeled.npz"
    np.savez(path, x=np.zeros((3, 3, 4, 4), dtype=np.float32))
    data = load_train_data(path)
    assert not data.labeled


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((2, 4))}, "no array 'x'"),
        ({"x": np.zeros((0, 4))}, "no samples"),
        ({"x": np.zeros((2, 4)), "y": np.zeros(2)}, "integers"),
        ({"x": np.zeros((2, 4)), "y": np.zeros(3, dtype=np.int64)}, "must match"),
    ],
)
def test_npz_invalid_raises(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(TrainDataError, match=message):
        load_train_data(path)


def test_image_folder_by_class(tmp_path):
    write_digit_images(tmp_path)

    data = load_train_data(tmp_path, GRAY_8X8)

    assert data.class_names == ("digit_0", "digit_1", "digit_2")
    assert data.x.shape == (9, 1, 8, 8)
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.x.min() >= 0.0
    assert data.x.max() <= 1.0


def test_flat_folder_is_unlabeled(tmp_path):
    write_digit_images(tmp_path, classes=(5,))
    data = load_train_data(tmp_path / "digit_5", ImagePreprocess(height=16, width=16))

    assert not data.labeled
    assert data.x.shape == (3, 3, 16, 16)


def test_mixed_folder_raises(tmp_path):
    write_digit_images(tmp_path, classes=(1,))
    Image.new("L", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(TrainDataError, match="both class subfolders and loose images"):
        load_train_data(tmp_path)


@pytest.mark.parametrize("name, message", [("missing", "not found"), ("data.csv", ".csv file")])
def test_bad_path_raises(tmp_path, name, message):
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(TrainDataError, match=message):
        load_train_data(tmp_path / name)


def test_empty_folder_raises(tmp_path):
    with pytest.raises(TrainDataError, match="no images"):
        load_train_data(tmp_path)


def test_split_is_disjoint(tmp_path):
    path = tmp_path / "train.npz"
    np.savez(path, x=np.arange(20, dtype=np.float32).reshape(20, 1), y=np.arange(20))

    train, val = load_train_data(path).split(0.25, seed=1)

    assert len(train) == 15
    assert len(val) == 5
    assert set(train.y.tolist()).isdisjoint(val.y.tolist())


def test_random_crops_shape_and_seed():
    from skimage import data as skimage_data

    images = [skimage_data.chelsea(), skimage_data.coffee()]
    preprocess = ImagePreprocess()

    crops = random_resized_crops(images, 6, preprocess, seed=4)

    assert crops.shape == (6, 3, 224, 224)
    assert crops.dtype == np.float32
    assert crops.min() >= -1.0
    assert crops.max() <= 1.0
    np.testing.assert_array_equal(crops, random_resized_crops(images, 6, preprocess, seed=4))
    assert not np.array_equal(crops, random_resized_crops(images, 6, preprocess, seed=5))


def test_image_folder_with_build_preprocess(tmp_path):
    from edgeopt.builder.data import Preprocess

    write_digit_images(tmp_path, classes=(3, 4))
    data = load_train_data(tmp_path, Preprocess(size=(16, 16), mean=(127.0,) * 3, std=(128.0,) * 3))

    assert data.x.shape == (6, 3, 16, 16)
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1]
