"""The ``fleet watch`` table: one row per device and model, sized to the terminal.

The wide form has one column per field. When it does not fit the terminal, the compact form
folds the profile and status under the device and the runtime under the model. It leaves out
the temperature and the last-seen age of online devices, so it fits 80 columns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgeopt.fleet.alerts import Alert
from edgeopt.fleet.monitor import DeviceState

# Prefix of a power or energy figure from the estimated power source, which models the board
# instead of reading a sensor. The legend under the table explains it.
ESTIMATE_MARK = "~"
ESTIMATE_LEGEND = f"{ESTIMATE_MARK} estimated: power and energy modelled from CPU load and the profile's idle and max watts, not measured"


@dataclass(frozen=True)
class Row:
    """The formatted cells of one device and model."""

    device_id: str
    online: bool
    status: str
    profile: str
    model: str
    runtime: str
    rps: str
    p50: str
    p99: str
    power: str
    power_source: str
    energy: str
    temperature: str
    last_seen: str


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _format_number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _is_estimated(device: DeviceState) -> bool:
    return device.power_source == "estimated"


def _format_age(last_seen: float | None, now: float) -> str:
    if last_seen is None:
        return "-"
    return f"{now - last_seen:.0f} s ago"


def _short_runtime(runtime: str) -> str:
    """Shorten ``onnxruntime (CPUExecutionProvider)`` to ``onnxruntime (CPU)`` for the compact form."""
    return runtime.replace("ExecutionProvider", "")


def _rows(devices: list[DeviceState], now: float) -> list[Row]:
    rows = []
    for device in devices:
        mark = ESTIMATE_MARK if _is_estimated(device) else ""
        models = device.models or {m.get("name", "?"): {} for m in device.loaded_models} or {"-": {}}
        for name, model in models.items():
            latency = model.get("latency_ms", {})
            # The agent reports percentiles of 0.0 for an interval without requests.
            served = model.get("requests", 0) > 0
            runtime = next((m.get("runtime") for m in device.loaded_models if m.get("name") == name), device.runtime)
            rows.append(
                Row(
                    device_id=device.device_id,
                    online=device.status == "online",
                    status=device.status,
                    profile=device.profile or "-",
                    model=f"{name} v{model['version']}" if model.get("version") else name,
                    runtime=runtime or "-",
                    rps=_format_number(model.get("rps")),
                    p50=_format_number(latency.get("p50")) if served else "-",
                    p99=_format_number(latency.get("p99")) if served else "-",
                    power="-" if device.power_w is None else f"{mark}{device.power_w:.2f}",
                    power_source=device.power_source or "?",
                    energy="-" if device.energy_per_inference_mj is None else f"{mark}{device.energy_per_inference_mj:.1f}",
                    temperature=_format_number(device.temperature_c),
                    last_seen=_format_age(device.last_seen, now),
                )
            )
    return rows


def _status(row: Row) -> Text:
    return Text(row.status, style="green" if row.online else "red")


def _power_with_source(row: Row) -> str:
    return row.power if row.power == "-" else f"{row.power} ({row.power_source})"


def _wide(rows: list[Row], title: str) -> Table:
    table = Table(title=title, expand=False)
    for column in ("device", "status", "profile", "model", "runtime", "rps", "p50 ms", "p99 ms", "power W (source)", "mJ/inf", "temp °C", "last seen"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(row.device_id, _status(row), row.profile, row.model, row.runtime, row.rps, row.p50, row.p99, _power_with_source(row), row.energy, row.temperature, row.last_seen)
    return table


# Width of the compact table outside the two name columns with typical figures: rps 5,
# p50 and p99 6 each, W 5, mJ/inf 6, and 2 between each pair of the 7 columns.
_COMPACT_FIXED_WIDTH = 40


def _name_widths(rows: list[Row], width: int) -> tuple[int, int]:
    """Return minimum widths of the device and model columns that fit ``width`` together."""
    device_need = max((len(row.device_id) for row in rows), default=6)
    model_need = max((len(text) for row in rows for text in (row.model, _short_runtime(row.runtime))), default=5)
    budget = max(width - _COMPACT_FIXED_WIDTH, 20)
    if device_need + model_need <= budget:
        return device_need, model_need
    device_width = min(device_need, max(budget // 2, budget - model_need))
    return device_width, budget - device_width


def _device_cell(row: Row) -> Text:
    """Build the device id over its profile and status, with the last-seen age of a device not online."""
    cell = Text(row.device_id)
    cell.append(f"\n{row.profile} ", style="dim")
    cell.append_text(_status(row))
    if not row.online:
        cell.append(f" {row.last_seen}", style="red")
    return cell


def _compact(rows: list[Row], title: str, width: int) -> Table:
    # Rich shrinks foldable columns evenly, which folds short names needlessly, so the two
    # name columns get minimum widths that split what the other columns leave free.
    device_width, model_width = _name_widths(rows, width)
    table = Table(title=title, expand=False, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("device / profile", overflow="fold", min_width=device_width)
    table.add_column("model / runtime", overflow="fold", min_width=model_width)
    for column in ("rps", "p50 ms", "p99 ms", "W", "mJ/inf"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        model = Text(row.model)
        model.append(f"\n{_short_runtime(row.runtime)}", style="dim")
        table.add_row(_device_cell(row), model, row.rps, row.p50, row.p99, row.power, row.energy)
    return table


def render_table(devices: list[DeviceState], alerts: list[Alert], width: int = 80, max_rows: int | None = None) -> Table:
    """Build the table for a terminal ``width`` columns wide, wide if it fits, else compact.

    ``max_rows`` limits the device-model rows, and the caption counts the rows left out.
    """
    rows = _rows(devices, time.time())
    title = f"edgeopt fleet: {plural(len(devices), 'device')}, {plural(len(alerts), 'alert')} firing"

    notes = []
    if max_rows is not None and len(rows) > max_rows:
        notes.append(f"{len(rows) - max_rows} of {plural(len(rows), 'row')} not shown")
        rows = rows[:max_rows]
    if any(_is_estimated(device) for device in devices):
        notes.append(ESTIMATE_LEGEND)

    table = _wide(rows, title)
    # Rich caps a measurement at the console width, so measure on an unbounded console.
    if Console(width=100_000).measure(table).maximum > width:
        table = _compact(rows, title, width)
    table.caption = "\n".join(notes) or None
    table.caption_justify = "left"
    return table
