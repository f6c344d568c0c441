"""Runtime selection: check the board, walk the profile's runtime chain and self-test.

The outer loop runs over the device profile's runtime chain in order, the inner loop over
the bundle's artifacts (best first) that suit that runtime. The first candidate that loads,
matches the manifest signature and passes the manifest self-test is selected; every other
candidate is recorded with the reason it was skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeopt.agent.backends import (
    Backend,
    BackendError,
    LiteRtBackend,
    OnnxRuntimeBackend,
    ProviderChoice,
    available_onnx_providers,
    expand_options,
    import_litert,
)
from edgeopt.agent.bundle import Artifact, Manifest, TensorSpec
from edgeopt.agent.errors import LoadError
from edgeopt.devices.probe import HostFacts, match_profiles
from edgeopt.devices.profiles import DeviceProfile, ProfileError, RuntimeOption, list_profiles, load_profile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    """One candidate of the selection walk and what became of it."""

    runtime: str
    artifact: str | None
    selected: bool
    reason: str

    def describe(self) -> str:
        verdict = "selected" if self.selected else "skipped"
        target = f"{self.runtime} with {self.artifact}" if self.artifact else self.runtime
        return f"{verdict:<8} {target}: {self.reason}"


@dataclass
class Selection:
    """The backend chosen for a bundle and the walk that led to it."""

    backend: Backend
    runtime: RuntimeOption
    artifact: Artifact
    attempts: list[Attempt] = field(default_factory=list)


# --- device check ---------------------------------------------------------------------


def check_device(manifest: Manifest, facts: HostFacts, force: bool) -> DeviceProfile:
    """Return the bundle's device profile; raise LoadError when this board does not match it.

    A host can match several profiles (an AVX-512 VNNI machine also matches x86-avx2); the
    bundle's device only has to be among them. With ``force`` a mismatch logs a warning.
    """
    try:
        profile = load_profile(manifest.device)
    except ProfileError as exc:
        raise LoadError(f"bundle {manifest.name}: {exc}") from None

    matches = [p.id for p in match_profiles(facts)]
    if profile.id in matches:
        log.info("bundle %s targets %s, which matches this board (%s)", manifest.name, profile.id, facts.describe())
        return profile

    found = ", ".join(matches) if matches else "no device profile"
    message = f"bundle {manifest.name} was built for {profile.id}, but this board ({facts.describe()}) matches {found}"
    if not force:
        raise LoadError(f"{message}; rebuild the bundle for this device or pass --force to load it anyway")
    log.warning("%s; loading anyway because of --force", message)
    return profile


# --- runtime kinds --------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeKind:
    """How to check for and open one kind of runtime named in device profiles."""

    unavailable_reason: Callable[[RuntimeOption], str | None]
    open: Callable[[RuntimeOption, Path, Path, int | None], Backend]


# Install hint per execution provider, added to the reason printed when it is missing.
PROVIDER_INSTALL_HINTS = {
    "TensorrtExecutionProvider": "it needs onnxruntime-gpu built with TensorRT (on Jetson, the JetPack wheel) and the TensorRT libraries",
    "CUDAExecutionProvider": "it needs onnxruntime-gpu and matching CUDA and cuDNN libraries",
    "CoreMLExecutionProvider": "it ships in the onnxruntime wheels for macOS",
    "OpenVINOExecutionProvider": "it needs the onnxruntime-openvino package",
    "XnnpackExecutionProvider": "it needs an onnxruntime build configured with --use_xnnpack",
}

# Options the LiteRT runtime accepts in a profile's [[runtimes]] entry.
LITERT_OPTIONS = ("num_threads", "xnnpack")


def _onnxruntime_unavailable(runtime: RuntimeOption) -> str | None:
    providers = available_onnx_providers()
    if not providers:
        return "onnxruntime is not installed: pip install 'edgeopt[agent]'"
    if runtime.provider and runtime.provider not in providers:
        hint = PROVIDER_INSTALL_HINTS.get(runtime.provider)
        return (
            f"execution provider {runtime.provider} is not available in this onnxruntime build (available: {', '.join(providers)})"
            + (f"; {hint}" if hint else "")
        )
    return None


def provider_choice(runtime: RuntimeOption, cache_dir: Path) -> ProviderChoice:
    """Return the execution provider and options an ONNX Runtime chain entry passes to InferenceSession."""
    return ProviderChoice(runtime.provider or "CPUExecutionProvider", expand_options(runtime.options, cache_dir))


def _open_onnxruntime(runtime: RuntimeOption, model_path: Path, cache_dir: Path, intra_op_threads: int | None) -> Backend:
    return OnnxRuntimeBackend(model_path, [provider_choice(runtime, cache_dir)], intra_op_threads=intra_op_threads)


def _litert_unavailable(runtime: RuntimeOption) -> str | None:
    try:
        import_litert()
    except BackendError as exc:
        return str(exc)
    return None


def _open_litert(runtime: RuntimeOption, model_path: Path, cache_dir: Path, intra_op_threads: int | None) -> Backend:
    unknown = sorted(set(runtime.options) - set(LITERT_OPTIONS))
    if unknown:
        raise BackendError(f"unknown LiteRT option(s) {', '.join(unknown)} in the device profile; allowed: {', '.join(LITERT_OPTIONS)}")
    # The profile's thread count wins: runs on one interpreter are serialized, so XNNPACK
    # may use every core the profile assigns to it.
    threads = runtime.options.get("num_threads") or intra_op_threads
    return LiteRtBackend(model_path, num_threads=threads, xnnpack=bool(runtime.options.get("xnnpack", True)))


RUNTIME_KINDS: dict[str, RuntimeKind] = {
    "onnxruntime": RuntimeKind(_onnxruntime_unavailable, _open_onnxruntime),
    "litert": RuntimeKind(_litert_unavailable, _open_litert),
}


def recorded_chain_mismatch(manifest: Manifest, profile: DeviceProfile) -> str | None:
    """Return how the runtime chain recorded in the bundle differs from this agent's profile, or None."""
    recorded = manifest.raw.get("runtimes")
    if recorded is None:
        return None
    current = [(rt.kind, rt.provider, dict(rt.options)) for rt in profile.runtimes]
    built_for = [(entry.get("kind"), entry.get("provider"), dict(entry.get("options") or {})) for entry in recorded]
    if built_for == current:
        return None
    labels = " -> ".join(str(provider or kind) for kind, provider, _ in built_for)
    return f"bundle {manifest.name} was built for the runtime chain {labels} with other options than this agent's {profile.id} profile; the agent uses its profile"


