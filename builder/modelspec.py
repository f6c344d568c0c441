"""Parse ``--model`` specs and load the source model they name.

Accepted specs:

* ``path/to/file.py:function`` or ``package.module:function``: a factory returning an ``nn.Module``;
* ``model.pt`` / ``model.ts`` / ``model.torchscript``: a TorchScript file;
* ``model.pt2``: a ``torch.export`` program;
* ``model.onnx``: an ONNX file, with external data files beside it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeopt.agent.bundle import sha256_file
from edgeopt.builder.errors import BuildInputError

log = logging.getLogger(__name__)

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")
EXPORT_SUFFIXES = (".pt2",)
ONNX_SUFFIXES = (".onnx",)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` value."""

    raw: str
    kind: str  # "factory-file", "factory-module", "torchscript", "export", "onnx"
    path: Path | None = None
    module: str | None = None
    function: str | None = None

    @property
    def default_name(self) -> str:
        if self.function:
            return self.function.replace("_", "-")
        return self.path.stem if self.path else "model"


@dataclass
class SourceModel:
    """The loaded source model: a torch module, or an ONNX file for ONNX sources."""

    spec: ModelSpec
    sha256: str
    module: Any = None  # torch.nn.Module for torch sources
    onnx_path: Path | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def is_onnx(self) -> bool:
        return self.onnx_path is not None


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse ``spec`` without loading anything; raise BuildInputError naming the problem."""
    spec = spec.strip()
    if not spec:
        raise BuildInputError("--model is empty: give a factory 'file.py:function', 'package.module:function', or a .pt/.pt2/.onnx file")

    lower = spec.lower()
    for suffixes, kind in ((ONNX_SUFFIXES, "onnx"), (EXPORT_SUFFIXES, "export"), (TORCHSCRIPT_SUFFIXES, "torchscript")):
        if lower.endswith(suffixes):
            path = Path(spec)
            if not path.is_file():
                raise BuildInputError(f"model file {spec} not found: check the path")
            return ModelSpec(raw=spec, kind=kind, path=path)

    target, sep, function = spec.rpartition(":")
    if not sep or not target or not function.isidentifier():
        raise BuildInputError(
            f"model spec {spec!r} is malformed: use 'file.py:function', 'package.module:function', "
            "or a path ending in .onnx, .pt2 or .pt"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise BuildInputError(f"factory file {target} in model spec {spec!r} not found: check the path")
        return ModelSpec(raw=spec, kind="factory-file", path=path, function=function)
    if not all(part.isidentifier() for part in target.split(".")):
        raise BuildInputError(f"model spec {spec!r}: {target!r} is neither a .py file nor a dotted module name")
    return ModelSpec(raw=spec, kind="factory-module", module=target, function=function)


def _import_factory(spec: ModelSpec):
    if spec.kind == "factory-file":
        module_name = f"edgeopt_factory_{hashlib.sha1(str(spec.path.resolve()).encode()).hexdigest()[:10]}"
        loader_spec = importlib.util.spec_from_file_location(module_name, spec.path)
        module = importlib.util.module_from_spec(loader_spec)
        # The factory's folder goes on sys.path so that it can import its neighbours.
        sys.path.insert(0, str(spec.path.resolve().parent))
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # user code: any exception is a bad-input error
            raise BuildInputError(f"importing factory file {spec.path} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(spec.module)
        except Exception as exc:  # user code: any exception is a bad-input error
            raise BuildInputError(f"importing module {spec.module!r} failed: {type(exc).__name__}: {exc}") from exc

    factory = getattr(module, spec.function, None)
    if factory is None or not callable(factory):
        raise BuildInputError(f"{spec.raw}: {spec.function!r} is not a callable in {spec.path or spec.module}")
    return factory


def _state_dict_sha256(module) -> str:
    """Hash a module's parameters and buffers, the identity of a factory-built model."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        buffer = io.BytesIO()
        torch.save(tensor.detach().cpu().contiguous(), buffer)
        digest.update(buffer.getvalue())
    return digest.hexdigest()


def load_source_model(spec: ModelSpec) -> SourceModel:
    """Load the model ``spec`` names, in eval mode for torch sources."""
    if spec.kind == "onnx":
        import onnx

        try:
            onnx.checker.check_model(str(spec.path))
        except Exception as exc:  # onnx raises ValidationError and protobuf DecodeError
            raise BuildInputError(f"ONNX file {spec.path} is invalid: {exc}") from None
        return SourceModel(spec=spec, sha256=sha256_file(spec.path), onnx_path=spec.path)

    import torch

    if spec.kind == "torchscript":
        try:
            module = torch.jit.load(str(spec.path), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError for non-TorchScript files
            raise BuildInputError(
                f"{spec.path} is not a TorchScript file ({exc.__class__.__name__}); save with torch.jit.save, "
                "or pass a factory 'file.py:function' that builds the model"
            ) from None
        return SourceModel(spec=spec, sha256=sha256_file(spec.path), module=module.eval())

    if spec.kind == "export":
        try:
            program = torch.export.load(str(spec.path))
        except Exception as exc:  # torch raises several types for malformed archives
            raise BuildInputError(f"{spec.path} is not a torch.export program: {exc}") from None
        return SourceModel(spec=spec, sha256=sha256_file(spec.path), module=program.module())

    factory = _import_factory(spec)
    try:
        module = factory()
    except Exception as exc:  # user code: any exception is a bad-input error
        raise BuildInputError(f"model factory {spec.raw} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise BuildInputError(f"model factory {spec.raw} returned {type(module).__name__}, expected a torch.nn.Module")

    attributes = {
        key: getattr(factory, key)
        for key in ("input_shape", "input_names", "output_names", "preprocess", "labels")
        if hasattr(factory, key)
    }
    module.eval()
    return SourceModel(spec=spec, sha256=_state_dict_sha256(module), module=module, attributes=attributes)
