"""Quantization-aware training and distillation on digits, exported to QDQ ONNX for ONNX Runtime."""

from __future__ import annotations

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
from digits.prepare_data import load_split  # noqa: E402

from edgeopt.builder.distill import DistillConfig, finetune  # noqa: E402
from edgeopt.builder.qat import QatConfig, QatError, export_qdq_onnx, prepare_qat, train_qat  # noqa: E402
from edgeopt.builder.traindata import TrainData  # noqa: E402

EXAMPLE = torch.zeros(1, 1, 8, 8)


@pytest.fixture(scope="module")
def digits() -> dict[str, TrainData]:
    return {name: TrainData(x, y) for name, (x, y) in load_split().items()}


@pytest.fixture(scope="module")
def teacher(digits) -> nn.Module:
    torch.manual_seed(0)
    model = digits_cnn(width=16)
    finetune(model, digits["train"], digits["val"], DistillConfig(epochs=8, lr=3e-3, progress=False))
    return model


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def test_prepare_folds_batchnorm(teacher):
    from torch.ao.quantization import FakeQuantize

    prepared = prepare_qat(teacher, EXAMPLE)

    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert sum(isinstance(m, FakeQuantize) for m in prepared.modules()) >= 8
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())


def test_qad_export_runs_in_onnxruntime(teacher, digits, tmp_path):
    prepared = prepare_qat(teacher, EXAMPLE)
    config = QatConfig(DistillConfig(epochs=2, lr=5e-4, progress=False), observer_freeze_epoch=2)
    result = train_qat(prepared, digits["train"], digits["val"], config, teacher=teacher)

    export = export_qdq_onnx(result.student, EXAMPLE, tmp_path / "qad.onnx")

    assert export.path.exists()
    assert export.quantize_nodes >= 5
    assert export.dequantize_nodes >= export.quantize_nodes
    assert not list(tmp_path.glob("*.tmp"))

    session = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    test = digits["test"]
    (onnx_logits,) = session.run(None, {"input": test.x})
    with torch.no_grad():
        torch_logits = result.student(torch.from_numpy(test.x)).numpy()
    assert np.mean(onnx_logits.argmax(1) == torch_logits.argmax(1)) > 0.98
    assert accuracy(onnx_logits, test.y) > 0.85


def test_export_fuses_to_int8_kernels(teacher, digits, tmp_path):
    prepared = prepare_qat(teacher, EXAMPLE)
    with torch.no_grad():
        prepared(torch.from_numpy(digits["train"].x[:256]))  # observers set scales from real data
    export = export_qdq_onnx(prepared, EXAMPLE, tmp_path / "qat.onnx")

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(export.path), options, providers=["CPUExecutionProvider"])

    optimized = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "QLinearConv" in optimized
    assert "Conv" not in optimized


def test_weights_stored_as_int8(teacher, digits, tmp_path):
    prepared = prepare_qat(teacher, EXAMPLE)
    sample = torch.from_numpy(digits["test"].x[:64])
    with torch.no_grad():
        prepared(sample)
    export = export_qdq_onnx(prepared, EXAMPLE, tmp_path / "qat.onnx")

    graph = onnx.load(str(export.path))
    int8_initializers = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert export.int8_weights == 4  # three convs and the classifier
    assert len(int8_initializers) == 4
    assert not any(i.name.endswith("weight") for i in graph.graph.initializer)

    session = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"input": sample.numpy()})
    with torch.no_grad():
        prepared.eval()
        torch_logits = prepared(sample).numpy()
    # ONNX Runtime's int8 kernels requantize between layers, so logits may differ by a few
    # output quantization steps (about 0.05 each here) from the fake-quant simulation.
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=0.2)
    assert np.mean(onnx_logits.argmax(1) == torch_logits.argmax(1)) > 0.95


def test_plain_qat_trains_on_labels(teacher, digits):
    prepared = prepare_qat(teacher, EXAMPLE)
    config = QatConfig(DistillConfig(epochs=2, lr=5e-4, progress=False))

    result = train_qat(prepared, digits["train"], digits["val"], config)

    assert result.score_name == "accuracy"
    assert result.best_score > 0.85


def test_untraceable_model_raises():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # control flow on a tensor value cannot be traced by torch.fx
                return self.linear(x)
            return -self.linear(x)

    with pytest.raises(QatError, match="could not trace"):
        prepare_qat(DataDependent(), torch.ones(1, 4))


def test_export_without_fake_quant_raises(tmp_path):
    graph_module = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2)))
    with warnings.catch_warnings(), pytest.raises(QatError, match="no QuantizeLinear"):
        warnings.simplefilter("ignore")
        export_qdq_onnx(graph_module, torch.ones(1, 4), tmp_path / "plain.onnx")
    assert not list(tmp_path.iterdir())
