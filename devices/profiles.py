"""Typed device profiles loaded from the TOML files beside this module.

A profile is data: adding a board means adding a TOML file, not code. The loader
rejects unknown keys so that a typo in a profile fails loudly instead of being
ignored.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10 boards
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parent

PRECISIONS = ("fp32", "fp16", "int8")
ARTIFACT_FORMATS = ("onnx", "tflite")
RUNTIME_KINDS = ("onnxruntime", "litert")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANT_METHODS = ("none", "fp16", "static", "dynamic")


class ProfileError(ValueError):
    """A profile name is unknown or a profile file is invalid."""


@dataclass(frozen=True)
class Recognition:
    """Facts that identify the board at run time; every listed fact must match."""

    device_tree_model: tuple[str, ...] = ()
    nv_tegra_release: tuple[str, ...] = ()
    cpu_flags: tuple[str, ...] = ()
    system: str | None = None
    machine: tuple[str, ...] = ()
    priority: int = 0

    def condition_count(self) -> int:
        """Count the facts this recognition checks; more facts mean a more specific match."""
        return sum(
            [
                bool(self.device_tree_model),
                bool(self.nv_tegra_release),
                len(self.cpu_flags),
                self.system is not None,
                bool(self.machine),
            ]
        )


@dataclass(frozen=True)
class RuntimeOption:
    """One link of the runtime preference chain: a runtime, its options and what it runs."""

    kind: str
    provider: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    precisions: tuple[str, ...] = ("fp32",)
    formats: tuple[str, ...] = ("onnx",)
    note: str = ""

    @property
    def label(self) -> str:
        return self.provider or self.kind

    def suits(self, artifact_format: str, precision: str) -> bool:
        return artifact_format in self.formats and precision in self.precisions


@dataclass(frozen=True)
class QuantCandidate:
    """One model variant the builder produces and evaluates for this device."""

    id: str
    precision: str
    format: str = "onnx"
    method: str = "none"
    quant_format: str = "QDQ"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    calibration: str = "minmax"
    note: str = ""


@dataclass(frozen=True)
class PowerFigures:
    """Power sensor kind and typical board power used for estimates when no sensor exists."""

    sensor: str
    idle_w: float
    max_w: float
    source: str = ""


@dataclass(frozen=True)
class DeviceProfile:
    """Everything the builder and the agent need to know about one target board."""

    id: str
    name: str
    arch: str
    cpu: str
    cores: int
    memory_mb: int
    accelerator: str
    power: PowerFigures
    recognition: Recognition
    runtimes: tuple[RuntimeOption, ...]
    precision_preference: tuple[str, ...]
    formats: tuple[str, ...]
    candidates: tuple[QuantCandidate, ...]
    notes: tuple[str, ...] = ()
    path: Path | None = None

    def candidate(self, candidate_id: str) -> QuantCandidate:
        for candidate in self.candidates:
            if candidate.id == candidate_id:
                return candidate
        raise ProfileError(f"profile {self.id!r} has no candidate {candidate_id!r}")

    def runtimes_for(self, artifact_format: str, precision: str) -> list[str]:
        """Return the labels of the runtimes in the chain that can run such an artifact."""
        return [rt.label for rt in self.runtimes if rt.suits(artifact_format, precision)]


def _build(cls: type, data: dict[str, Any], where: str, converters: dict[str, Any] | None = None):
    """Create dataclass ``cls`` from TOML data, rejecting unknown keys."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    kwargs = dict(data)
    for key, convert in (converters or {}).items():
        if key in kwargs:
            kwargs[key] = convert(kwargs[key])
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ProfileError(f"{where}: {exc}") from exc


def _check_choice(value: str, allowed: tuple[str, ...], where: str) -> None:
    if value not in allowed:
        raise ProfileError(f"{where}: {value!r} is not one of {', '.join(allowed)}")


def _parse_profile(path: Path) -> DeviceProfile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: invalid TOML: {exc}") from exc

    where = str(path)
    data = dict(data)
    power = _build(PowerFigures, data.pop("power", {}), f"{where} [power]")
    recognition = _build(
        Recognition,
        data.pop("recognition", {}),
        f"{where} [recognition]",
        {key: tuple for key in ("device_tree_model", "nv_tegra_release", "cpu_flags", "machine")},
    )

    runtimes = []
    for index, raw in enumerate(data.pop("runtimes", [])):
        runtime = _build(
            RuntimeOption,
            raw,
            f"{where} [[runtimes]] #{index + 1}",
            {"precisions": tuple, "formats": tuple},
        )
        _check_choice(runtime.kind, RUNTIME_KINDS, f"{where} runtime {runtime.label}")
        for precision in runtime.precisions:
            _check_choice(precision, PRECISIONS, f"{where} runtime {runtime.label} precision")
        runtimes.append(runtime)

    candidates = []
    for index, raw in enumerate(data.pop("candidates", [])):
        candidate = _build(QuantCandidate, raw, f"{where} [[candidates]] #{index + 1}")
        _check_choice(candidate.precision, PRECISIONS, f"{where} candidate {candidate.id} precision")
        _check_choice(candidate.format, ARTIFACT_FORMATS, f"{where} candidate {candidate.id} format")
        _check_choice(candidate.method, QUANT_METHODS, f"{where} candidate {candidate.id} method")
        _check_choice(candidate.calibration, CALIBRATION_METHODS, f"{where} candidate {candidate.id} calibration")
        candidates.append(candidate)

    profile = _build(
        DeviceProfile,
        {**data, "power": power, "recognition": recognition, "runtimes": tuple(runtimes), "candidates": tuple(candidates), "path": path},
        where,
        {"precision_preference": tuple, "formats": tuple, "notes": tuple},
    )

    if profile.id != path.stem:
        raise ProfileError(f"{where}: id {profile.id!r} must equal the file name {path.stem!r}")
    if not profile.runtimes:
        raise ProfileError(f"{where}: the runtime chain [[runtimes]] is empty")
    if not any(c.precision == "fp32" for c in profile.candidates):
        raise ProfileError(f"{where}: an fp32 candidate is required as the fallback")
    return profile


@lru_cache(maxsize=None)
def _load_all(directory: Path) -> dict[str, DeviceProfile]:
    profiles = {}
    for path in sorted(directory.glob("*.toml")):
        profile = _parse_profile(path)
        profiles[profile.id] = profile
    return profiles


def list_profiles(directory: Path | None = None) -> list[DeviceProfile]:
    """Load every profile in ``directory`` (default: the packaged profiles), sorted by id."""
    return list(_load_all(directory or PROFILE_DIR).values())


def load_profile(name: str, directory: Path | None = None) -> DeviceProfile:
    """Return the profile called ``name``; an unknown name raises with the closest match."""
    profiles = _load_all(directory or PROFILE_DIR)
    if name in profiles:
        return profiles[name]

    valid = ", ".join(profiles)
    close = difflib.get_close_matches(name, list(profiles), n=1, cutoff=0.4)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ProfileError(f"unknown device {name!r}; {hint}valid devices: {valid}")
