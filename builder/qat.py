"""Quantization-aware training (QAT) and distillation (QAD), exported to QDQ ONNX.

Recipe (checked with torch 2.13 and onnxruntime 1.32):

1. Fold BatchNorm into the preceding conv in eval mode (``fuse_fx``), so the exported graph has
   plain Conv nodes that ONNX Runtime fuses into QLinearConv. Training then fine-tunes the
   folded weights with no BatchNorm statistics left to update.
2. ``prepare_qat_fx`` with plain ``FakeQuantize`` modules: uint8 per-tensor affine activations
   and int8 per-channel symmetric weights (the format ONNX Runtime's x86 and Arm int8 kernels
   take). The fused default fake-quant op does not export to ONNX.
3. Train with cross-entropy (QAT) or with the distillation loss against a teacher (QAD),
   freezing the observers after a few epochs so scales settle while weights keep adapting.
4. Disable the observers, switch to eval mode and export with the TorchScript-based exporter
   (``dynamo=False``), which writes each fake-quant op as a QuantizeLinear/DequantizeLinear pair.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeopt.builder.distill import DistillConfig, DistillResult, distill, finetune
from edgeopt.builder.traindata import TrainData

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


class QatError(RuntimeError):
    """The model could not be prepared for, or exported after, quantization-aware training."""


@dataclass
class QatConfig:
    """Quantization-aware training settings on top of the training-loop settings."""

    train: DistillConfig
    observer_freeze_epoch: int = 3  # observers stop updating scales from this epoch on (1-based)
    per_channel_weights: bool = True


@dataclass
class QdqExport:
    """A QDQ ONNX file written from a QAT model and its node counts."""

    path: Path
    quantize_nodes: int
    dequantize_nodes: int
    op_counts: dict[str, int]
    int8_weights: int  # weights stored as int8 initializers instead of float plus QuantizeLinear


def qat_qconfig_mapping(per_channel_weights: bool = True):
    """Return a QConfigMapping with plain FakeQuantize modules that export to QDQ ONNX."""
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        QConfig,
        QConfigMapping,
    )

    activation = FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )
    if per_channel_weights:
        weight = FakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        )
    else:
        weight = FakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric,
        )
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


def prepare_qat(model: nn.Module, example_inputs: torch.Tensor, per_channel_weights: bool = True) -> torch.fx.GraphModule:
    """Return a fake-quantized copy of ``model`` with BatchNorm folded, ready for training."""
    from torch.ao.quantization.quantize_fx import fuse_fx, prepare_qat_fx

    model = copy.deepcopy(model).eval()
    try:
        fused = fuse_fx(model)
        fused.train()
        prepared = prepare_qat_fx(fused, qat_qconfig_mapping(per_channel_weights), (example_inputs,))
    except (torch.fx.proxy.TraceError, RuntimeError, TypeError, NotImplementedError) as exc:
        raise QatError(f"torch.fx could not trace the model for quantization-aware training: {exc}") from exc
    log.info("prepared model for quantization-aware training (%d fake-quant modules)", _count_fake_quant(prepared))
    return prepared


def train_qat(
    prepared: torch.fx.GraphModule,
    train: TrainData,
    val: TrainData,
    config: QatConfig,
    teacher: nn.Module | None = None,
    progress_bar=None,
) -> DistillResult:
    """Train a prepared model: quantization-aware distillation with ``teacher``, else plain QAT on labels.

    ``progress_bar`` is an already running ``rich.progress.Progress`` to report into, as in ``distill``.
    """
    from torch.ao.quantization import disable_observer, enable_observer

    def on_epoch_start(epoch: int, model: nn.Module) -> None:
        if epoch >= config.observer_freeze_epoch:
            model.apply(disable_observer)
        else:
            model.apply(enable_observer)

    if teacher is not None:
        return distill(prepared, teacher, train, val, config.train, on_epoch_start=on_epoch_start, progress_bar=progress_bar)
    return finetune(prepared, train, val, config.train, on_epoch_start=on_epoch_start, progress_bar=progress_bar)


def export_qdq_onnx(
    prepared: torch.fx.GraphModule,
    example_inputs: torch.Tensor,
    path: str | Path,
    input_name: str = "input",
    output_name: str = "logits",
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> QdqExport:
    """Export a trained fake-quantized model to QDQ ONNX and check that ONNX Runtime loads it."""
    import onnx
    import onnxruntime as ort
    from torch.ao.quantization import disable_observer

    path = Path(path)
    model = copy.deepcopy(prepared)
    model.apply(disable_observer)
    model.eval()

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        torch.onnx.export(
            model,
            (example_inputs,),
            str(temporary),
            dynamo=False,
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None,
        )
        graph = onnx.load(str(temporary))
        folded = fold_weight_quantization(graph)
        onnx.save(graph, str(temporary))
        op_counts = Counter(node.op_type for node in graph.graph.node)
        if op_counts["QuantizeLinear"] == 0:
            raise QatError("the exported graph has no QuantizeLinear nodes; the model was not fake-quantized")
        try:
            ort.InferenceSession(str(temporary), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception classes per failure kind
            raise QatError(f"onnxruntime could not load the QDQ export: {exc}") from exc
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)

    log.info(
        "wrote QDQ ONNX %s: %d QuantizeLinear, %d DequantizeLinear, %d int8 weights stored",
        path, op_counts["QuantizeLinear"], op_counts["DequantizeLinear"], folded,
    )
    return QdqExport(path, op_counts["QuantizeLinear"], op_counts["DequantizeLinear"], dict(op_counts), folded)


def fold_weight_quantization(model) -> int:
    """Store each quantized weight as an int8 initializer in place of float weight + QuantizeLinear.

    The exporter writes ``float weight -> QuantizeLinear -> DequantizeLinear``, which keeps the
    float weights in the file. Running each weight's QuantizeLinear once (with ONNX's reference
    evaluator, so rounding and saturation follow the ONNX spec) leaves the same
    ``DequantizeLinear`` input as ONNX Runtime PTQ writes, at a quarter of the weight bytes.
    Returns the number of weights folded.
    """
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers = Counter(name for node in graph.node for name in node.input)
    folded = 0

    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or not all(name in initializers for name in node.input):
            continue
        evaluator = ReferenceEvaluator(
            helper.make_model(
                helper.make_graph(
                    [node],
                    "fold",
                    [],
                    [helper.make_tensor_value_info(node.output[0], 0, None)],
                    [initializers[name] for name in node.input],
                ),
                opset_imports=list(model.opset_import),
            )
        )
        (quantized,) = evaluator.run(None, {})
        quantized_name = node.output[0]
        graph.initializer.append(numpy_helper.from_array(quantized, quantized_name))
        graph.node.remove(node)
        folded += 1

        weight_name = node.input[0]
        consumers[weight_name] -= 1
        if consumers[weight_name] == 0:
            graph.initializer.remove(initializers.pop(weight_name))
    return folded


def _count_fake_quant(model: nn.Module) -> int:
    from torch.ao.quantization import FakeQuantizeBase

    return sum(isinstance(module, FakeQuantizeBase) for module in model.modules())
