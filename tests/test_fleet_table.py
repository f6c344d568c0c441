"""The ``fleet watch`` table at 80 columns and on a wide terminal."""

from __future__ import annotations

import time

import pytest
from rich.console import Console

from edgeopt.fleet.alerts import Alert
from edgeopt.fleet.monitor import DeviceState
from edgeopt.fleet.table import ESTIMATE_LEGEND, render_table

CPU_RUNTIME = "onnxruntime (CPUExecutionProvider)"


def rpi(power_source: str = "estimated") -> DeviceState:
    """An online board with a busy and an idle model, named the way the agent names devices."""
    return DeviceState(
        device_id="raspberrypi-3f9a12c4",
        fleet="lab",
        status="online",
        profile="rpi4",
        runtime=CPU_RUNTIME,
        models={
            "classifier": {"version": "1", "requests": 10, "rps": 3.3, "latency_ms": {"p50": 12.3, "p99": 120.4}},
            "spare": {"version": "2", "requests": 0, "rps": 0.0, "latency_ms": {"p50": 0.0, "p99": 0.0}},
        },
        power_w=3.214,
        power_source=power_source,
        energy_per_inference_mj=812.34,
        temperature_c=61.2,
        last_seen=time.time() - 2,
    )


def offline_jetson() -> DeviceState:
    return DeviceState(
        device_id="jetson-01",
        fleet="lab",
        status="offline",
        profile="jetson-orin-nano",
        loaded_models=[{"name": "detector", "runtime": "onnxruntime (CUDAExecutionProvider)"}],
        last_seen=time.time() - 40,
    )


def render(devices: list[DeviceState], width: int, alerts: list[Alert] | None = None, max_rows: int | None = None) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(render_table(devices, alerts or [], width=width, max_rows=max_rows))
    return [line.rstrip() for line in console.export_text().splitlines()]


def test_table_fits_80_columns():
    lines = render([rpi(), offline_jetson()], 80)
    text = "\n".join(lines)

    assert max(len(line) for line in lines) <= 80
    assert "…" not in text
    assert "raspberrypi-3f9a12c4" in text
    assert "classifier v1" in text
    assert "onnxruntime (CPU)" in text
    assert "p99 ms" in text
    assert "jetson-orin-nano offline" in text
    assert "40 s ago" in text
    assert "2 s ago" not in text  # online devices leave the age out at 80 columns


def test_table_wide_when_terminal_allows():
    lines = render([rpi(), offline_jetson()], 220)
    header = next(line for line in lines if "rps" in line)

    assert max(len(line) for line in lines) <= 220
    for column in ("status", "profile", "runtime", "power W (source)", "temp °C", "last seen"):
        assert column in header
    assert CPU_RUNTIME in "\n".join(lines)


@pytest.mark.parametrize("width", [80, 220])
def test_idle_model_latency_is_dash(width):
    lines = render([rpi()], width)
    spare = next(line for line in lines if "spare v2" in line)
    classifier = next(line for line in lines if "classifier v1" in line)

    assert "0.0" in spare.split()  # rps of the idle model
    assert spare.split().count("-") >= 2
    assert "12.3" in classifier
    assert "120.4" in classifier


@pytest.mark.parametrize("width", [80, 220])
def test_estimated_power_is_marked(width):
    text = "\n".join(render([rpi("estimated")], width))

    assert "~3.21" in text
    assert "~812.3" in text
    assert "~ estimated:" in text
    assert " ".join(ESTIMATE_LEGEND.split()[:4]) in " ".join(text.split())


@pytest.mark.parametrize("width", [80, 220])
def test_measured_power_is_not_marked(width):
    text = "\n".join(render([rpi("ina3221")], width))

    assert "3.21" in text
    assert "~" not in text
    assert "estimated" not in text


def test_title_counts_singular_and_plural():
    alert = Alert(device_id="raspberrypi-3f9a12c4", kind="p99", state="firing", message="p99 above limit", model="classifier", value=120.4, limit=50.0)

    assert "edgeopt fleet: 1 device, 1 alert firing" in "\n".join(render([rpi()], 80, alerts=[alert]))
    assert "edgeopt fleet: 2 devices, 0 alerts firing" in "\n".join(render([rpi(), offline_jetson()], 80))


def test_max_rows_caption():
    text = "\n".join(render([rpi(), offline_jetson()], 80, max_rows=1))

    assert "classifier v1" in text
    assert "spare v2" not in text
    assert "2 of 3 rows not shown" in text
