"""Power and host sensors on fake sysfs trees and captured command outputs of each board."""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

import pytest

from edgeopt.devices import load_profile
from edgeopt.devices.power import (
    EnergyMeter,
    EstimatedPowerSensor,
    Ina3221Sensor,
    NvmlSensor,
    PowermetricsSensor,
    RaplSensor,
    RaspberryPi5PmicSensor,
    SensorUnavailable,
    open_power_sensor,
    parse_pmic_read_adc,
    parse_powermetrics,
    run_command,
)
from edgeopt.devices.sensors import CpuUsage, SystemSensors, read_memory, read_thermal_zones

FIXTURES = Path(__file__).parent / "fixtures"
SYSFS = FIXTURES / "sysfs"
COMMANDS = FIXTURES / "commands"


class FakeClock:
    def __init__(self, start: float = 100.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


def copy_tree(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(SYSFS / name, target)
    return target


def install_command(bin_dir: Path, name: str, output_file: Path, exit_status: int = 0) -> None:
    """Put an executable ``name`` on a private PATH that prints a captured output."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    # A failing tool prints its message on standard error, as powermetrics does without root.
    redirect = " >&2" if exit_status else ""
    script.write_text(f"#!/bin/sh\ncat '{output_file}'{redirect}\nexit {exit_status}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def private_path(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    return bin_dir


# --- Jetson INA3221 -------------------------------------------------------------------------------


def test_ina3221_hwmon_uses_vdd_in_as_total():
    reading = Ina3221Sensor(SYSFS / "jetson-orin-nano").read()

    assert reading.source == "ina3221"
    assert not reading.estimated
    assert [rail.name for rail in reading.rails] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert reading.power_w == pytest.approx(5.064 * 1.416)
    vdd_in = reading.rails[0]
    assert vdd_in.voltage_v == pytest.approx(5.064)
    assert vdd_in.current_a == pytest.approx(1.416)


def test_ina3221_hwmon_skips_nc_and_shunt_sum():
    reading = Ina3221Sensor(SYSFS / "jetson-agx-orin").read()

    names = [rail.name for rail in reading.rails]
    assert names == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    assert "NC" not in names
    assert not any("shunt" in name for name in names)
    expected = 19.240 * 1.336 + 19.240 * 0.392 + 4.984 * 0.904 + 4.984 * 0.312
    assert reading.power_w == pytest.approx(expected)


def test_ina3221_iio_uses_pom_5v_in_as_total():
    reading = Ina3221Sensor(SYSFS / "jetson-nano-l4t32").read()

    assert [rail.name for rail in reading.rails] == ["POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"]
    assert reading.power_w == pytest.approx(2.960)
    assert reading.rails[2].voltage_v == pytest.approx(5.0)
    assert reading.rails[2].current_a == pytest.approx(0.160)


def test_ina3221_iio_sums_rails_without_input_rail():
    reading = Ina3221Sensor(SYSFS / "jetson-agx-xavier-l4t32").read()

    assert len(reading.rails) == 6
    assert reading.power_w == pytest.approx((3061 + 6123 + 9185 + 0 + 1837 + 4093) / 1000)


def test_ina3221_missing_raises_unavailable(tmp_path):
    with pytest.raises(SensorUnavailable, match="no INA3221"):
        Ina3221Sensor(tmp_path)


def test_ina3221_reads_changed_values(tmp_path):
    root = copy_tree("jetson-orin-nano", tmp_path)
    sensor = Ina3221Sensor(root)
    hwmon = next(root.glob("sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"))
    (hwmon / "curr1_input").write_text("2000\n")

    assert sensor.read().power_w == pytest.approx(5.064 * 2.0)


# --- Raspberry Pi 5 PMIC --------------------------------------------------------------------------


def test_pmic_parser_pairs_current_and_voltage():
    rails = {rail.name: rail for rail in parse_pmic_read_adc((COMMANDS / "rpi5-pmic_read_adc.txt").read_text())}

    assert len(rails) == 12
    assert "EXT5V" not in rails
    assert "BATT" not in rails
    assert rails["VDD_CORE"].current_a == pytest.approx(1.2123)
    assert rails["VDD_CORE"].voltage_v == pytest.approx(0.841371)
    assert rails["VDD_CORE"].power_w == pytest.approx(1.2123 * 0.841371)


def test_pmic_sensor_runs_vcgencmd(private_path):
    install_command(private_path, "vcgencmd", COMMANDS / "rpi5-pmic_read_adc.txt")

    reading = RaspberryPi5PmicSensor().read()

    rails = parse_pmic_read_adc((COMMANDS / "rpi5-pmic_read_adc.txt").read_text())
    assert reading.source == "rpi5-pmic"
    assert reading.power_w == pytest.approx(sum(r.current_a * r.voltage_v for r in rails))
    assert 1.0 < reading.power_w < 3.0


def test_pmic_sensor_rejects_pi4_output(private_path):
    install_command(private_path, "vcgencmd", COMMANDS / "rpi4-pmic_read_adc.txt")

    with pytest.raises(SensorUnavailable, match="no rails"):
        RaspberryPi5PmicSensor()


def test_pmic_sensor_without_vcgencmd(private_path):
    with pytest.raises(SensorUnavailable, match="vcgencmd is not installed"):
        RaspberryPi5PmicSensor()


# --- RAPL --------------------------------------------------------------------------------------------


def test_rapl_power_from_counter_difference(tmp_path):
    root = copy_tree("x86-intel-rapl", tmp_path)
    counter = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    counter.write_text("1000000\n")
    clock = FakeClock()
    sensor = RaplSensor(root, clock=clock)

    clock.now += 2.0
    counter.write_text("31000000\n")
    reading = sensor.read()

    assert reading.source == "rapl"
    assert reading.power_w == pytest.approx(15.0)
    assert [rail.name for rail in reading.rails] == ["package-0"]


def test_rapl_counter_wraps_at_max_range(tmp_path):
    root = copy_tree("x86-intel-rapl", tmp_path)
    counter = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    clock = FakeClock()
    sensor = RaplSensor(root, clock=clock)
    first = sensor.read()

    # 262143000000 -> wrap at 262143328850 -> 9671150: 328850 + 9671150 uJ = 10 J.
    clock.now += 1.0
    counter.write_text("9671150\n")
    second = sensor.read()

    assert second.energy_j - first.energy_j == pytest.approx(10.0)
    assert second.power_w == pytest.approx(10.0)


def test_rapl_prefers_psys_zone(tmp_path):
    root = copy_tree("x86-intel-psys", tmp_path)
    clock = FakeClock()
    sensor = RaplSensor(root, clock=clock)
    clock.now += 1.0
    (root / "sys/class/powercap/intel-rapl:1/energy_uj").write_text("21000000\n")
    (root / "sys/class/powercap/intel-rapl:0/energy_uj").write_text("8000000\n")

    reading = sensor.read()

    assert [rail.name for rail in reading.rails] == ["psys"]
    assert reading.power_w == pytest.approx(12.0)


def test_rapl_amd_sums_packages_not_subzones(tmp_path):
    root = copy_tree("x86-amd-rapl", tmp_path)
    clock = FakeClock()
    sensor = RaplSensor(root, clock=clock)
    clock.now += 0.5
    for zone, value in [("intel-rapl:0", 4294000000 + 20_000_000), ("intel-rapl:1", 1073741000 + 5_000_000)]:
        (root / f"sys/class/powercap/{zone}/energy_uj").write_text(f"{value}\n")
    (root / "sys/class/powercap/intel-rapl:0:0/energy_uj").write_text("999999999\n")

    reading = sensor.read()

    assert [rail.name for rail in reading.rails] == ["package-0", "package-1"]
    assert reading.power_w == pytest.approx(50.0)


def test_rapl_unreadable_counter_is_unavailable(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of their mode")
    root = copy_tree("x86-intel-rapl", tmp_path)
    (root / "sys/class/powercap/intel-rapl:0/energy_uj").chmod(0)

    with pytest.raises(SensorUnavailable, match="root only"):
        RaplSensor(root)


# --- powermetrics and NVML -----------------------------------------------------------------------------


def test_powermetrics_apple_silicon_combined_power():
    total, rails = parse_powermetrics((COMMANDS / "macos-apple-silicon-powermetrics.txt").read_text())

    assert total == pytest.approx(2.015)
    assert {rail.name: rail.power_w for rail in rails} == {"CPU": 1.873, "GPU": 0.142, "ANE": 0.0}


def test_powermetrics_intel_package_power():
    total, rails = parse_powermetrics((COMMANDS / "macos-intel-powermetrics.txt").read_text())

    assert total == pytest.approx(3.42)
    assert rails == []


def test_powermetrics_sensor_runs_command(private_path):
    install_command(private_path, "powermetrics", COMMANDS / "macos-apple-silicon-powermetrics.txt")

    reading = PowermetricsSensor().read()

    assert reading.source == "powermetrics"
    assert reading.power_w == pytest.approx(2.015)


def test_powermetrics_without_root_is_unavailable(private_path):
    install_command(private_path, "powermetrics", COMMANDS / "macos-powermetrics-not-root.txt", exit_status=1)

    with pytest.raises(SensorUnavailable, match="superuser"):
        PowermetricsSensor()


def test_nvml_sensor_on_this_machine():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        with pytest.raises(SensorUnavailable, match="NVML did not initialise"):
            NvmlSensor()
        return

    sensor = NvmlSensor()
    try:
        reading = sensor.read()
    finally:
        sensor.close()
    assert reading.source == "nvml"
    assert reading.power_w > 0
    assert reading.rails[0].name.startswith("GPU0 ")


def test_run_command_reports_exit_status(private_path):
    install_command(private_path, "failing-tool", COMMANDS / "macos-powermetrics-not-root.txt", exit_status=3)

    with pytest.raises(SensorUnavailable, match="status 3"):
        run_command(["failing-tool"])


# --- Factory and estimate -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile_id", "tree", "source"),
    [
        ("jetson-orin", "jetson-orin-nano", "ina3221"),
        ("jetson-xavier", "jetson-agx-xavier-l4t32", "ina3221"),
        ("x86-avx2", "x86-intel-rapl", "rapl"),
        ("x86-avx512-vnni", "x86-amd-rapl", "rapl"),
        ("rpi4", "rpi5", "estimated"),
    ],
)
def test_factory_opens_profile_sensor(profile_id, tree, source):
    sensor = open_power_sensor(load_profile(profile_id), root=SYSFS / tree)

    assert sensor.source == source


def test_factory_opens_pmic_with_runner():
    calls = []

    def runner(argv):
        calls.append(tuple(argv))
        return (COMMANDS / "rpi5-pmic_read_adc.txt").read_text()

    sensor = open_power_sensor(load_profile("rpi5"), root=SYSFS / "rpi5", runner=runner)

    assert sensor.source == "rpi5-pmic"
    assert calls == [("vcgencmd", "pmic_read_adc")]


def test_factory_falls_back_to_estimate(tmp_path, caplog):
    profile = load_profile("jetson-orin")

    with caplog.at_level(logging.WARNING, logger="edgeopt.devices.power"):
        sensor = open_power_sensor(profile, root=tmp_path)

    assert sensor.source == "estimated"
    assert sensor.estimated
    assert "ina3221" in caplog.text
    reading = sensor.read()
    assert reading.estimated
    assert profile.power.idle_w <= reading.power_w <= profile.power.max_w


def test_estimate_follows_cpu_utilisation():
    profile = load_profile("rpi4")
    utilisation = iter([0.0, 50.0, None, 100.0])
    sensor = EstimatedPowerSensor(profile.power, lambda: next(utilisation))
    idle, span = profile.power.idle_w, profile.power.max_w - profile.power.idle_w

    assert sensor.read().power_w == pytest.approx(idle)
    assert sensor.read().power_w == pytest.approx(idle + span / 2)
    assert sensor.read().power_w == pytest.approx(idle + span / 2)
    assert sensor.read().power_w == pytest.approx(idle + span)


# --- Energy meter -------------------------------------------------------------------------------------


def test_energy_meter_uses_rapl_counter(tmp_path):
    root = copy_tree("x86-intel-rapl", tmp_path)
    counter = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    counter.write_text("0\n")
    clock = FakeClock()
    meter = EnergyMeter(RaplSensor(root, clock=clock), clock=clock)

    for step in range(1, 6):
        clock.now += 1.0
        counter.write_text(f"{step * 12_000_000}\n")
        meter.sample()
    interval = meter.take()

    assert interval.method == "counter"
    assert interval.energy_j == pytest.approx(60.0)
    assert interval.duration_s == pytest.approx(5.0)
    assert interval.mean_power_w == pytest.approx(12.0)
    assert interval.per_inference_mj(600) == pytest.approx(100.0)


def test_energy_meter_integrates_power_samples(tmp_path):
    root = copy_tree("jetson-orin-nano", tmp_path)
    current = next(root.glob("sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*")) / "curr1_input"
    current.write_text("1000\n")
    clock = FakeClock()
    meter = EnergyMeter(Ina3221Sensor(root), clock=clock)
    meter.sample()

    clock.now += 2.0
    current.write_text("3000\n")
    interval = meter.take()

    assert interval.method == "integrated"
    assert interval.source == "ina3221"
    # Trapezoid of 5.064 W and 15.192 W over 2 s.
    assert interval.energy_j == pytest.approx((5.064 + 15.192) / 2 * 2.0)
    assert interval.per_inference_mj(0) is None


def test_energy_meter_labels_estimate():
    profile = load_profile("rpi4")
    clock = FakeClock()
    meter = EnergyMeter(EstimatedPowerSensor(profile.power, lambda: 0.0), clock=clock)
    meter.sample()
    clock.now += 4.0

    interval = meter.take()

    assert interval.method == "estimated"
    assert interval.energy_j == pytest.approx(profile.power.idle_w * 4.0)


def test_energy_meter_skips_failed_reads(tmp_path, caplog):
    root = copy_tree("jetson-orin-nano", tmp_path)
    clock = FakeClock()
    meter = EnergyMeter(Ina3221Sensor(root), clock=clock)
    shutil.rmtree(root / "sys/bus/i2c/drivers/ina3221")

    with caplog.at_level(logging.WARNING, logger="edgeopt.devices.power"):
        assert meter.sample() is None
    assert "read failed" in caplog.text


# --- CPU, memory, thermal zones -----------------------------------------------------------------------


def test_thermal_zones_skip_implausible_values():
    zones = {zone.name: zone.temp_c for zone in read_thermal_zones(SYSFS / "jetson-orin-nano")}

    assert zones == {"cpu-thermal": 48.531, "gpu-thermal": 46.875, "soc0-thermal": 47.781, "tj-thermal": 48.531}


def test_memory_from_meminfo():
    memory = read_memory(SYSFS / "rpi5")

    assert memory.total_mb == pytest.approx(8245316 / 1024)
    assert memory.used_mb == pytest.approx((8245316 - 7380212) / 1024)
    assert 10 < memory.percent < 11


def test_cpu_usage_from_proc_stat_deltas(tmp_path):
    root = copy_tree("rpi5", tmp_path)
    usage = CpuUsage(root)
    # user +300, system +100, idle +550, iowait +50 jiffies: 400 busy of 1000.
    (root / "proc/stat").write_text("cpu  81534 120 40311 3801780 2260 0 1024 0 0 0\n")

    assert usage.percent() == pytest.approx(40.0)


def test_system_sample_of_fake_tree():
    sample = SystemSensors(SYSFS / "rpi5").sample().to_dict()

    assert sample["temperature_c"] == pytest.approx(53.2, abs=0.1)
    assert sample["temperatures_c"] == {"cpu-thermal": 53.2}
    assert sample["memory"]["total_mb"] == pytest.approx(8052.1, abs=0.1)
    # /proc/stat did not change since the constructor read it, so no CPU time passed.
    assert sample["cpu_percent"] == 0.0


def test_system_sample_of_this_host():
    sensors = SystemSensors("/")
    sensors.sample()
    sample = sensors.sample()

    assert 0.0 <= sample.cpu_percent <= 100.0
    assert sample.memory.total_mb > 0
