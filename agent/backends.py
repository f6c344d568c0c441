"""Runtime backends: load one artifact and run it.

The builder measures host latency through these classes too, so that a number in a
bundle report comes from the same loading code the agent uses on the board.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeopt.agent.bundle import TensorSpec
from edgeopt.agent.datatypes import ONNX_TYPE_TO_KSERVE, kserve_datatype

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """A runtime is not installed, rejects the artifact or fails to run it."""


class Backend(Protocol):
    """Interface of a loaded model, as the data plane uses it."""

    runtime: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def expand_options(options: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    """Fill the ``{cache_dir}`` placeholder in string option values and create those directories."""
    expanded = {}
    for key, value in options.items():
        if isinstance(value, str) and "{cache_dir}" in value:
            value = value.replace("{cache_dir}", str(cache_dir))
            Path(value).mkdir(parents=True, exist_ok=True)
        expanded[key] = value
    return expanded


@dataclass(frozen=True)
class ProviderChoice:
    """An ONNX Runtime execution provider and the options to pass to it."""

    name: str
    options: dict[str, Any]


# Provider options that name an on-disk cache of the compiled model, and the option that
# switches the cache on (None: the directory option alone enables it). Option names are
# those of ONNX Runtime's TensorRT and Core ML execution providers.
ENGINE_CACHE_OPTIONS: dict[str, tuple[str, str | None]] = {
    "TensorrtExecutionProvider": ("trt_engine_cache_path", "trt_engine_cache_enable"),
    "CoreMLExecutionProvider": ("ModelCacheDirectory", None),
}


class EngineCacheWatch:
    """Detect whether a session compiled a new engine into its cache directory or reused one.

    TensorRT builds its engine when the session is created or, for inputs with dynamic
    axes, on the first run. The watch therefore spans session creation and the first run.
    """

    def __init__(self, provider: str, directory: Path):
        self.provider = provider
        self.directory = Path(directory)
        self.before = self._snapshot()

    def _snapshot(self) -> dict[str, int]:
        if not self.directory.is_dir():
            return {}
        return {str(p.relative_to(self.directory)): p.stat().st_mtime_ns for p in self.directory.rglob("*") if p.is_file()}

    def finish(self, seconds: float, model_name: str) -> str:
        """Log and return whether the engine for ``model_name`` was built or taken from the cache."""
        after = self._snapshot()
        written = sorted(name for name, mtime in after.items() if self.before.get(name) != mtime)
        if written:
            message = (
                f"{self.provider} built the engine for {model_name} in {seconds:.2f} s (session creation and first run) "
                f"and cached {len(written)} file(s) in {self.directory}"
            )
        else:
            message = (
                f"{self.provider} reused the cached engine for {model_name} from {self.directory}; "
                f"session creation and first run took {seconds:.2f} s"
            )
        log.info(message)
        return message


def engine_cache_watches(providers: list[ProviderChoice]) -> list[EngineCacheWatch]:
    """Start a watch for every provider whose options enable an engine cache directory."""
    watches = []
    for provider in providers:
        keys = ENGINE_CACHE_OPTIONS.get(provider.name)
        if keys is None:
            continue
        path_key, enable_key = keys
        directory = provider.options.get(path_key)
        enabled = enable_key is None or str(provider.options.get(enable_key, "")).lower() in ("1", "true")
        if directory and enabled:
            watches.append(EngineCacheWatch(provider.name, Path(directory)))
    return watches


class OnnxRuntimeBackend:
    """An ONNX Runtime inference session on an explicit execution-provider list."""

    def __init__(self, model_path: Path, providers: list[ProviderChoice], intra_op_threads: int | None = None):
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        missing = [p.name for p in providers if p.name not in available]
        if missing:
            raise BackendError(
                f"execution provider {missing[0]} is not available in this onnxruntime build "
                f"(available: {', '.join(sorted(available))})"
            )

        # The (name, options) pairs exactly as InferenceSession receives them.
        self.provider_arguments = [(p.name, dict(p.options)) for p in providers]
        self._cache_watches = engine_cache_watches(providers)

        session_options = ort.SessionOptions()
        if intra_op_threads:
            session_options.intra_op_num_threads = intra_op_threads
        session_options.log_severity_level = 3

        started = time.perf_counter()
        try:
            self.session = ort.InferenceSession(
                str(model_path),
                sess_options=session_options,
                providers=self.provider_arguments,
            )
        except Exception as exc:  # onnxruntime raises its own exception classes per failure kind
            raise BackendError(f"onnxruntime could not load {model_path.name}: {exc}") from exc
        self.load_seconds = time.perf_counter() - started

        self.model_path = Path(model_path)
        self.providers = self.session.get_providers()

        # When a provider fails to initialise (for example TensorRT libraries that do not match
        # the onnxruntime-gpu build), onnxruntime logs an error and retries on the CPU provider.
        dropped = [p.name for p in providers if p.name not in self.providers]
        if dropped:
            self.session = None
            raise BackendError(
                f"execution provider {dropped[0]} failed to initialise for {model_path.name} and onnxruntime fell back to "
                f"{', '.join(self.providers)}; check that the provider's libraries match this onnxruntime build"
            )
        self.runtime = f"onnxruntime {ort.__version__} ({self.providers[0]})"
        self.inputs = [self._spec(i) for i in self.session.get_inputs()]
        self.outputs = [self._spec(o) for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    @staticmethod
    def _spec(node) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else -1 for d in node.shape)
        return TensorSpec(node.name, ONNX_TYPE_TO_KSERVE.get(node.type, node.type), shape)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        try:
            results = self.session.run(self._output_names, inputs)
        except Exception as exc:  # onnxruntime raises its own exception classes per failure kind
            raise BackendError(f"onnxruntime failed to run {self.model_path.name}: {exc}") from exc

        watches, self._cache_watches = self._cache_watches, []
        for watch in watches:
            watch.finish(self.load_seconds + time.perf_counter() - started, self.model_path.name)
        return dict(zip(self._output_names, results))

    def close(self) -> None:
        self.session = None


def available_onnx_providers() -> list[str]:
    """Return the execution providers this onnxruntime build offers, or [] when it is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


