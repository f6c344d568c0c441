"""Produce candidate artifacts with ONNX Runtime's quantization tools, per the device recipe."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeopt.builder.data import Dataset
from edgeopt.devices.profiles import QuantCandidate

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8
# Percentile calibration keeps this share of each activation histogram and clips the rest.
CALIBRATION_PERCENTILE = 99.999


class DatasetReader:
    """Feeds a Dataset to ONNX Runtime calibration in fixed-size batches.

    Implements the ``CalibrationDataReader`` protocol (``get_next`` returning None at the end,
    ``rewind`` to start over), which both calibration and the QDQ debugging tools consume.
    """

    def __init__(self, dataset: Dataset, batch_size: int = CALIBRATION_BATCH, limit: int | None = None):
        self.dataset = dataset
        self.batch_size = batch_size
        self.count = min(len(dataset), limit) if limit else len(dataset)
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.count:
            return None
        stop = min(self.position + self.batch_size, self.count)
        batch = self.dataset.batch(self.position, stop)
        self.position = stop
        return batch

    def rewind(self) -> None:
        self.position = 0

    def __iter__(self):
        self.rewind()
        return self

    def __next__(self):
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch


def _even_batch_size(count: int, largest: int = CALIBRATION_BATCH) -> int:
    """Return the largest batch size up to ``largest`` that divides ``count``.

    ONNX Runtime's histogram calibrators (entropy, percentile) stack the outputs of all
    batches into one array, which fails when the last batch is shorter.
    """
    return next(size for size in range(min(largest, count), 0, -1) if count % size == 0)


_QUANT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class QuantizationSettings:
    """The quantize_static arguments a candidate maps to, as recorded in the manifest recipe."""

    candidate: QuantCandidate
    nodes_to_exclude: tuple[str, ...] = ()

    def to_recipe(self) -> dict:
        c = self.candidate
        recipe = {"candidate": c.id, "precision": c.precision, "method": c.method}
        if c.method == "static":
            recipe.update(
                {
                    "tool": "onnxruntime.quantization.quantize_static",
                    "format": c.quant_format,
                    "activation_type": c.activation_type,
                    "weight_type": c.weight_type,
                    "per_channel": c.per_channel,
                    "reduce_range": c.reduce_range,
                    "activation_symmetric": c.activation_symmetric,
                    "weight_symmetric": c.weight_symmetric,
                    "calibration": c.calibration,
                    "excluded_nodes": list(self.nodes_to_exclude),
                }
            )
            if c.calibration == "percentile":
                recipe["calibration_percentile"] = CALIBRATION_PERCENTILE
        elif c.method == "fp16":
            recipe.update({"tool": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True})
        elif c.method == "dynamic":
            recipe.update({"tool": "onnxruntime.quantization.quantize_dynamic", "weight_type": c.weight_type, "per_channel": c.per_channel, "reduce_range": c.reduce_range})
        return recipe


def prepare_for_quantization(fp32_path: Path, destination: Path) -> Path:
    """Run ONNX Runtime's quantization pre-processing (shape inference) on an optimised graph."""
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(fp32_path), str(destination), skip_optimization=True)
    except Exception as exc:  # symbolic shape inference fails on some graphs; calibration still works without it
        log.warning("quantization pre-processing failed (%s); quantizing the graph as is", exc)
        import shutil

        shutil.copyfile(fp32_path, destination)
    return destination


