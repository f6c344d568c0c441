"""CPU utilisation, memory and temperatures of the host, read through an injectable root.

On Linux every value comes from procfs and sysfs under ``root`` so that tests can point the
readers at a fake tree. Where those files do not exist and ``root`` is the real ``/``
(macOS, for example), psutil provides the same figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Thermal zones report millidegrees Celsius (Linux thermal sysfs ABI). A reading outside this
# range comes from a disconnected or powered-down sensor, such as -256 °C on some Jetson zones.
_MIN_PLAUSIBLE_C = -60.0
_MAX_PLAUSIBLE_C = 200.0


def _is_real_root(root: Path) -> bool:
    return root.resolve() == Path("/")


@dataclass(frozen=True)
class MemoryUsage:
    """Physical memory in MiB; ``available`` counts what new allocations can use without swapping."""

    total_mb: float
    available_mb: float

    @property
    def used_mb(self) -> float:
        return self.total_mb - self.available_mb

    @property
    def percent(self) -> float:
        return 100.0 * self.used_mb / self.total_mb if self.total_mb else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "total_mb": round(self.total_mb, 1),
            "used_mb": round(self.used_mb, 1),
            "percent": round(self.percent, 1),
        }


@dataclass(frozen=True)
class ThermalZone:
    """One temperature sensor: its kernel type name (e.g. ``cpu-thermal``) and degrees Celsius."""

    name: str
    temp_c: float


@dataclass(frozen=True)
class SystemSample:
    """One reading of CPU utilisation, memory and temperatures."""

    cpu_percent: float | None
    memory: MemoryUsage | None
    temperatures: tuple[ThermalZone, ...] = field(default_factory=tuple)

    @property
    def max_temp_c(self) -> float | None:
        return max((zone.temp_c for zone in self.temperatures), default=None)

    def to_dict(self) -> dict[str, object]:
        return {
            "cpu_percent": None if self.cpu_percent is None else round(self.cpu_percent, 1),
            "memory": self.memory.to_dict() if self.memory else None,
            "temperature_c": None if self.max_temp_c is None else round(self.max_temp_c, 1),
            "temperatures_c": {zone.name: round(zone.temp_c, 1) for zone in self.temperatures},
        }


def _parse_proc_stat(text: str) -> tuple[int, int] | None:
    """Return (busy, total) jiffies from the aggregate ``cpu`` line of /proc/stat."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:]]
            # Columns (proc(5)): user nice system idle iowait irq softirq steal guest guest_nice.
            # guest and guest_nice are already counted in user and nice.
            counted = values[:8]
            idle = counted[3] + (counted[4] if len(counted) > 4 else 0)
            total = sum(counted)
            return total - idle, total
    return None


class CpuUsage:
    """CPU utilisation over the time between two calls, from /proc/stat under ``root``."""

    def __init__(self, root: Path | str = "/"):
        self.root = Path(root)
        self._stat_path = self.root / "proc/stat"
        self._previous: tuple[int, int] | None = None
        self._use_psutil = not self._stat_path.exists() and _is_real_root(self.root)
        self.percent()

    def percent(self) -> float | None:
        """Return the busy share of all CPUs, in percent, since the previous call (None on the first)."""
        if self._use_psutil:
            import psutil

            return float(psutil.cpu_percent(interval=None))

        try:
            counters = _parse_proc_stat(self._stat_path.read_text(encoding="ascii"))
        except (OSError, ValueError) as exc:
            log.debug("reading %s failed: %s", self._stat_path, exc)
            return None
        if counters is None:
            return None

        previous, self._previous = self._previous, counters
        if previous is None:
            return None
        busy = counters[0] - previous[0]
        total = counters[1] - previous[1]
        if total <= 0:
            return 0.0
        return max(0.0, min(100.0, 100.0 * busy / total))


def read_memory(root: Path | str = "/") -> MemoryUsage | None:
    """Read total and available memory from /proc/meminfo under ``root`` (psutil elsewhere)."""
    root = Path(root)
    meminfo = root / "proc/meminfo"
    if not meminfo.exists():
        if not _is_real_root(root):
            return None
        import psutil

        memory = psutil.virtual_memory()
        return MemoryUsage(total_mb=memory.total / 2**20, available_mb=memory.available / 2**20)

    values: dict[str, int] = {}
    for line in meminfo.read_text(encoding="ascii").splitlines():
        key, _, rest = line.partition(":")
        columns = rest.split()
        if columns:
            values[key] = int(columns[0])  # kB
    if "MemTotal" not in values:
        return None
    # MemAvailable exists since Linux 3.14; older kernels get the classic free + caches sum.
    available = values.get("MemAvailable")
    if available is None:
        available = values.get("MemFree", 0) + values.get("Buffers", 0) + values.get("Cached", 0)
    return MemoryUsage(total_mb=values["MemTotal"] / 1024, available_mb=available / 1024)


def read_thermal_zones(root: Path | str = "/") -> list[ThermalZone]:
    """Read every thermal zone under ``root``/sys/class/thermal, skipping faulty readings."""
    root = Path(root)
    thermal = root / "sys/class/thermal"
    if not thermal.is_dir():
        return _psutil_temperatures() if _is_real_root(root) else []

    zones = []
    for zone_dir in sorted(thermal.glob("thermal_zone*"), key=lambda p: int(p.name[len("thermal_zone"):] or 0)):
        try:
            name = (zone_dir / "type").read_text(encoding="utf-8").strip()
            temp_c = int((zone_dir / "temp").read_text(encoding="ascii").strip()) / 1000.0
        except (OSError, ValueError) as exc:
            # Some zones return EINVAL or ENODATA while their sensor is powered down.
            log.debug("skipping thermal zone %s: %s", zone_dir.name, exc)
            continue
        if _MIN_PLAUSIBLE_C <= temp_c <= _MAX_PLAUSIBLE_C:
            zones.append(ThermalZone(name=name, temp_c=temp_c))
    return zones


def _psutil_temperatures() -> list[ThermalZone]:
    import psutil

    reader = getattr(psutil, "sensors_temperatures", None)  # missing on macOS and Windows
    if reader is None:
        return []
    zones = []
    for chip, entries in reader().items():
        for entry in entries:
            label = f"{chip}-{entry.label}" if entry.label else chip
            if _MIN_PLAUSIBLE_C <= entry.current <= _MAX_PLAUSIBLE_C:
                zones.append(ThermalZone(name=label, temp_c=float(entry.current)))
    return zones


class SystemSensors:
    """CPU utilisation since the previous sample, memory and temperatures of one host."""

    def __init__(self, root: Path | str = "/"):
        self.root = Path(root)
        self.cpu = CpuUsage(self.root)

    def sample(self) -> SystemSample:
        return SystemSample(
            cpu_percent=self.cpu.percent(),
            memory=read_memory(self.root),
            temperatures=tuple(read_thermal_zones(self.root)),
        )