def runtime_unavailable_reason(runtime: RuntimeOption) -> str | None:
    """Return why ``runtime`` cannot run on this machine, or None when it can."""
    kind = RUNTIME_KINDS.get(runtime.kind)
    if kind is None:
        return f"runtime kind {runtime.kind!r} is not supported by this agent"
    return kind.unavailable_reason(runtime)


# --- self-test ------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfTest:
    """A sample input, the source model's output for it and the tolerances to compare with."""

    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    atol: float
    rtol: float
    check_top1: bool
    overrides: dict[str, dict[str, float]]

    @classmethod
    def load(cls, bundle_dir: Path, config: dict[str, Any]) -> "SelfTest":
        try:
            with np.load(bundle_dir / config["inputs"], allow_pickle=False) as data:
                inputs = {name: data[name] for name in data.files}
            with np.load(bundle_dir / config["expected"], allow_pickle=False) as data:
                expected = {name: data[name] for name in data.files}
        except KeyError as exc:
            raise LoadError(f"manifest selftest is missing the key {exc}") from None
        except (OSError, ValueError) as exc:
            raise LoadError(f"selftest data could not be read: {exc}") from None
        return cls(
            inputs=inputs,
            expected=expected,
            atol=float(config.get("atol", 1e-3)),
            rtol=float(config.get("rtol", 1e-3)),
            check_top1=bool(config.get("check_top1", False)),
            overrides=dict(config.get("artifacts", {})),
        )

    def tolerance(self, artifact: Artifact) -> tuple[float, float]:
        override = self.overrides.get(artifact.path, {})
        return float(override.get("atol", self.atol)), float(override.get("rtol", self.rtol))

    def failure(self, backend: Backend, artifact: Artifact) -> str | None:
        """Run the sample input; return why the outputs differ from the expected ones, or None."""
        atol, rtol = self.tolerance(artifact)
        try:
            actual = backend.run(self.inputs)
        except BackendError as exc:
            return f"self-test run failed: {exc}"

        for name, expected in self.expected.items():
            if name not in actual:
                return f"self-test output {name!r} is missing from the model outputs {sorted(actual)}"
            got = np.asarray(actual[name])
            if got.shape != expected.shape:
                return f"self-test output {name!r} has shape {list(got.shape)}, expected {list(expected.shape)}"
            diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))) if got.size else 0.0
            if not np.allclose(got, expected, atol=atol, rtol=rtol):
                return f"self-test output {name!r} differs: max abs difference {diff:.4g} exceeds atol {atol:g} + rtol {rtol:g}"
            if self.check_top1 and got.ndim >= 1 and got.size:
                if not np.array_equal(np.argmax(got, axis=-1), np.argmax(expected, axis=-1)):
                    return f"self-test output {name!r}: top-1 class {np.argmax(got, axis=-1).tolist()} differs from expected {np.argmax(expected, axis=-1).tolist()}"
        return None


