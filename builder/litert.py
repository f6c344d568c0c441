"""LiteRT (``.tflite``) artifacts: convert a torch module, quantize it and run it on the host.

litert-torch converts the PyTorch module (not the ONNX export) into a ``.tflite`` file whose
signature carries the model's input and output names. ai-edge-quantizer then writes the
INT8 variants from that FP32 file: full-integer INT8 (``static``, weights and activations,
calibrated on the calibration set) or dynamic-range INT8 (``dynamic``, INT8 weights,
activations quantized at run time). Evaluation and latency go through the agent's
``LiteRtBackend``, so the builder measures the loading code the board runs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.agent.backends import BackendError, LiteRtBackend, import_litert
from edgeopt.builder.data import Dataset

log = logging.getLogger(__name__)

TFLITE_BUILD_HINT = "pip install 'edgeopt[tflite-build]' (litert-torch and ai-edge-quantizer)"

# ai-edge-quantizer recipes by QuantCandidate.method: per-channel INT8 weights with INT8
# activations from calibration, or with activations quantized on the fly.
QUANTIZER_RECIPES = {"static": "static_wi8_ai8", "dynamic": "dynamic_wi8_afp32"}

# Calibration runs the float model once per sample, so larger sets are cut to this many samples.
MAX_CALIBRATION_SAMPLES = 256


class TfliteBuildError(RuntimeError):
    """litert-torch or ai-edge-quantizer is missing, or failed on this model."""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def tflite_unavailable_reason() -> str | None:
    """Return why LiteRT candidates cannot be built on this host, or None when they can."""
    missing = []
    for module, package in (("litert_torch", "litert-torch"), ("ai_edge_quantizer", "ai-edge-quantizer")):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        return f"{' and '.join(missing)} not installed: {TFLITE_BUILD_HINT}"
    try:
        import_litert()
    except BackendError as exc:
        return f"cannot evaluate .tflite files on this host: {exc}"
    return None


def _named_module(module, input_names: list[str], output_names: list[str]):
    """Wrap ``module`` so that the exported signature uses the manifest's tensor names."""
    import torch

    class NamedSignature(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, **inputs):
            result = self.inner(*(inputs[name] for name in input_names))
            result = result if isinstance(result, (tuple, list)) else (result,)
            return dict(zip(output_names, result))

    return NamedSignature().eval()


def float_recipe() -> dict[str, Any]:
    """Return the recipe entry of an unquantized litert-torch conversion."""
    return {"format": "tflite", "converter": f"litert-torch {_version('litert-torch')}", "method": "none"}


def convert_module(module, example: dict[str, np.ndarray], output_names: list[str], path: Path) -> None:
    """Convert ``module`` to an FP32 ``.tflite`` at ``path``.

    ``example`` contains one sample per input (batch 1); the file keeps that fixed shape.
    """
    import torch

    try:
        import litert_torch
    except ImportError:
        raise TfliteBuildError(f"litert-torch is not installed: {TFLITE_BUILD_HINT}") from None

    sample = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in example.items()}
    wrapped = _named_module(module, list(example), output_names)
    try:
        # litert-torch prints its conversion stages to stdout; keep them out of the build output.
        with contextlib.redirect_stdout(io.StringIO()) as stages:
            converted = litert_torch.convert(wrapped, sample_kwargs=sample)
            converted.export(str(path))
    except Exception as exc:  # litert-torch raises torch.export, MLIR and converter errors of many types
        raise TfliteBuildError(f"litert-torch could not convert the model: {type(exc).__name__}: {exc}") from exc
    log.debug("litert-torch conversion stages:\n%s", stages.getvalue())


def _calibration_samples(calibration: Dataset) -> list[dict[str, np.ndarray]]:
    count = min(len(calibration), MAX_CALIBRATION_SAMPLES)
    return [calibration.batch(index, index + 1) for index in range(count)]


def quantize_tflite(float_path: Path, method: str, calibration: Dataset | None, path: Path, threads: int | None = None) -> dict[str, Any]:
    """Write the INT8 variant ``method`` (``static`` or ``dynamic``) of ``float_path``; return the recipe entry."""
    if method not in QUANTIZER_RECIPES:
        raise TfliteBuildError(f"tflite quantization method {method!r} is not supported; use one of {', '.join(QUANTIZER_RECIPES)}")
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError:
        raise TfliteBuildError(f"ai-edge-quantizer is not installed: {TFLITE_BUILD_HINT}") from None

    recipe_name = QUANTIZER_RECIPES[method]
    entry: dict[str, Any] = {
        **float_recipe(),
        "method": method,
        "quantizer": f"ai-edge-quantizer {_version('ai-edge-quantizer')}",
        "recipe": recipe_name,
    }
    try:
        engine = quantizer.Quantizer(str(float_path), getattr(recipe, recipe_name)())
        calibration_result = None
        if engine.need_calibration:
            if calibration is None or len(calibration) == 0:
                raise TfliteBuildError(f"recipe {recipe_name} needs calibration data; pass --calib")
            samples = _calibration_samples(calibration)
            # calibrate() draws a tqdm progress bar on stderr and has no switch to turn it off.
            with contextlib.redirect_stderr(io.StringIO()):
                calibration_result = engine.calibrate({"serving_default": samples}, num_threads=threads or 1)
            entry["calibration_samples"] = len(samples)
        with contextlib.redirect_stdout(io.StringIO()):
            engine.quantize(calibration_result, serialize_to_path=str(path), enable_progress_bar=False, enable_progress_report=False)
    except TfliteBuildError:
        raise
    except Exception as exc:  # ai-edge-quantizer raises ValueError, RuntimeError and its own errors
        raise TfliteBuildError(f"ai-edge-quantizer recipe {recipe_name} failed: {type(exc).__name__}: {exc}") from exc
    return entry


def open_host_backend(path: Path, threads: int | None) -> LiteRtBackend:
    """Open ``path`` with the agent's LiteRT backend (XNNPACK on) for evaluation and latency."""
    try:
        return LiteRtBackend(path, num_threads=threads)
    except BackendError as exc:
        raise TfliteBuildError(str(exc)) from exc
