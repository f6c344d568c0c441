"""Export a torch model to ONNX with a dynamic batch axis, and optimise the graph."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from edgeopt.builder.errors import BuildInputError

log = logging.getLogger(__name__)

OPSET = 18
# ONNX protobuf files cannot exceed 2 GiB; larger models keep weights in an external data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def export_torch(module, example: dict[str, "np.ndarray"], output_names: list[str] | None, path: Path) -> Path:
    """Export ``module`` to ``path`` with axis 0 of every input and output dynamic.

    The torch.export-based exporter runs first. When it fails (data-dependent control flow,
    unsupported ops), the TorchScript-based exporter is tried. If neither works, both errors
    are reported.
    """
    import torch

    input_names = list(example)
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[name])) for name in input_names)
    with torch.no_grad():
        try:
            reference = module(*args)
        except Exception as exc:  # user model: any exception means the shape or dtype is wrong
            shapes = ", ".join(f"{n}: {tuple(a.shape)}" for n, a in zip(input_names, args))
            raise BuildInputError(f"the model rejects inputs of shape {shapes} ({type(exc).__name__}: {exc}): fix --input-shape") from None
    outputs = reference if isinstance(reference, (tuple, list)) else (reference,)
    output_names = output_names or (["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))])
    if len(output_names) != len(outputs):
        raise BuildInputError(f"the model returns {len(outputs)} outputs but {len(output_names)} output names were given")

    large = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_THRESHOLD
    errors = []
    # The exporter warns once per torchvision operator when torchvision is absent. That is
    # expected and unrelated to this model.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    try:
        batch = torch.export.Dim("batch", min=1)
        signature_names = _forward_argument_names(module, len(args))
        dynamic_shapes = {name: {0: batch} for name in signature_names}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=OPSET,
                dynamo=True,
                external_data=large,
                verbose=False,
            )
        log.info("exported %s with the torch.export-based ONNX exporter", path.name)
        return path
    except Exception as exc:  # exporter failures come as many exception types
        errors.append(f"torch.export-based exporter: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        log.warning("torch.export-based ONNX export failed, trying the TorchScript-based exporter: %s", errors[-1])

    try:
        dynamic_axes = {name: {0: "batch"} for name in input_names + output_names}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=17,
                dynamo=False,
            )
        log.info("exported %s with the TorchScript-based ONNX exporter", path.name)
        return path
    except Exception as exc:  # exporter failures come as many exception types
        errors.append(f"TorchScript-based exporter: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    raise BuildInputError("ONNX export failed with both exporters; " + "; ".join(errors))


def _forward_argument_names(module, count: int) -> list[str]:
    """Return the names of the first ``count`` positional parameters of ``module.forward``."""
    import inspect

    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return [f"arg{i}" for i in range(count)]
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[:count] if len(names) >= count else [f"arg{i}" for i in range(count)]


def copy_onnx(source: Path, destination: Path) -> Path:
    """Copy an ONNX model, resolving external data, into one file (or file + data when large)."""
    import onnx

    model = onnx.load(str(source), load_external_data=True)
    large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if model.ByteSize() >= 0 else True
    save_onnx(model, destination, external=large)
    return destination


def save_onnx(model, path: Path, external: bool = False) -> None:
    import onnx

    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def external_data_files(path: Path) -> list[Path]:
    """Return the external data files an ONNX model references (empty for self-contained files)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return [path.parent / location for location in sorted(locations)]


def input_signature(path: Path) -> tuple[list[tuple[str, tuple[int, ...], str]], list[tuple[str, tuple[int, ...], str]]]:
    """Return (name, shape with -1 for symbolic axes, ONNX type string) for inputs and outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def describe(nodes):
        return [(n.name, tuple(d if isinstance(d, int) else -1 for d in n.shape), n.type) for n in nodes]

    return describe(session.get_inputs()), describe(session.get_outputs())


def optimize_graph(source: Path, destination: Path) -> Path:
    """Apply ONNX Runtime's basic graph optimisations offline.

    The basic level (constant folding, redundant-node removal, Conv+BatchNorm fusion) yields
    only standard ONNX operators, so the result still runs on every execution provider. The
    extended and layout levels produce CPU-specific contrib ops, so they are left to the board.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(destination)
    if external_data_files(source):
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{destination.name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        log.warning("graph optimisation failed, keeping the unoptimised graph: %s", exc)
        shutil.copyfile(source, destination)
    return destination
