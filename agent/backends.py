"""Runtime backends: load one artifact and run it.

The builder measures host latency through these classes too, so that a number in a
bundle report comes from the same loading code the agent uses on the board.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeopt.agent.bundle import TensorSpec
from edgeopt.agent.datatypes import ONNX_TYPE_TO_KSERVE

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """A runtime is not installed, rejects the artifact or fails to run it."""


class Backend(Protocol):
    """What the data plane needs from a loaded model."""

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

        session_options = ort.SessionOptions()
        if intra_op_threads:
            session_options.intra_op_num_threads = intra_op_threads
        session_options.log_severity_level = 3

        started = time.perf_counter()
        try:
            self.session = ort.InferenceSession(
                str(model_path),
                sess_options=session_options,
                providers=[(p.name, p.options) for p in providers],
            )
        except Exception as exc:  # onnxruntime raises its own exception classes per failure kind
            raise BackendError(f"onnxruntime could not load {model_path.name}: {exc}") from exc
        self.load_seconds = time.perf_counter() - started

        self.model_path = Path(model_path)
        self.providers = self.session.get_providers()
        self.runtime = f"onnxruntime {ort.__version__} ({self.providers[0]})"
        self.inputs = [self._spec(i) for i in self.session.get_inputs()]
        self.outputs = [self._spec(o) for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    @staticmethod
    def _spec(node) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else -1 for d in node.shape)
        return TensorSpec(node.name, ONNX_TYPE_TO_KSERVE.get(node.type, node.type), shape)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self.session.run(self._output_names, inputs)
        except Exception as exc:  # onnxruntime raises its own exception classes per failure kind
            raise BackendError(f"onnxruntime failed to run {self.model_path.name}: {exc}") from exc
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