# Interpreter modules tried in order: LiteRT's own package, then the older tflite-runtime
# wheel for boards that ai-edge-litert publishes no wheel for.
LITERT_MODULES = (("ai_edge_litert.interpreter", "ai-edge-litert"), ("tflite_runtime.interpreter", "tflite-runtime"))
LITERT_INSTALL_HINT = "pip install 'edgeopt[litert]' (ai-edge-litert), or tflite-runtime where ai-edge-litert has no wheel"


@dataclass(frozen=True)
class LiteRtModule:
    """The imported LiteRT interpreter module and the package it came from."""

    interpreter: Any
    package: str
    version: str


def import_litert() -> LiteRtModule:
    """Import the first available LiteRT interpreter module; raise BackendError when none is installed."""
    failures = []
    for module_name, package in LITERT_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            failures.append(f"{module_name}: {exc}")
            continue
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown version"
        return LiteRtModule(module, package, version)
    raise BackendError(f"LiteRT is not installed ({'; '.join(failures)}): {LITERT_INSTALL_HINT}")


def _dequantize(value: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((value.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)


def _quantize(value: np.ndarray, scale: float, zero_point: int, dtype: np.dtype) -> np.ndarray:
    limits = np.iinfo(dtype)
    return np.clip(np.round(value.astype(np.float32) / np.float32(scale)) + zero_point, limits.min, limits.max).astype(dtype)


@dataclass(frozen=True)
class _LiteRtTensor:
    """One signature tensor: its dtype in the file and the affine quantization, if any."""

    name: str
    dtype: np.dtype
    shape_signature: tuple[int, ...]
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and np.issubdtype(self.dtype, np.integer)

    def spec(self) -> TensorSpec:
        # Quantized tensors are converted at the boundary, so callers see float32.
        datatype = "FP32" if self.quantized else kserve_datatype(self.dtype)
        shape = tuple(d if d >= 0 else -1 for d in self.shape_signature)
        if shape and shape[0] == 1:
            shape = (-1, *shape[1:])  # run() splits larger batches into single samples
        return TensorSpec(self.name, datatype, shape)

    @classmethod
    def from_details(cls, name: str, details: dict[str, Any]) -> "_LiteRtTensor":
        scale, zero_point = details.get("quantization", (0.0, 0))
        signature = details.get("shape_signature", details["shape"])
        return cls(name, np.dtype(details["dtype"]), tuple(int(d) for d in signature), float(scale), int(zero_point))


class LiteRtBackend:
    """A LiteRT interpreter running the first signature of a ``.tflite`` file.

    Models with a fixed batch of 1 (what litert-torch exports) run larger batches one sample
    at a time. Integer-quantized inputs and outputs are quantized and dequantized here with
    the scale and zero point stored in the file, so callers always exchange float32. The
    interpreter is not thread-safe: concurrent ``run`` calls wait for each other, and XNNPACK
    spreads each run over ``num_threads`` threads.
    """

    def __init__(self, model_path: Path, num_threads: int | None = None, xnnpack: bool = True):
        litert = import_litert()
        self.model_path = Path(model_path)
        self.num_threads = num_threads
        kwargs: dict[str, Any] = {"model_path": str(model_path), "num_threads": num_threads}
        if not xnnpack:
            kwargs["experimental_op_resolver_type"] = litert.interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES

        started = time.perf_counter()
        try:
            self.interpreter = litert.interpreter.Interpreter(**kwargs)
            signatures = self.interpreter.get_signature_list()
            if not signatures:
                raise BackendError(f"{self.model_path.name} has no signature: convert it with litert-torch, which writes one")
            self.signature = "serving_default" if "serving_default" in signatures else next(iter(signatures))
            self._runner = self.interpreter.get_signature_runner(self.signature)
            input_details = self._runner.get_input_details()
            output_details = self._runner.get_output_details()
        except BackendError:
            raise
        except (ValueError, RuntimeError) as exc:  # the interpreter's errors for unreadable files and unsupported ops
            raise BackendError(f"LiteRT could not load {self.model_path.name}: {exc}") from exc
        self.load_seconds = time.perf_counter() - started

        self._inputs = [_LiteRtTensor.from_details(name, details) for name, details in input_details.items()]
        self._outputs = [_LiteRtTensor.from_details(name, details) for name, details in output_details.items()]
        self._single_sample = all(t.shape_signature[:1] == (1,) for t in self._inputs)
        self._lock = threading.Lock()

        delegate = "XNNPACK delegate" if xnnpack else "built-in kernels, XNNPACK off"
        threads = f"{num_threads} threads" if num_threads else "default threads"
        self.runtime = f"LiteRT ({litert.package} {litert.version}, {delegate}, {threads})"
        self.inputs = [t.spec() for t in self._inputs]
        self.outputs = [t.spec() for t in self._outputs]

    def _invoke(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = {}
        for tensor in self._inputs:
            value = np.asarray(feeds[tensor.name])
            if tensor.quantized:
                value = _quantize(value, tensor.scale, tensor.zero_point, tensor.dtype)
            prepared[tensor.name] = np.ascontiguousarray(value, dtype=tensor.dtype)
        with self._lock:
            if self._runner is None:
                raise BackendError(f"LiteRT backend for {self.model_path.name} is closed")
            results = self._runner(**prepared)

        outputs = {}
        for tensor in self._outputs:
            value = np.array(results[tensor.name])  # copy: the runner reuses its output buffers
            outputs[tensor.name] = _dequantize(value, tensor.scale, tensor.zero_point) if tensor.quantized else value
        return outputs

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [t.name for t in self._inputs if t.name not in inputs]
        if missing:
            raise BackendError(f"LiteRT model {self.model_path.name} needs input {missing[0]!r}; given {sorted(inputs)}")
        for tensor in self._inputs:
            shape = np.shape(inputs[tensor.name])
            expected = tensor.spec().shape
            if len(shape) != len(expected) or any(e >= 0 and e != d for e, d in zip(expected, shape)):
                raise BackendError(
                    f"LiteRT model {self.model_path.name}: input {tensor.name!r} has shape {list(shape)}, expected {list(expected)} (-1: any size)"
                )
        batch = len(np.asarray(inputs[self._inputs[0].name])) if self._inputs else 1

        try:
            if not self._single_sample or batch == 1:
                return self._invoke(inputs)
            parts = [self._invoke({name: np.asarray(value)[i : i + 1] for name, value in inputs.items()}) for i in range(batch)]
        except BackendError:
            raise
        except (ValueError, RuntimeError) as exc:  # the interpreter raises these for bad shapes, dtypes and kernels
            raise BackendError(f"LiteRT failed to run {self.model_path.name}: {exc}") from exc
        return {tensor.name: np.concatenate([part[tensor.name] for part in parts]) for tensor in self._outputs}

    def close(self) -> None:
        with self._lock:
            self._runner = None
            self.interpreter = None


@dataclass(frozen=True)
class LatencyStats:
    """Latency of repeated single-request runs, in milliseconds."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    warmup: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "p50_ms": round(self.p50_ms, 3),
            "p90_ms": round(self.p90_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "mean_ms": round(self.mean_ms, 3),
            "runs": self.runs,
            "warmup": self.warmup,
        }


def measure_latency(backend: Backend, inputs: dict[str, np.ndarray], runs: int = 50, warmup: int = 5, max_seconds: float = 30.0) -> LatencyStats:
    """Time ``backend.run`` on one fixed input; stop early after ``max_seconds`` of timed runs."""
    for _ in range(warmup):
        backend.run(inputs)

    samples = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(runs):
        started = time.perf_counter()
        backend.run(inputs)
        samples.append((time.perf_counter() - started) * 1000.0)
        if time.perf_counter() > deadline and len(samples) >= 5:
            break

    values = np.asarray(samples)
    return LatencyStats(
        p50_ms=float(np.percentile(values, 50)),
        p90_ms=float(np.percentile(values, 90)),
        p99_ms=float(np.percentile(values, 99)),
        mean_ms=float(values.mean()),
        runs=len(samples),
        warmup=warmup,
    )
