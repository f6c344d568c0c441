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
import os
import warnings
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

# ai-edge-quantizer's calibration and checks run interpreters that keep every intermediate
# tensor, and LiteRT warns on each that this mode is meant for debugging.
PRESERVE_ALL_TENSORS_WARNING = r".*experimental_preserve_all_tensors"

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


def _quiet_converter_logs() -> None:
    """Silence start-up chatter of the conversion stack that is unrelated to the model.

    TensorFlow's C++ logging (oneDNN notice, op counts) reads TF_CPP_MIN_LOG_LEVEL when it is
    first loaded, so this must run before litert-torch or ai-edge-litert is imported. torchao warns about CUDA
    kernels it cannot load on a CPU-only host, and torch's pytree warns about deprecated
    registrations inside litert-torch 0.10. A user who sets TF_CPP_MIN_LOG_LEVEL keeps theirs.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)


# Availability checks import the conversion stack early, so quieten it as soon as the builder
# loads this module.
_quiet_converter_logs()


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


def _calibrate_min_max(float_path: Path, quantization_recipe, samples: list[dict[str, np.ndarray]], threads: int) -> dict[str, Any]:
    """Calibrate ``float_path`` on ``samples`` and return each tensor's global min and max over them.

    ``Quantizer.calibrate`` in ai-edge-quantizer 0.10 keeps an exponential moving average
    (smoothing factor 0.95) of each sample's min and max and has no option to change that.
    The average stays well inside the range the samples reach: on EfficientNet-Lite0 it cut
    some projection convolutions to about half their range and saturated the logits, so
    top-1 often became a tie. The global min/max is what ONNX Runtime's MinMax calibration
    records, so the ONNX and LiteRT INT8 files get comparable ranges.
    """
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(quantization_recipe)
    # calibrate() draws a progress bar on stderr and has no switch to turn it off.
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PRESERVE_ALL_TENSORS_WARNING, category=UserWarning)
        # This update function replaces each algorithm's own one, which is right only for min/max
        # recipes because GPTQ and OSCAR record other statistics.
        engine = calibrator.Calibrator(str(float_path), num_threads=threads, qsv_update_func=qsv_utils.min_max_update)
        engine.calibrate({"serving_default": samples}, manager)
    return engine.get_model_qsvs()


def _quantize_reporting_bias_overflow(engine, calibration_result: dict[str, Any] | None, path: Path) -> None:
    """Quantize into ``path`` and turn numpy's int32 cast overflow warnings into one log line that explains them."""
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=PRESERVE_ALL_TENSORS_WARNING, category=UserWarning)
        engine.quantize(calibration_result, serialize_to_path=str(path), enable_progress_bar=False, enable_progress_report=False)

    overflows = [w for w in caught if issubclass(w.category, RuntimeWarning) and "invalid value encountered in cast" in str(w.message)]
    for other in caught:
        if other not in overflows:
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    if overflows:
        # NOTE: ai-edge-quantizer 0.10 floors a per-channel weight scale at 1e-9 / 127, and the
        # bias scale is input scale x weight scale. A channel whose folded weights are all zero
        # then cannot hold its bias in int32. The quantizer clips the bias in float32, where
        # 2**31 - 1 rounds up to 2**31, so a positive bias overflows the cast (numpy's
        # RuntimeWarning) and becomes -2**31 on x86. Such channels output 0 in the INT8 model.
        # In EfficientNet-Lite0 most of their biases are negative, so ReLU6 gives 0 in FP32 too.
        log.warning(
            "ai-edge-quantizer could not fit the int32 bias of %d op(s) in %s: channels with all-zero weights output 0 instead of their bias",
            len(overflows), path.name,
        )


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
        quantization_recipe = getattr(recipe, recipe_name)()
        engine = quantizer.Quantizer(str(float_path), quantization_recipe)
        calibration_result = None
        if engine.need_calibration:
            if calibration is None or len(calibration) == 0:
                raise TfliteBuildError(f"recipe {recipe_name} needs calibration data; pass --calib")
            samples = _calibration_samples(calibration)
            calibration_result = _calibrate_min_max(float_path, quantization_recipe, samples, threads or 1)
            entry["calibration_samples"] = len(samples)
            entry["calibration"] = "minmax"
        _quantize_reporting_bias_overflow(engine, calibration_result, path)
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
