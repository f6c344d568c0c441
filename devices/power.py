"""Power sensors: read real board power where a sensor exists, estimate it where none does.

Each sensor kind named by a device profile (``[power] sensor``) has one class here. Files are
read under an injectable root and commands go through an injectable runner, so tests run the
parsers on fake sysfs trees and captured command outputs laid out like a real board's.
``open_power_sensor`` picks the profile's sensor and falls back to an estimate from the
profile's power figures when the sensor is missing or not readable.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgeopt.devices.profiles import DeviceProfile, PowerFigures
from edgeopt.devices.sensors import CpuUsage

log = logging.getLogger(__name__)

Runner = Callable[[Sequence[str]], str]

SENSOR_KINDS = ("ina3221", "rpi5-pmic", "rapl", "nvml", "powermetrics", "estimated")


class SensorUnavailable(RuntimeError):
    """The sensor does not exist on this machine or this process may not read it."""


def run_command(argv: Sequence[str], timeout: float = 5.0) -> str:
    """Run ``argv`` and return its standard output; any failure raises SensorUnavailable."""
    try:
        completed = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise SensorUnavailable(f"{argv[0]} is not installed") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SensorUnavailable(f"{' '.join(argv)} failed: {exc}") from exc
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()
        raise SensorUnavailable(
            f"{' '.join(argv)} exited with status {completed.returncode}: {detail[0] if detail else 'no output'}"
        )
    return completed.stdout


@dataclass(frozen=True)
class Rail:
    """One measured supply rail. Voltage and current are present where the sensor reports them."""

    name: str
    power_w: float
    voltage_v: float | None = None
    current_a: float | None = None


@dataclass(frozen=True)
class PowerReading:
    """One sensor reading.

    ``power_w`` is the board (or package) power, or None while a counter-based sensor has only
    one sample. ``energy_j`` is a cumulative energy counter for sensors that have one; only
    differences between two readings of the same sensor are meaningful.
    """

    source: str
    power_w: float | None
    rails: tuple[Rail, ...] = ()
    energy_j: float | None = None
    estimated: bool = False


class PowerSensor(Protocol):
    source: str
    estimated: bool

    def read(self) -> PowerReading: ...

    def close(self) -> None: ...


def _read_int(path: Path) -> int:
    return int(path.read_text(encoding="ascii").strip())


def _read_label(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


# --- Jetson: INA3221 ---------------------------------------------------------------------------

# Rails that measure the whole module input: VDD_IN on Jetson Orin NX/Nano and Xavier NX,
# POM_5V_IN on Jetson Nano and TX1.
_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")


def _hwmon_rails(hwmon: Path) -> list[Rail]:
    """Read the rails of one INA3221 hwmon directory (mainline ``ina3221`` driver).

    Channels 1-3 carry ``inN_label``, ``inN_input`` (bus voltage, mV) and ``currN_input`` (mA).
    in4-in6 are the shunt voltages and in7 with curr4 is the "sum of shunt voltages" channel.
    None of these is a rail, so they are skipped because adding them would count current twice.
    """
    rails = []
    for label_path in sorted(hwmon.glob("in*_label")):
        channel = label_path.name[len("in"):-len("_label")]
        name = _read_label(label_path)
        if name == "NC" or "shunt" in name.lower():
            continue
        current_path = hwmon / f"curr{channel}_input"
        voltage_path = hwmon / f"in{channel}_input"
        if not current_path.exists() or not voltage_path.exists():
            continue
        voltage_v = _read_int(voltage_path) / 1000.0
        current_a = _read_int(current_path) / 1000.0
        rails.append(Rail(name=name, power_w=voltage_v * current_a, voltage_v=voltage_v, current_a=current_a))
    return rails


def _iio_rails(device: Path) -> list[Rail]:
    """Read the rails of one L4T ``ina3221x`` iio device (JetPack 4 and older).

    Channel N has ``rail_name_N`` and ``in_power{N}_input`` (mW), ``in_current{N}_input`` (mA)
    and ``in_voltage{N}_input`` (mV).
    """
    rails = []
    for name_path in sorted(device.glob("rail_name_*")):
        channel = name_path.name[len("rail_name_"):]
        name = _read_label(name_path)
        if name == "NC":
            continue
        power_path = device / f"in_power{channel}_input"
        if not power_path.exists():
            continue
        voltage_path = device / f"in_voltage{channel}_input"
        current_path = device / f"in_current{channel}_input"
        rails.append(
            Rail(
                name=name,
                power_w=_read_int(power_path) / 1000.0,
                voltage_v=_read_int(voltage_path) / 1000.0 if voltage_path.exists() else None,
                current_a=_read_int(current_path) / 1000.0 if current_path.exists() else None,
            )
        )
    return rails


class Ina3221Sensor:
    """NVIDIA Jetson on-module INA3221 power monitors, through hwmon or the older L4T iio driver."""

    source = "ina3221"
    estimated = False

    def __init__(self, root: Path | str = "/"):
        root = Path(root)
        drivers = root / "sys/bus/i2c/drivers"
        self._hwmon_dirs = sorted(drivers.glob("ina3221/*/hwmon/hwmon*"))
        self._iio_dirs = sorted(drivers.glob("ina3221x/*/iio:device*"))
        if not self._hwmon_dirs and not self._iio_dirs:
            raise SensorUnavailable(f"no INA3221 under {drivers} (ina3221/*/hwmon or ina3221x/*/iio:device*)")
        try:
            self.read()
        except OSError as exc:
            raise SensorUnavailable(f"INA3221 rails are not readable: {exc}") from exc

    def read(self) -> PowerReading:
        rails: list[Rail] = []
        for hwmon in self._hwmon_dirs:
            rails.extend(_hwmon_rails(hwmon))
        for device in self._iio_dirs:
            rails.extend(_iio_rails(device))
        if not rails:
            raise SensorUnavailable("the INA3221 directories contain no readable rail")

        total = next((rail.power_w for rail in rails if rail.name in _TOTAL_RAILS), None)
        if total is None:
            # NOTE: without an input rail (AGX Orin, AGX Xavier) the sum covers only the
            # monitored rails, so it is below the power drawn at the barrel jack.
            total = sum(rail.power_w for rail in rails)
        return PowerReading(source=self.source, power_w=total, rails=tuple(rails))

    def close(self) -> None:
        pass


# --- Raspberry Pi 5: PMIC ADC ------------------------------------------------------------------

# Lines of `vcgencmd pmic_read_adc` look like "  VDD_CORE_A current(7)=0.71830000A" and
# "  VDD_CORE_V volt(15)=0.72045000V": a rail name with an _A or _V suffix, the ADC channel
# and the value with its unit.
_PMIC_LINE = re.compile(r"^\s*(?P<rail>\S+)_(?P<kind>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)[AV]\s*$")


def parse_pmic_read_adc(text: str) -> list[Rail]:
    """Parse ``vcgencmd pmic_read_adc`` output into rails that have both a current and a voltage.

    EXT5V (the USB-C input) and BATT (the RTC battery) report only a voltage, so they are not rails.
    """
    currents: dict[str, float] = {}
    voltages: dict[str, float] = {}
    for line in text.splitlines():
        match = _PMIC_LINE.match(line)
        if not match:
            continue
        target = currents if match["kind"] == "A" else voltages
        target[match["rail"]] = float(match["value"])
    return [
        Rail(name=name, power_w=current * voltages[name], voltage_v=voltages[name], current_a=current)
        for name, current in currents.items()
        if name in voltages
    ]


class RaspberryPi5PmicSensor:
    """Raspberry Pi 5 power from the PMIC's ADC, read with ``vcgencmd pmic_read_adc``.

    The Raspberry Pi 4 and older boards have no PMIC with current sensing, so their profile uses
    the estimate instead.
    """

    source = "rpi5-pmic"
    estimated = False
    command = ("vcgencmd", "pmic_read_adc")

    def __init__(self, runner: Runner = run_command):
        self._runner = runner
        reading = self.read()
        if not reading.rails:
            raise SensorUnavailable("vcgencmd pmic_read_adc returned no rails; this board has no Raspberry Pi 5 PMIC")

    def read(self) -> PowerReading:
        rails = parse_pmic_read_adc(self._runner(self.command))
        # NOTE: the PMIC rails are the supplies the PMIC generates. Power that goes from the 5 V
        # input straight to USB ports and HATs, and the PMIC's own conversion loss, are not in
        # the sum, so it is below the power at the USB-C connector.
        return PowerReading(source=self.source, power_w=sum(rail.power_w for rail in rails), rails=tuple(rails))

    def close(self) -> None:
        pass


# --- x86: RAPL powercap --------------------------------------------------------------------------


@dataclass
class _RaplZone:
    name: str
    energy_path: Path
    max_range_uj: int
    last_uj: int | None = None


class RaplSensor:
    """CPU package energy from the Linux powercap RAPL counters (Intel, and AMD Zen on kernels with AMD RAPL support).

    Top-level zones ``intel-rapl:N`` are packages (``package-N``) or, on some Intel laptops,
    the whole platform (``psys``). Sub-zones such as core and uncore are inside the package
    figure, so only top-level zones are read. When ``psys`` exists it is the total because it
    contains the packages.
    """

    source = "rapl"
    estimated = False

    def __init__(self, root: Path | str = "/", clock: Callable[[], float] = time.monotonic):
        powercap = Path(root) / "sys/class/powercap"
        zone_dirs = sorted(p for p in powercap.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not zone_dirs:
            raise SensorUnavailable(f"no RAPL zones under {powercap}")

        zones = []
        for zone_dir in zone_dirs:
            name = _read_label(zone_dir / "name")
            zones.append(_RaplZone(name, zone_dir / "energy_uj", _read_int(zone_dir / "max_energy_range_uj")))
        platform_zones = [zone for zone in zones if zone.name == "psys"]
        self._zones = platform_zones or zones

        self._clock = clock
        self._energy_j = 0.0
        self._last_time: float | None = None
        try:
            self.read()
        except PermissionError as exc:
            # Kernels patched for CVE-2020-8694 (Platypus) make energy_uj readable by root only.
            raise SensorUnavailable(
                f"{exc.filename} is readable by root only; run the agent as root or grant read access with a udev rule"
            ) from exc

    def read(self) -> PowerReading:
        now = self._clock()
        added_j = 0.0
        rails = []
        first = self._last_time is None
        for zone in self._zones:
            counter = _read_int(zone.energy_path)
            if zone.last_uj is not None:
                delta = counter - zone.last_uj
                if delta < 0:
                    # The counter wrapped at max_energy_range_uj (powercap sysfs ABI).
                    delta += zone.max_range_uj
                added_j += delta / 1e6
                zone_power = delta / 1e6 / (now - self._last_time) if now > self._last_time else 0.0
                rails.append(Rail(name=zone.name, power_w=zone_power))
            zone.last_uj = counter

        power = None
        if not first and now > self._last_time:
            power = added_j / (now - self._last_time)
        self._energy_j += added_j
        self._last_time = now
        return PowerReading(source=self.source, power_w=power, rails=tuple(rails), energy_j=self._energy_j)

    def close(self) -> None:
        pass


# --- NVIDIA GPUs: NVML ---------------------------------------------------------------------------


class NvmlSensor:
    """NVIDIA GPU power through NVML (PyPI package nvidia-ml-py, imported as ``pynvml``).

    Power is the sum over all GPUs. The energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
    mJ since the driver loaded) exists on Volta and newer GPUs; it is used when every GPU has it.
    """

    source = "nvml"
    estimated = False

    def __init__(self):
        try:
            import pynvml
        except ImportError as exc:
            raise SensorUnavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from exc
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise SensorUnavailable(f"NVML did not initialise: {exc}") from exc

        self._handles = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            self._handles.append((f"GPU{index} {name.decode() if isinstance(name, bytes) else name}", handle))
        if not self._handles:
            pynvml.nvmlShutdown()
            raise SensorUnavailable("NVML found no GPU")

        self._has_energy = True
        try:
            self.read()
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise SensorUnavailable(f"NVML cannot read power: {exc}") from exc

    def read(self) -> PowerReading:
        nvml = self._nvml
        rails = []
        energy_mj = 0
        for name, handle in self._handles:
            rails.append(Rail(name=name, power_w=nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0))
            if self._has_energy:
                try:
                    energy_mj += nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                except nvml.NVMLError_NotSupported:
                    self._has_energy = False
        return PowerReading(
            source=self.source,
            power_w=sum(rail.power_w for rail in rails),
            rails=tuple(rails),
            energy_j=energy_mj / 1000.0 if self._has_energy else None,
        )

    def close(self) -> None:
        self._nvml.nvmlShutdown()


# --- macOS: powermetrics ------------------------------------------------------------------------

# Apple silicon prints "CPU Power: 1234 mW", "GPU Power: 56 mW", "ANE Power: 0 mW" and
# "Combined Power (CPU + GPU + ANE): 1290 mW"; Intel Macs print
# "Intel energy model derived package power (CPUs+GT+SA): 3.21W".
_POWERMETRICS_LINE = re.compile(r"^(?P<name>[A-Za-z][^:]*?\bpower\b[^:]*):\s*(?P<value>[0-9.]+)\s*(?P<unit>mW|W)\s*$", re.I)


def parse_powermetrics(text: str) -> tuple[float | None, list[Rail]]:
    """Return the combined power in watts and the per-unit rails from ``powermetrics`` output."""
    rails = []
    total = None
    for line in text.splitlines():
        match = _POWERMETRICS_LINE.match(line.strip())
        if not match:
            continue
        watts = float(match["value"]) / (1000.0 if match["unit"] == "mW" else 1.0)
        name = match["name"].strip()
        if name.lower().startswith("combined power") or "package power" in name.lower():
            total = watts
        elif all(rail.name != name.removesuffix(" Power") for rail in rails):
            # The GPU sampler repeats "GPU Power" in its own section; keep the first.
            rails.append(Rail(name=name.removesuffix(" Power"), power_w=watts))
    if total is None and rails:
        total = sum(rail.power_w for rail in rails)
    return total, rails


class PowermetricsSensor:
    """macOS power from ``powermetrics`` (needs root: run the agent with sudo or as a launchd daemon).

    Every read samples for ``sample_ms`` milliseconds, so a read takes that long.
    """

    source = "powermetrics"
    estimated = False

    def __init__(self, runner: Runner = run_command, sample_ms: int = 200):
        self._runner = runner
        self.command = ("powermetrics", "--samplers", "cpu_power,gpu_power,ane_power", "-i", str(sample_ms), "-n", "1")
        reading = self.read()
        if reading.power_w is None:
            raise SensorUnavailable("powermetrics output contains no power figures")

    def read(self) -> PowerReading:
        total, rails = parse_powermetrics(self._runner(self.command))
        return PowerReading(source=self.source, power_w=total, rails=tuple(rails))

    def close(self) -> None:
        pass


# --- Estimate ----------------------------------------------------------------------------------------


class EstimatedPowerSensor:
    """Board power estimated from the profile's idle and maximum figures and CPU utilisation.

    power = idle_w + (max_w - idle_w) * cpu_utilisation. The reading is labelled estimated and
    is never reported as a measurement.
    """

    source = "estimated"
    estimated = True

    def __init__(self, figures: PowerFigures, cpu_percent: Callable[[], float | None]):
        self.figures = figures
        self._cpu_percent = cpu_percent
        self._last_percent = 0.0

    def read(self) -> PowerReading:
        percent = self._cpu_percent()
        if percent is not None:
            self._last_percent = percent
        power = self.figures.idle_w + (self.figures.max_w - self.figures.idle_w) * self._last_percent / 100.0
        return PowerReading(source=self.source, power_w=power, estimated=True)

    def close(self) -> None:
        pass


def open_power_sensor(
    profile: DeviceProfile,
    root: Path | str = "/",
    runner: Runner = run_command,
) -> PowerSensor:
    """Open the sensor the profile names, or the estimate when that sensor cannot be read here."""
    kind = profile.power.sensor
    openers: dict[str, Callable[[], PowerSensor]] = {
        "ina3221": lambda: Ina3221Sensor(root),
        "rpi5-pmic": lambda: RaspberryPi5PmicSensor(runner),
        "rapl": lambda: RaplSensor(root),
        "nvml": NvmlSensor,
        "powermetrics": lambda: PowermetricsSensor(runner),
    }
    if kind not in SENSOR_KINDS:
        raise ValueError(f"profile {profile.id!r} names unknown power sensor {kind!r}; use one of {', '.join(SENSOR_KINDS)}")

    if kind != "estimated":
        try:
            sensor = openers[kind]()
            log.info("power sensor %s opened for profile %s", kind, profile.id)
            return sensor
        except (SensorUnavailable, OSError, ValueError) as exc:
            log.warning("power sensor %s of profile %s is unavailable (%s); reporting an estimate", kind, profile.id, exc)

    return EstimatedPowerSensor(profile.power, CpuUsage(root).percent)


# --- Energy over an interval -------------------------------------------------------------------------


@dataclass(frozen=True)
class IntervalEnergy:
    """Energy used over one reporting interval and how it was obtained.

    ``method`` is ``counter`` (difference of a hardware energy counter), ``integrated``
    (trapezoidal integral of measured power samples) or ``estimated`` (integral of the estimate).
    """

    energy_j: float | None
    duration_s: float
    mean_power_w: float | None
    method: str
    source: str
    samples: int

    def per_inference_mj(self, inferences: int) -> float | None:
        if self.energy_j is None or inferences <= 0:
            return None
        return 1000.0 * self.energy_j / inferences


class EnergyMeter:
    """Sample a power sensor several times per interval and return the energy of each interval."""

    def __init__(self, sensor: PowerSensor, clock: Callable[[], float] = time.monotonic):
        self.sensor = sensor
        self._clock = clock
        self._errors = 0
        self._start = clock()
        self._points: list[tuple[float, float]] = []
        self._counter_start: float | None = None
        self._counter_last: float | None = None
        self._counter_samples = 0
        self.last: PowerReading | None = None
        self.sample()

    def sample(self) -> PowerReading | None:
        """Read the sensor once; a failed read is logged and skipped."""
        now = self._clock()
        try:
            reading = self.sensor.read()
        except (OSError, ValueError, SensorUnavailable) as exc:
            self._errors += 1
            # Log the first failure and then every 100th, so a broken sensor cannot flood the log.
            if self._errors == 1 or self._errors % 100 == 0:
                log.warning("power sensor %s read failed (%d failures so far): %s", self.sensor.source, self._errors, exc)
            return None

        self.last = reading
        if reading.power_w is not None:
            self._points.append((now, reading.power_w))
        if reading.energy_j is not None:
            if self._counter_start is None:
                self._counter_start = reading.energy_j
            self._counter_last = reading.energy_j
            self._counter_samples += 1
        return reading

    def take(self) -> IntervalEnergy:
        """Sample once more, then return the energy since the previous ``take`` and start a new interval."""
        self.sample()
        now = self._clock()
        duration = now - self._start
        points = self._points

        if self._counter_samples >= 2 and self._counter_start is not None and self._counter_last is not None:
            energy = self._counter_last - self._counter_start
            method = "counter"
        elif len(points) >= 2:
            energy = sum((t1 - t0) * (p0 + p1) / 2.0 for (t0, p0), (t1, p1) in zip(points, points[1:]))
            span = points[-1][0] - points[0][0]
            # Scale the integral from the span between the first and last sample to the interval.
            energy = energy * duration / span if span > 0 else None
            method = "estimated" if self.sensor.estimated else "integrated"
        else:
            energy = None
            method = "estimated" if self.sensor.estimated else "integrated"

        if energy is not None and duration > 0:
            mean_power = energy / duration
        elif points:
            mean_power = points[-1][1]
        else:
            mean_power = None
        result = IntervalEnergy(
            energy_j=energy,
            duration_s=duration,
            mean_power_w=mean_power,
            method=method,
            source=self.sensor.source,
            samples=len(points),
        )

        self._start = now
        self._points = points[-1:]
        self._counter_start = self._counter_last
        self._counter_samples = 1 if self._counter_last is not None else 0
        return result
