"""The data plane: model repository, request validation, bounded queues and metrics.

It knows nothing about gRPC transport: it takes and returns KServe v2 protobuf messages and
raises the domain errors of ``edgeopt.agent.errors``, which the servicer maps to status codes.
Listeners (``DataPlaneListener``) hear about loads, unloads, load failures, runtime fallbacks
and inference failures; the telemetry reporter is one.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgeopt.agent import codecs
from edgeopt.agent.backends import BackendError
from edgeopt.agent.bundle import MANIFEST_NAME, BundleError, Manifest, TensorSpec, open_bundle
from edgeopt.agent.errors import (
    AgentError,
    InferenceError,
    InvalidInputError,
    LoadError,
    ModelNotFoundError,
    OverloadedError,
    UnavailableError,
)
from edgeopt.agent.metrics import ServerStats
from edgeopt.agent.protos import inference_pb2
from edgeopt.agent.selection import Attempt, Selection, check_device, select_runtime
from edgeopt.devices.probe import HostFacts, probe_host

log = logging.getLogger(__name__)


def board_concurrency(cpu_count: int) -> tuple[int, int]:
    """Return (concurrent runs per model, ONNX Runtime intra-op threads per run) for a CPU count.

    One run on all cores gives the lowest latency; boards with more cores split them into
    up to four parallel runs for throughput, keeping at least two threads per run.
    NOTE: a rule of thumb for CPU execution providers, not measured per board; override it
    with --max-concurrency and --intra-op-threads after measuring.
    """
    runs = max(1, min(4, cpu_count // 2))
    return runs, max(1, cpu_count // runs)


@dataclass
class DataPlaneConfig:
    """Settings of the data plane; None means sized from this board."""

    cache_dir: Path = Path("~/.cache/edgeopt").expanduser()
    force: bool = False
    max_concurrency: int | None = None
    intra_op_threads: int | None = None
    max_queue: int = 32
    repository: Path | None = None
    drain_timeout_s: float = 30.0
    facts: HostFacts | None = None
    # Inference failures reach listeners at most once per model and interval; the rest are counted.
    error_report_interval_s: float = 10.0

    def sized(self) -> "DataPlaneConfig":
        runs, threads = board_concurrency(os.cpu_count() or 1)
        return DataPlaneConfig(
            cache_dir=Path(self.cache_dir).expanduser(),
            force=self.force,
            max_concurrency=self.max_concurrency or runs,
            intra_op_threads=self.intra_op_threads or threads,
            max_queue=self.max_queue,
            repository=self.repository,
            drain_timeout_s=self.drain_timeout_s,
            facts=self.facts or probe_host(),
            error_report_interval_s=self.error_report_interval_s,
        )


class RequestQueue:
    """Admission control for one model: at most ``concurrency`` runs and ``capacity`` requests in all.

    Requests beyond ``capacity`` fail at once with RESOURCE_EXHAUSTED instead of waiting
    without bound, so an overloaded board sheds load and its latency stays predictable.
    """

    def __init__(self, concurrency: int, capacity: int):
        self.concurrency = concurrency
        self.capacity = capacity
        self._slots = threading.Semaphore(concurrency)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.depth = 0

    @contextmanager
    def admit(self, model: str, stats: ServerStats) -> Iterator[None]:
        with self._lock:
            if self.depth >= self.capacity:
                raise OverloadedError(f"model {model!r} has {self.depth} requests queued or running, the limit; retry later")
            self.depth += 1
            stats.set_queue_depth(model, self.depth)
        try:
            with self._slots:
                yield
        finally:
            with self._lock:
                self.depth -= 1
                stats.set_queue_depth(model, self.depth)
                if self.depth == 0:
                    self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self.depth == 0, timeout)


def _version_key(version: str) -> tuple[int, int, str]:
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


class LoadedModel:
    """One bundle version with its selected backend, ready to serve."""

    def __init__(self, manifest: Manifest, bundle_dir: Path, source: Path, selection: Selection, queue: RequestQueue):
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.bundle_dir = bundle_dir
        self.source = source
        self.selection = selection
        self.backend = selection.backend
        self.queue = queue
        self.inputs: dict[str, TensorSpec] = {spec.name: spec for spec in manifest.inputs}
        self.outputs: dict[str, TensorSpec] = {spec.name: spec for spec in manifest.outputs}
        self.signature = "inputs " + "; ".join(spec.describe() for spec in manifest.inputs)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "device": self.manifest.device,
            "runtime": self.backend.runtime,
            "artifact": self.selection.artifact.path,
            "precision": self.selection.artifact.precision,
        }

    def _invalid(self, message: str) -> InvalidInputError:
        return InvalidInputError(f"model {self.name!r} version {self.version}: {message}; expected {self.signature}")

    def _check_tensor(self, tensor: inference_pb2.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
        spec = self.inputs[tensor.name]
        if tensor.datatype != spec.datatype:
            raise self._invalid(f"input {tensor.name!r} has datatype {tensor.datatype or '(empty)'}, expected {spec.datatype}")

        shape = tuple(tensor.shape)
        fits = len(shape) == len(spec.shape) and all(d >= 1 and (want < 0 or d == want) for d, want in zip(shape, spec.shape))
        if not fits:
            raise self._invalid(f"input {tensor.name!r} has shape {list(shape)}, expected {list(spec.shape)} (-1 is any size of at least 1)")
        return shape

    def _describe_name_mismatch(self, missing: list[str], extra: list[str], sent: list[str]) -> str:
        """Describe input names that the request lacks or that the model does not have."""
        parts = []
        if missing:
            noun = "input" if len(missing) == 1 else "inputs"
            verb = "is" if len(missing) == 1 else "are"
            text = f"{noun} {_quote(missing)} {verb} missing"
            if not extra:
                text += f" (the request sent {_quote(sent)})" if sent else " (the request sent no inputs)"
            parts.append(text)
        if extra:
            noun = "input" if len(extra) == 1 else "inputs"
            verb = "is not an input" if len(extra) == 1 else "are not inputs"
            parts.append(f"{noun} {_quote(extra)} {verb} of this model")
        return " and ".join(parts)

    def decode_inputs(self, request: inference_pb2.ModelInferRequest) -> tuple[dict[str, np.ndarray], bool]:
        """Validate the request against the manifest signature and decode its tensors.

        Returns the arrays by input name and whether the request used raw contents.
        """
        names = [tensor.name for tensor in request.inputs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise self._invalid(f"input {duplicates[0]!r} appears more than once")
        missing = [n for n in self.inputs if n not in names]
        extra = [n for n in names if n not in self.inputs]
        if missing or extra:
            raise self._invalid(self._describe_name_mismatch(missing, extra, names))

        raw = request.raw_input_contents
        use_raw = len(raw) > 0
        if use_raw and len(raw) != len(request.inputs):
            raise self._invalid(f"the request has {len(raw)} raw_input_contents entries for {len(request.inputs)} inputs; send one per input or none")

        arrays = {}
        for index, tensor in enumerate(request.inputs):
            shape = self._check_tensor(tensor)
            try:
                if use_raw:
                    if tensor.HasField("contents") and tensor.contents.ByteSize():
                        raise InvalidInputError(f"input {tensor.name!r} has typed contents although the request uses raw_input_contents")
                    arrays[tensor.name] = codecs.decode_raw(tensor.name, tensor.datatype, shape, raw[index])
                else:
                    arrays[tensor.name] = codecs.decode_typed(tensor.name, tensor.datatype, shape, tensor.contents)
            except InvalidInputError as exc:
                raise self._invalid(str(exc)) from None
        return arrays, use_raw

    def requested_outputs(self, request: inference_pb2.ModelInferRequest) -> list[str]:
        if not request.outputs:
            return list(self.outputs)
        names = [output.name for output in request.outputs]
        for name in names:
            if name not in self.outputs:
                raise InvalidInputError(
                    f"model {self.name!r} version {self.version}: requested output {name!r} does not exist; outputs are {', '.join(self.outputs)}"
                )
        if len(set(names)) != len(names):
            raise InvalidInputError(f"model {self.name!r} version {self.version}: an output is requested more than once")
        return names


class DataPlaneListener:
    """Receiver of data-plane events; subclasses override the methods they need.

    The data plane calls these on the thread that caused the event (a gRPC worker, or the
    caller of ``load``, ``unload`` and ``close``) after it has released its own lock. They
    must return quickly because a request or a load waits for them. An exception raised here
    is logged and ignored.
    """

    def on_loaded(self, model: LoadedModel) -> None:
        """Handle a model version that now serves requests."""

    def on_unloaded(self, model: LoadedModel, reason: str) -> None:
        """Handle a model version that stopped serving; ``reason`` is "unloaded", "replaced" or "shutdown"."""

    def on_load_failed(self, path: Path, error: Exception) -> None:
        """Handle a failed load of the bundle at ``path``, which left the served models unchanged."""

    def on_runtime_fallback(self, model: LoadedModel, skipped: list[Attempt]) -> None:
        """Handle a model that loaded after earlier candidates of the runtime chain were skipped."""

    def on_inference_error(self, model: LoadedModel, error: Exception, suppressed: int) -> None:
        """Handle a valid request that failed inside the agent or runtime.

        Client mistakes (invalid input, unknown model) and overload are not reported here.
        ``suppressed`` counts the failures of this model held back by rate limiting since
        the previous call.
        """


class ErrorRateLimiter:
    """Let the first error per key through, then at most one per ``interval_s``; count the rest."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """Return the number of errors held back since the last admitted one, or None to hold this one back."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)

    def forget(self, key: str) -> None:
        with self._lock:
            self._last.pop(key, None)
            self._held.pop(key, None)