def build_candidate(settings: QuantizationSettings, fp32_path: Path, prepared_path: Path, destination: Path, calibration: Dataset) -> Path:
    """Write the candidate artifact for ``settings`` to ``destination``."""
    candidate = settings.candidate
    if candidate.method == "none":
        import shutil

        shutil.copyfile(fp32_path, destination)
        return destination

    if candidate.method == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        onnx.save_model(model, str(destination))
        return destination

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic
    from onnxruntime.quantization import quantize_static as _quantize_static

    if candidate.method == "dynamic":
        quantize_dynamic(
            str(prepared_path),
            str(destination),
            per_channel=candidate.per_channel,
            reduce_range=candidate.reduce_range,
            weight_type=getattr(QuantType, _QUANT_TYPES[candidate.weight_type]),
        )
        return destination

    extra_options = {
        "ActivationSymmetric": candidate.activation_symmetric,
        "WeightSymmetric": candidate.weight_symmetric,
    }
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[candidate.calibration]
    if candidate.calibration == "percentile":
        extra_options["CalibPercentile"] = CALIBRATION_PERCENTILE

    # Calibration prints progress with print(); keep it out of the CLI's output.
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        _quantize_static(
            str(prepared_path),
            str(destination),
            DatasetReader(calibration, batch_size=_even_batch_size(len(calibration))),
            quant_format=QuantFormat.QDQ if candidate.quant_format == "QDQ" else QuantFormat.QOperator,
            per_channel=candidate.per_channel,
            reduce_range=candidate.reduce_range,
            activation_type=getattr(QuantType, _QUANT_TYPES[candidate.activation_type]),
            weight_type=getattr(QuantType, _QUANT_TYPES[candidate.weight_type]),
            nodes_to_exclude=list(settings.nodes_to_exclude),
            calibrate_method=method,
            extra_options=extra_options,
        )
    log.debug("calibration output for %s: %s", candidate.id, captured.getvalue().strip())
    return destination


@dataclass(frozen=True)
class NodeSensitivity:
    """How much quantizing one activation tensor hurts, as a signal-to-quantization-noise ratio."""

    tensor: str
    sqnr_db: float
    nodes: tuple[str, ...]


def rank_sensitive_nodes(prepared_path: Path, qdq_path: Path, samples: Dataset, limit: int = 8) -> list[NodeSensitivity]:
    """Rank activations of a QDQ model by their quantization SQNR, worst first.

    Uses ONNX Runtime's ``qdq_loss_debug`` tools: both models are augmented to output every
    intermediate tensor, run on ``limit`` samples, and each activation's value before
    QuantizeLinear is compared with its value after DequantizeLinear. Only outputs of
    weighted operators are ranked, because that is where quantization error enters: an
    activation the quantizer folds into the preceding output scale (Clip, Relu) has no
    tensor of its own in the QDQ model, so its matched SQNR means nothing. The weighted
    nodes that produce the worst tensors, and their consumers, are kept in float.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    with tempfile.TemporaryDirectory(prefix="edgeopt-sensitivity-") as scratch:
        augmented_qdq = Path(scratch) / "qdq_augmented.onnx"
        augmented_float = Path(scratch) / "float_augmented.onnx"
        modify_model_output_intermediate_tensors(str(qdq_path), str(augmented_qdq))
        modify_model_output_intermediate_tensors(str(prepared_path), str(augmented_float))
        qdq_activations = collect_activations(str(augmented_qdq), DatasetReader(samples, batch_size=1, limit=limit))
        float_activations = collect_activations(str(augmented_float), DatasetReader(samples, batch_size=1, limit=limit))

    errors = compute_activation_error(create_activation_matching(qdq_activations, float_activations))

    graph = onnx.load(str(prepared_path), load_external_data=False).graph
    producers: dict[str, str] = {}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for output in node.output:
            if node.op_type in WEIGHTED_OPS:
                producers[output] = node.name
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)

    ranked = []
    for tensor, error in errors.items():
        sqnr = error.get("qdq_err")
        if sqnr is None or not math.isfinite(sqnr):
            continue
        if tensor not in producers:
            continue
        nodes = tuple(n for n in [producers[tensor], *consumers.get(tensor, [])] if n)
        if nodes:
            ranked.append(NodeSensitivity(tensor, float(sqnr), nodes))
    ranked.sort(key=lambda item: item.sqnr_db)
    return ranked


def exclusion_steps(ranked: list[NodeSensitivity], fractions: tuple[float, ...]) -> list[tuple[str, ...]]:
    """Return growing node-exclusion lists covering the worst ``fraction`` of ranked tensors."""
    steps = []
    for fraction in fractions:
        count = max(1, int(math.ceil(len(ranked) * fraction)))
        nodes: list[str] = []
        for item in ranked[:count]:
            nodes.extend(n for n in item.nodes if n not in nodes)
        if nodes and (not steps or tuple(nodes) != steps[-1]):
            steps.append(tuple(nodes))
    return steps
