"""Model spec parsing and loading, and calibration/evaluation data loading."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import TESTS
from edgeopt.builder.data import Dataset, Preprocess, check_input_shapes, load_dataset, split_calibration_evaluation
from edgeopt.builder.errors import BuildInputError
from edgeopt.builder.modelspec import load_source_model, parse_model_spec

TINY = TESTS / "models" / "tiny_cnn.py"


def test_parse_factory_file():
    spec = parse_model_spec(f"{TINY}:tiny_cnn")
    assert spec.kind == "factory-file"
    assert spec.function == "tiny_cnn"
    assert spec.default_name == "tiny-cnn"


def test_parse_factory_module():
    spec = parse_model_spec("examples.efficientnet_lite0:efficientnet_lite0")
    assert spec.kind == "factory-module"
    assert spec.module == "examples.efficientnet_lite0"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("model", "malformed"),
        ("file.py:", "malformed"),
        ("missing.py:factory", "not found"),
        ("missing.onnx", "not found"),
        ("not a module:factory", "neither"),
    ],
)
def test_parse_rejects_bad_specs(value, message):
    with pytest.raises(BuildInputError, match=message):
        parse_model_spec(value)


def test_factory_that_raises_is_reported():
    with pytest.raises(BuildInputError, match="raised RuntimeError: weights file missing"):
        load_source_model(parse_model_spec(f"{TINY}:broken_factory"))


def test_factory_returning_non_module_is_reported():
    with pytest.raises(BuildInputError, match="expected a torch.nn.Module"):
        load_source_model(parse_model_spec(f"{TINY}:not_a_module"))


def test_missing_function_is_reported():
    with pytest.raises(BuildInputError, match="'nope' is not a callable"):
        load_source_model(parse_model_spec(f"{TINY}:nope"))


def test_factory_attributes_are_kept():
    source = load_source_model(parse_model_spec(f"{TINY}:tiny_cnn"))
    assert source.attributes["input_shape"] == (1, 1, 8, 8)
    assert len(source.sha256) == 64


def test_torchscript_file_loads(tmp_path):
    import torch

    module = torch.jit.script(torch.nn.Linear(4, 2))
    path = tmp_path / "linear.pt"
    torch.jit.save(module, str(path))
    source = load_source_model(parse_model_spec(str(path)))
    assert source.module is not None


def test_non_torchscript_pt_is_reported(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"not a zip")
    with pytest.raises(BuildInputError, match="not a TorchScript file"):
        load_source_model(parse_model_spec(str(path)))


def test_invalid_onnx_is_reported(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(BuildInputError, match="is invalid"):
        load_source_model(parse_model_spec(str(path)))


def test_load_npy(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 3), np.float32))
    dataset = load_dataset(tmp_path / "x.npy", ["input"])
    assert len(dataset) == 5
    assert dataset.labels is None


def test_load_npz_with_labels(tmp_path):
    np.savez(tmp_path / "d.npz", input=np.zeros((4, 3), np.float32), labels=np.arange(4))
    dataset = load_dataset(tmp_path / "d.npz", ["input"])
    assert list(dataset.labels) == [0, 1, 2, 3]


def test_npz_missing_input_named(tmp_path):
    np.savez(tmp_path / "d.npz", other=np.zeros((4, 3), np.float32))
    with pytest.raises(BuildInputError, match="no array for input 'input'"):
        load_dataset(tmp_path / "d.npz", ["input"])


def test_empty_data_rejected(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), np.float32))
    with pytest.raises(BuildInputError, match="is empty"):
        load_dataset(tmp_path / "empty.npy", ["input"])


def test_missing_data_path_rejected(tmp_path):
    with pytest.raises(BuildInputError, match="not found"):
        load_dataset(tmp_path / "nothing.npy", ["input"])


def test_image_folder_with_preprocess_and_labels(tmp_path):
    from skimage import data

    for label, image in (("281", data.chelsea()), ("0", data.coffee())):
        (tmp_path / label).mkdir()
        Image.fromarray(image).save(tmp_path / label / "photo.png")
    preprocess = Preprocess(size=(32, 32), mean=(127, 127, 127), std=(128, 128, 128))
    dataset = load_dataset(tmp_path, ["input"], preprocess)
    assert dataset.inputs["input"].shape == (2, 3, 32, 32)
    assert sorted(dataset.labels.tolist()) == [0, 281]
    assert dataset.inputs["input"].min() >= -1.0
    assert dataset.inputs["input"].max() <= 1.0


def test_image_folder_without_preprocess_rejected(tmp_path):
    from skimage import data

    Image.fromarray(data.chelsea()).save(tmp_path / "cat.png")
    with pytest.raises(BuildInputError, match="no preprocessing is declared"):
        load_dataset(tmp_path, ["input"])


def test_wrong_sample_shape_rejected():
    dataset = Dataset({"input": np.zeros((3, 3, 32, 32), np.float32)}, None, "data.npy")
    with pytest.raises(BuildInputError, match="expects N x 3x224x224"):
        check_input_shapes(dataset, {"input": (-1, 3, 224, 224)}, {"input": np.dtype(np.float32)})


def test_split_is_disjoint_and_complete():
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    calib, evaluation = split_calibration_evaluation(Dataset({"input": x}, None, "x"), None)
    assert len(calib) + len(evaluation) == 10
    assert not set(calib.fingerprints()) & set(evaluation.fingerprints())


def test_overlapping_sets_rejected():
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    calib = Dataset({"input": x[:6]}, None, "calib.npy")
    evaluation = Dataset({"input": x[4:]}, None, "eval.npy")
    with pytest.raises(BuildInputError, match="2 sample"):
        split_calibration_evaluation(calib, evaluation)