@dataclass
class _KnownBundle:
    path: Path
    last_error: str = ""


@dataclass
class DataPlane:
    """Loaded models by name and version, plus bundles on disk that can be loaded by name."""

    config: DataPlaneConfig = field(default_factory=DataPlaneConfig)
    stats: ServerStats = field(default_factory=ServerStats)
    listeners: list[DataPlaneListener] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config = self.config.sized()
        self._lock = threading.RLock()
        self._models: dict[str, dict[str, LoadedModel]] = {}
        self._known: dict[str, _KnownBundle] = {}
        self._loading: set[str] = set()
        self._listeners: list[DataPlaneListener] = list(self.listeners)
        self._error_limiter = ErrorRateLimiter(self.config.error_report_interval_s)
        self.shutting_down = False

    # --- listeners ----------------------------------------------------------------

    def add_listener(self, listener: DataPlaneListener, replay: bool = False) -> None:
        """Register ``listener``; with ``replay`` it first hears about every model loaded so far.

        Registration and the list of models to replay are taken under one lock, so a model
        loading at the same time reaches the listener exactly once.
        """
        with self._lock:
            self._listeners.append(listener)
            loaded = [model for versions in self._models.values() for model in versions.values()] if replay else []
        for model in loaded:
            self._announce_load([listener], model)

    def remove_listener(self, listener: DataPlaneListener) -> None:
        with self._lock:
            self._listeners.remove(listener)

    def _notify(self, listeners: list[DataPlaneListener], method: str, *args: Any) -> None:
        for listener in listeners:
            try:
                getattr(listener, method)(*args)
            except Exception:  # a listener must not break loading or serving
                log.exception("data plane listener %s failed in %s", type(listener).__name__, method)

    def _announce_load(self, listeners: list[DataPlaneListener], model: LoadedModel) -> None:
        skipped = [attempt for attempt in model.selection.attempts if not attempt.selected]
        if skipped:
            self._notify(listeners, "on_runtime_fallback", model, skipped)
        self._notify(listeners, "on_loaded", model)

    def _inference_failed(self, model: LoadedModel, error: Exception) -> None:
        suppressed = self._error_limiter.admit(model.name)
        if suppressed is None:
            return
        with self._lock:
            listeners = list(self._listeners)
        self._notify(listeners, "on_inference_error", model, error, suppressed)

    # --- repository ---------------------------------------------------------------

    def load(self, path: Path) -> LoadedModel:
        """Verify a bundle directory or tar, check the device, select a runtime and serve it.

        A model with the same name and version is replaced once the new one is ready.
        Listeners hear about the result: on_loaded (after on_runtime_fallback when earlier
        candidates were skipped), on_unloaded for a replaced version, or on_load_failed.
        """
        path = Path(path)
        try:
            model, previous, listeners = self._load(path)
        except Exception as exc:
            with self._lock:
                listeners = list(self._listeners)
            self._notify(listeners, "on_load_failed", path, exc)
            raise

        self._announce_load(listeners, model)
        if previous is not None:
            self._retire(previous)
            self._notify(listeners, "on_unloaded", previous, "replaced")
        return model

    def _load(self, path: Path) -> tuple[LoadedModel, LoadedModel | None, list[DataPlaneListener]]:
        log.info("loading bundle %s", path)
        started = time.perf_counter()
        try:
            bundle_dir, manifest = open_bundle(path, self.config.cache_dir / "bundles")
        except BundleError as exc:
            error = LoadError(f"bundle {path}: {exc}")
            with self._lock:
                for known in self._known.values():
                    if known.path == path:
                        known.last_error = str(error)
            raise error from None

        with self._lock:
            self._known.setdefault(manifest.name, _KnownBundle(path)).path = path
            self._loading.add(manifest.name)
        try:
            profile = check_device(manifest, self.config.facts, self.config.force)
            selection = select_runtime(bundle_dir, manifest, profile, self.config.cache_dir, self.config.intra_op_threads)
        except LoadError as exc:
            with self._lock:
                self._known[manifest.name].last_error = str(exc)
            raise
        finally:
            with self._lock:
                self._loading.discard(manifest.name)

        queue = RequestQueue(self.config.max_concurrency, self.config.max_concurrency + self.config.max_queue)
        model = LoadedModel(manifest, bundle_dir, path, selection, queue)
        with self._lock:
            previous = self._models.setdefault(model.name, {}).get(model.version)
            self._models[model.name][model.version] = model
            self._known[model.name].last_error = ""
            listeners = list(self._listeners)
        log.info(
            "loaded %s version %s from %s on %s in %.2f s", model.name, model.version, path, model.backend.runtime, time.perf_counter() - started
        )
        return model, previous, listeners

    def _retire(self, model: LoadedModel) -> None:
        if not model.queue.wait_idle(self.config.drain_timeout_s):
            log.warning("%s version %s still has %d requests after %.0f s; closing it anyway", model.name, model.version, model.queue.depth, self.config.drain_timeout_s)
        model.backend.close()
        log.info("unloaded %s version %s", model.name, model.version)

    def _scan_repository(self) -> None:
        root = self.config.repository
        if root is None or not root.is_dir():
            return
        for entry in sorted(root.iterdir()):
            try:
                name = _bundle_name(entry)
            except (OSError, ValueError, KeyError, tarfile.TarError) as exc:
                log.warning("skipping %s in the repository: %s", entry, exc)
                continue
            if name:
                with self._lock:
                    self._known.setdefault(name, _KnownBundle(entry))

    def load_by_name(self, name: str) -> LoadedModel:
        """Load (or reload) the bundle on disk whose manifest name is ``name``."""
        self._scan_repository()
        with self._lock:
            known = self._known.get(name)
        if known is None:
            raise ModelNotFoundError(f"no bundle named {name!r} is known; start the agent with --bundle PATH or put it in --repository")
        return self.load(known.path)

    def unload(self, name: str, reason: str = "unloaded") -> None:
        """Stop serving every version of ``name``; requests in flight finish first."""
        with self._lock:
            versions = self._models.pop(name, None)
            known = name in self._known
            listeners = list(self._listeners)
        if versions is None:
            if known:
                return
            raise ModelNotFoundError(f"model {name!r} is not loaded or known")
        for model in versions.values():
            self._retire(model)
        self.stats.forget(name)
        self._error_limiter.forget(name)
        for model in versions.values():
            self._notify(listeners, "on_unloaded", model, reason)

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """List loaded models and bundles known on disk with their state."""
        self._scan_repository()
        entries = []
        with self._lock:
            for name in sorted(set(self._models) | set(self._known)):
                versions = self._models.get(name, {})
                for version in sorted(versions, key=_version_key):
                    entries.append({"name": name, "version": version, "state": "READY", "reason": ""})
                if not versions and not ready_only:
                    state = "LOADING" if name in self._loading else "UNAVAILABLE"
                    reason = self._known[name].last_error if name in self._known else ""
                    entries.append({"name": name, "version": "", "state": state, "reason": reason or "not loaded"})
        return entries

    def get(self, name: str, version: str = "") -> LoadedModel:
        """Return the model ``name`` at ``version``; an empty version selects the highest."""
        with self._lock:
            versions = self._models.get(name)
            if not versions:
                raise ModelNotFoundError(f"model {name!r} is not loaded; loaded models: {', '.join(sorted(self._models)) or 'none'}")
            if not version:
                return versions[max(versions, key=_version_key)]
            model = versions.get(version)
        if model is None:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; loaded versions: {', '.join(sorted(versions, key=_version_key))}")
        return model

    def model_ready(self, name: str, version: str = "") -> bool:
        """Return whether ``name`` (at ``version``) serves requests; False for a known bundle not loaded."""
        try:
            self.get(name, version)
        except ModelNotFoundError:
            with self._lock:
                if name in self._known and name not in self._models:
                    return False
            raise
        return not self.shutting_down

    def models(self) -> list[dict[str, Any]]:
        """Describe every loaded model version for telemetry."""
        with self._lock:
            return [model.describe() for versions in self._models.values() for model in versions.values()]

    def is_ready(self) -> bool:
        with self._lock:
            return not self.shutting_down and bool(self._models)

    # --- inference ----------------------------------------------------------------

    def infer(self, request: inference_pb2.ModelInferRequest) -> inference_pb2.ModelInferResponse:
        """Validate, queue and run one request; record its latency and outcome."""
        if self.shutting_down:
            raise UnavailableError("the agent is shutting down; retry on another replica")
        started = time.perf_counter()
        model = self.get(request.model_name, request.model_version)
        ok = False
        try:
            arrays, use_raw = model.decode_inputs(request)
            wanted = model.requested_outputs(request)
            with model.queue.admit(model.name, self.stats):
                try:
                    outputs = model.backend.run(arrays)
                except BackendError as exc:
                    raise InferenceError(f"model {model.name!r} version {model.version} failed: {exc}") from None

            response = inference_pb2.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
            codecs.encode_outputs(response, {name: outputs[name] for name in wanted}, raw=use_raw)
            ok = True
            return response
        except InferenceError as exc:
            self._inference_failed(model, exc)
            raise
        except AgentError:
            # Invalid input and overload are the client's to fix; the servicer reports them.
            raise
        except Exception as exc:
            self._inference_failed(model, exc)
            raise
        finally:
            self.stats.record(model.name, model.version, (time.perf_counter() - started) * 1000.0, ok)

    def close(self) -> None:
        """Stop accepting requests and release every runtime session."""
        self.shutting_down = True
        with self._lock:
            names = list(self._models)
        for name in names:
            self.unload(name, reason="shutdown")


def _quote(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _bundle_name(entry: Path) -> str | None:
    """Return the manifest name of a bundle directory or tar without extracting it."""
    if entry.is_dir() and (entry / MANIFEST_NAME).is_file():
        return json.loads((entry / MANIFEST_NAME).read_text(encoding="utf-8"))["name"]
    if entry.is_file() and entry.name.endswith(".tar"):
        with tarfile.open(entry, "r:*") as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and parts[-1] == MANIFEST_NAME and len(parts) <= 2:
                    handle = tar.extractfile(member)
                    return json.loads(handle.read().decode("utf-8"))["name"] if handle else None
    return None