def _signature_mismatch(expected: list[TensorSpec], actual: list[TensorSpec], kind: str) -> str | None:
    """Return how the artifact's tensors differ from the manifest's, or None when they agree."""
    by_name = {spec.name: spec for spec in actual}
    if set(by_name) != {spec.name for spec in expected}:
        return f"artifact {kind}s {sorted(by_name)} differ from the manifest's {sorted(s.name for s in expected)}"
    for spec in expected:
        found = by_name[spec.name]
        if found.datatype != spec.datatype or len(found.shape) != len(spec.shape):
            return f"artifact {kind} {found.describe()} does not match the manifest's {spec.describe()}"
    return None


# --- the walk -------------------------------------------------------------------------


def _suits(runtime: RuntimeOption, artifact: Artifact) -> bool:
    return runtime.label in artifact.runtimes or runtime.suits(artifact.format, artifact.precision)


def _try_candidate(
    runtime: RuntimeOption, artifact: Artifact, bundle_dir: Path, selftest: SelfTest | None, cache_dir: Path, intra_op_threads: int | None, manifest: Manifest
) -> tuple[Backend | None, str]:
    try:
        backend = RUNTIME_KINDS[runtime.kind].open(runtime, bundle_dir / artifact.path, cache_dir, intra_op_threads)
    except BackendError as exc:
        return None, str(exc)

    problem = _signature_mismatch(manifest.inputs, backend.inputs, "input") or _signature_mismatch(manifest.outputs, backend.outputs, "output")
    if problem is None and selftest is not None:
        problem = selftest.failure(backend, artifact)
    if problem is not None:
        backend.close()
        return None, problem

    if selftest is None:
        return backend, "loaded; the manifest has no self-test, so outputs were not checked"
    atol, rtol = selftest.tolerance(artifact)
    return backend, f"self-test passed (atol {atol:g}, rtol {rtol:g}{', top-1 matches' if selftest.check_top1 else ''})"


def select_runtime(
    bundle_dir: Path, manifest: Manifest, profile: DeviceProfile, cache_dir: Path, intra_op_threads: int | None = None
) -> Selection:
    """Pick the first runtime and artifact that load and pass the self-test; raise LoadError if none does."""
    mismatch = recorded_chain_mismatch(manifest, profile)
    if mismatch:
        log.warning(mismatch)

    selftest = SelfTest.load(bundle_dir, manifest.selftest) if manifest.selftest else None
    if selftest is None:
        log.warning("bundle %s has no self-test; the first artifact that loads is used unchecked", manifest.name)

    attempts: list[Attempt] = []

    def skip(runtime: str, artifact: str | None, reason: str) -> None:
        attempts.append(Attempt(runtime, artifact, False, reason))
        log.info("bundle %s: skipped %s%s: %s", manifest.name, runtime, f" with {artifact}" if artifact else "", reason)

    for runtime in profile.runtimes:
        unavailable = runtime_unavailable_reason(runtime)
        if unavailable:
            skip(runtime.label, None, unavailable)
            continue

        candidates = [a for a in manifest.artifacts if _suits(runtime, a)]
        if not candidates:
            skip(runtime.label, None, "no artifact in the bundle suits this runtime")
            continue

        for artifact in candidates:
            backend, reason = _try_candidate(runtime, artifact, bundle_dir, selftest, Path(cache_dir), intra_op_threads, manifest)
            if backend is None:
                skip(runtime.label, artifact.path, reason)
                continue
            attempts.append(Attempt(runtime.label, artifact.path, True, reason))
            log.info("bundle %s: selected %s with %s: %s", manifest.name, backend.runtime, artifact.path, reason)
            return Selection(backend, runtime, artifact, attempts)

    walk = "; ".join(a.describe() for a in attempts) or "the runtime chain is empty"
    raise LoadError(f"bundle {manifest.name}: no runtime in the {profile.id} chain could run it ({walk})")


def describe_runtimes() -> list[str]:
    """List each runtime and every execution provider the device profiles name: available or not, and why."""
    lines = []
    try:
        litert = import_litert()
        lines.append(f"litert: available ({litert.package} {litert.version}, XNNPACK delegate)")
    except BackendError as exc:
        lines.append(f"litert: not available: {exc}")

    try:
        import onnxruntime as ort
    except ImportError:
        lines.append("onnxruntime: not available: onnxruntime is not installed: pip install 'edgeopt[agent]'")
        return lines
    lines.append(f"onnxruntime {ort.__version__}: available")

    available = ort.get_available_providers()
    named = [rt.provider for profile in list_profiles() for rt in profile.runtimes if rt.provider]
    for provider in dict.fromkeys([*named, *available]):
        if provider in available:
            lines.append(f"  {provider}: available")
            continue
        hint = PROVIDER_INSTALL_HINTS.get(provider, "this onnxruntime build does not include it")
        lines.append(f"  {provider}: not available: {hint}")
    return lines
