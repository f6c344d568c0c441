"""Count multiply-accumulates (MACs) and parameters from an exported ONNX graph.

Counting on the exported graph measures what a runtime executes, whatever Python classes the
source model used. Module-hook counters miss subclasses: Torch-Pruning 1.6.1 matches
``type(module)`` exactly against ``nn.Conv2d``, so EfficientNet-Lite's
``Conv2dStaticSamePadding`` layers are skipped and Lite0 is reported at about 21 M MACs
instead of about 390 M.

Only the dense compute ops are counted (Conv, ConvTranspose, Gemm, MatMul and their
integer/QLinear forms). Bias additions, normalization, activations and pooling are left out,
which is the usual MAC convention for CNNs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

log = logging.getLogger(__name__)

# Input index of the weight tensor for each conv-like op type.
_CONV_WEIGHT_INDEX = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}

# Input indexes of the two matrix operands for each matmul-like op type.
_MATMUL_OPERANDS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}

# Inputs of QuantizeLinear/DequantizeLinear at these indexes are scales and zero points, not weights.
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


class MacCountError(ValueError):
    """The graph lacks a shape needed to count the MACs of one node."""


@dataclass
class GraphCost:
    """MACs and parameters of one ONNX graph, for the batch size the graph was exported with."""

    macs: int
    parameters: int
    batch_size: int
    macs_by_op_type: dict[str, int] = field(default_factory=dict)
    macs_by_node: dict[str, int] = field(default_factory=dict)

    @property
    def macs_per_sample(self) -> int:
        return self.macs // max(self.batch_size, 1)


def count_onnx_cost(model: onnx.ModelProto | str | Path, dynamic_batch: int = 1) -> GraphCost:
    """Count MACs and parameters of ``model``.

    A symbolic batch dimension on the first graph input is fixed to ``dynamic_batch`` before
    shape inference, so MACs are counted for that many samples.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))

    model = _fix_symbolic_batch(model, dynamic_batch)
    inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    try:
        by_node = _macs_by_node(inferred)
    except MacCountError as exc:
        # ONNX shape inference stops at shapes computed at run time, such as the Pad amounts
        # of TensorFlow-style "same" padding. ONNX Runtime's symbolic shape inference
        # propagates those constants.
        log.debug("onnx shape inference left a shape unknown (%s); retrying with symbolic shape inference", exc)
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        by_node = _macs_by_node(inferred)

    by_op: dict[str, int] = {}
    for name, macs in by_node.items():
        op_type = name.split("|", 1)[0]
        by_op[op_type] = by_op.get(op_type, 0) + macs
    by_node = {name.split("|", 1)[1]: macs for name, macs in by_node.items()}

    batch_size = _first_input_batch(inferred)
    total = sum(by_node.values())
    parameters = count_onnx_parameters(inferred)
    log.debug("counted %d MACs and %d parameters in %d compute nodes", total, parameters, len(by_node))
    return GraphCost(total, parameters, batch_size, by_op, by_node)


def _macs_by_node(model: onnx.ModelProto) -> dict[str, int]:
    """Map ``"<op type>|<node name>"`` to the MACs of each compute node."""
    shapes = _collect_shapes(model)
    by_node = {}
    for index, node in enumerate(model.graph.node):
        macs = _node_macs(node, shapes)
        if macs is not None:
            by_node[f"{node.op_type}|{node.name or f'{node.op_type}_{index}'}"] = macs
    return by_node


def count_onnx_parameters(model: onnx.ModelProto) -> int:
    """Count initializer elements, leaving out QDQ scales and zero points."""
    qdq_side_inputs = set()
    for node in model.graph.node:
        if node.op_type in _QDQ_OPS:
            qdq_side_inputs.update(node.input[1:])

    total = 0
    for initializer in model.graph.initializer:
        if initializer.name in qdq_side_inputs:
            continue
        total += int(np.prod(initializer.dims, dtype=np.int64))
    return total


def _fix_symbolic_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializer_names = {i.name for i in model.graph.initializer}
    for graph_input in model.graph.input:
        if graph_input.name in initializer_names:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    return model


def _first_input_batch(model: onnx.ModelProto) -> int:
    initializer_names = {i.name for i in model.graph.initializer}
    for graph_input in model.graph.input:
        if graph_input.name in initializer_names:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            return int(dims[0].dim_value)
    return 1


def _collect_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    shapes: dict[str, tuple[int | None, ...]] = {}
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    for value in values:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    for initializer in model.graph.initializer:
        shapes[initializer.name] = tuple(int(d) for d in initializer.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    shapes[node.output[0]] = tuple(numpy_helper.to_array(attribute.t).shape)
    return shapes


def _known_shape(shapes: dict, name: str, node: onnx.NodeProto) -> tuple[int, ...]:
    shape = shapes.get(name)
    if shape is None or any(d is None for d in shape):
        raise MacCountError(
            f"shape of tensor {name!r} (input or output of {node.op_type} node {node.name!r}) is unknown; "
            "export the model with static input shapes"
        )
    return shape  # type: ignore[return-value]


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return default


def _node_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    op = node.op_type

    if op in _CONV_WEIGHT_INDEX:
        # Each output element takes (input channels per group) x (kernel area) MACs, and the
        # weight shape (Cout, Cin/group, k...) stores exactly that product after its first dim.
        weight = _known_shape(shapes, node.input[_CONV_WEIGHT_INDEX[op]], node)
        output = _known_shape(shapes, node.output[0], node)
        return int(np.prod(output, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))

    if op == "ConvTranspose":
        # Every input element is scattered through (Cout/group) x (kernel area) weights, which is
        # the weight shape (Cin, Cout/group, k...) after its first dim.
        data = _known_shape(shapes, node.input[0], node)
        weight = _known_shape(shapes, node.input[1], node)
        return int(np.prod(data, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))

    if op == "Gemm":
        a = _known_shape(shapes, node.input[0], node)
        b = _known_shape(shapes, node.input[1], node)
        rows = a[1] if _attribute(node, "transA", 0) else a[0]
        inner = a[0] if _attribute(node, "transA", 0) else a[1]
        columns = b[0] if _attribute(node, "transB", 0) else b[1]
        return int(rows) * int(inner) * int(columns)

    if op in _MATMUL_OPERANDS:
        # numpy matmul semantics: the output holds one K-long dot product per element, where K
        # is the last dim of A (a 1-D A is a single row).
        left, _ = _MATMUL_OPERANDS[op]
        a = _known_shape(shapes, node.input[left], node)
        output = _known_shape(shapes, node.output[0], node)
        return int(np.prod(output, dtype=np.int64)) * int(a[-1])

    return None


def count_module_macs(model, example_inputs) -> int:
    """Count conv and linear MACs of a torch module with forward hooks, for one forward pass.

    Hooks match subclasses too (``isinstance``), unlike Torch-Pruning's counter, so this agrees
    with :func:`count_onnx_cost` on the exported graph. It is the fast counter that pruning uses
    between steps; bundle reports use the ONNX count.
    """
    import torch
    from torch import nn

    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        total += output.numel() * module.weight[0].numel()

    def conv_transpose_hook(module, inputs, output):
        nonlocal total
        total += inputs[0].numel() * module.weight[0].numel()

    def linear_hook(module, inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            handles.append(module.register_forward_hook(conv_transpose_hook))
        elif isinstance(module, nn.modules.conv._ConvNd):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return int(total)


def count_module_parameters(model) -> int:
    """Count the elements of all parameters of a torch module."""
    return int(sum(p.numel() for p in model.parameters()))
