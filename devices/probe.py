"""Identify the board this process runs on and match it against the device profiles.

Every read goes through a root directory so that tests can point the probe at a fake
filesystem tree laid out like a real board's.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from edgeopt.devices.profiles import DeviceProfile, list_profiles


@dataclass(frozen=True)
class HostFacts:
    """Recognition facts read off this machine."""

    system: str
    machine: str
    device_tree_model: str | None = None
    nv_tegra_release: str | None = None
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    cpu_model: str | None = None
    cpu_count: int | None = None

    def describe(self) -> str:
        parts = [f"{self.system} {self.machine}"]
        if self.device_tree_model:
            parts.append(f"device-tree model {self.device_tree_model!r}")
        if self.nv_tegra_release:
            parts.append(f"L4T {self.nv_tegra_release.split(',')[0].lstrip('# ').strip()}")
        if self.cpu_model:
            parts.append(self.cpu_model)
        return ", ".join(parts)


def _read_text(path: Path) -> str | None:
    try:
        # The device-tree model string is NUL-terminated (Linux devicetree ABI).
        return path.read_text(encoding="utf-8", errors="replace").rstrip("\x00\n ")
    except OSError:
        return None


def _parse_cpuinfo(text: str) -> tuple[frozenset[str], str | None]:
    """Return CPU flags and model name from /proc/cpuinfo text (x86 "flags", Arm "Features")."""
    flags: set[str] = set()
    model = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags.update(value.split())
        elif key in ("model name", "hardware") and model is None:
            model = value.strip()
    return frozenset(flags), model


def probe_host(root: Path | str = "/", system: str | None = None, machine: str | None = None) -> HostFacts:
    """Read the facts that profiles use for recognition from ``root`` (``/`` on a real board)."""
    root = Path(root)
    cpuinfo = _read_text(root / "proc/cpuinfo") or ""
    flags, model = _parse_cpuinfo(cpuinfo)
    cpu_count = cpuinfo.count("processor\t:") or cpuinfo.count("processor :") or None
    return HostFacts(
        system=system or platform.system(),
        machine=machine or platform.machine(),
        device_tree_model=_read_text(root / "proc/device-tree/model"),
        nv_tegra_release=_read_text(root / "etc/nv_tegra_release"),
        cpu_flags=flags,
        cpu_model=model or platform.processor() or None,
        cpu_count=cpu_count,
    )


def profile_matches(profile: DeviceProfile, facts: HostFacts) -> bool:
    """Return whether every recognition fact of ``profile`` holds on ``facts``."""
    rec = profile.recognition
    if rec.condition_count() == 0:
        return False
    if rec.system is not None and rec.system != facts.system:
        return False
    if rec.machine and facts.machine not in rec.machine:
        return False
    if rec.device_tree_model and not any(s in (facts.device_tree_model or "") for s in rec.device_tree_model):
        return False
    if rec.nv_tegra_release and not any(s in (facts.nv_tegra_release or "") for s in rec.nv_tegra_release):
        return False
    if rec.cpu_flags and not set(rec.cpu_flags) <= facts.cpu_flags:
        return False
    return True


def match_profiles(facts: HostFacts, profiles: list[DeviceProfile] | None = None) -> list[DeviceProfile]:
    """Return the profiles that recognise this host, most specific first."""
    candidates = [p for p in (profiles or list_profiles()) if profile_matches(p, facts)]
    return sorted(
        candidates,
        key=lambda p: (p.recognition.priority, p.recognition.condition_count()),
        reverse=True,
    )


def detect_profile(facts: HostFacts | None = None) -> DeviceProfile | None:
    """Return the most specific profile that matches this host, or None."""
    matches = match_profiles(facts or probe_host())
    return matches[0] if matches else None
