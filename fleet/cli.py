"""``edgeopt fleet``: watch a fleet of agents live (``watch``) and print stored history (``history``)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import click

from edgeopt.cli import InputError
from edgeopt.fleet.alerts import Alert, AlertRules
from edgeopt.fleet.history import History, default_history_path, parse_duration
from edgeopt.fleet.monitor import DEFAULT_INTERVAL_S, DeviceState, FleetMonitor, MonitorConfig
from edgeopt.fleet.table import render_table
from edgeopt.mqtt import TlsFiles, check_topic_level, parse_broker_url

log = logging.getLogger(__name__)

# Exit status of `watch --once` when an alert is firing (2 is taken by input errors).
EXIT_ALERTS = 3


def event_record(device: DeviceState, payload: dict) -> dict:
    """Return the ``--json`` line for an agent event (model_loaded, model_unloaded, error, runtime_fallback)."""
    return {
        "type": "event",
        "device_id": device.device_id,
        "fleet": device.fleet,
        "ts": payload.get("ts"),
        "event": payload.get("event"),
        "model": payload.get("model"),
        "message": payload.get("message", ""),
        "details": payload.get("details") or {},
    }


def _build_config(broker: str, fleet: str | None, shared_group: str | None, ca, cert, key, client_id, session_expiry) -> MonitorConfig:
    try:
        url = parse_broker_url(broker)
        if fleet is not None:
            check_topic_level(fleet, "fleet name")
        if shared_group is not None:
            check_topic_level(shared_group, "shared group name")
        tls = TlsFiles(ca=ca, cert=cert, key=key) if (ca or cert or key) else None
        if tls is not None:
            tls.check()
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return MonitorConfig(
        broker=url,
        fleet=fleet,
        shared_group=shared_group,
        tls=tls,
        client_id=client_id,
        session_expiry_s=session_expiry,
    )


def _open_history(path: Path | None, no_history: bool, retention: str) -> History | None:
    if no_history:
        return None
    try:
        retention_s = parse_duration(retention)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    target = path or default_history_path()
    try:
        return History(target, retention_s=retention_s)
    except Exception as exc:  # sqlite3 raises several error classes for a bad path or file
        raise InputError(f"cannot open history file {target}: {exc}; pass --history PATH or --no-history") from None


@click.group()
def fleet() -> None:
    """Watch a fleet of edgeopt agents through an MQTT broker."""


@fleet.command()
@click.option("--broker", required=True, help="Broker URL: mqtt://[user:pass@]host:port or mqtts://host:port.")
@click.option("--fleet", "fleet_name", help="Fleet name to watch [default: every fleet].")
@click.option("--ca", type=click.Path(dir_okay=False, path_type=Path), help="CA certificate (PEM) for mqtts://.")
@click.option("--cert", type=click.Path(dir_okay=False, path_type=Path), help="Client certificate (PEM) for mqtts://.")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), help="Client private key (PEM) for mqtts://.")
@click.option("--json", "as_json", is_flag=True, help="Write one JSON line per device update, agent event and alert instead of the table.")
@click.option("--once", is_flag=True, help="Collect retained status and one metrics interval, print the state and exit, with status 3 if an alert is firing.")
@click.option("--interval", type=float, default=None, help=f"Seconds --once waits for metrics [default: the largest interval the agents announce, else {DEFAULT_INTERVAL_S:g}].")
@click.option("--max-p99-ms", type=float, help="Alert when a model's p99 latency exceeds this many milliseconds.")
@click.option("--max-power-w", type=float, help="Alert when a device's power exceeds this many watts.")
@click.option("--missed-intervals", type=int, default=3, show_default=True, help="Metrics intervals without a message before a device counts as offline.")
@click.option("--shared-group", help="Join this MQTT v5 shared-subscription group so that several monitors split the metrics.")
@click.option("--history", "history_path", type=click.Path(dir_okay=False, path_type=Path), help="SQLite history file [default: $XDG_DATA_HOME/edgeopt/fleet-history.sqlite].")
@click.option("--no-history", is_flag=True, help="Keep no history.")
@click.option("--retention", default="7d", show_default=True, help="Delete history older than this (e.g. 90m, 12h, 7d).")
@click.option("--client-id", help="MQTT client id [default: random]. Give a fixed id with --session-expiry to resume a session.")
@click.option("--session-expiry", type=int, default=0, show_default=True, help="Seconds the broker keeps this monitor's session and queues its messages while it is disconnected.")
def watch(broker, fleet_name, ca, cert, key, as_json, once, interval, max_p99_ms, max_power_w, missed_intervals, shared_group, history_path, no_history, retention, client_id, session_expiry) -> None:
    """Show the fleet live: status, model, runtime, rps, latency, power, energy and temperature per device.

    \b
    Exit status:
      0  stopped, or --once found no alert firing
      1  no connection to the broker within 15 s (--once)
      2  invalid input
      3  --once found an alert firing
    """
    if missed_intervals < 1:
        raise InputError(f"invalid --missed-intervals {missed_intervals}: use 1 or more")
    for name, value in (("--max-p99-ms", max_p99_ms), ("--max-power-w", max_power_w), ("--interval", interval)):
        if value is not None and value <= 0:
            raise InputError(f"invalid {name} {value}: use a positive number")
    config = _build_config(broker, fleet_name, shared_group, ca, cert, key, client_id, session_expiry)
    config = MonitorConfig(**{**config.__dict__, "missed_intervals": missed_intervals})
    history = _open_history(history_path, no_history, retention)
    rules = AlertRules(max_p99_ms=max_p99_ms, max_power_w=max_power_w)

    output_lock = threading.Lock()

    def write_json(record: dict) -> None:
        with output_lock:
            sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
            sys.stdout.flush()

    def on_alert(alert: Alert) -> None:
        if as_json:
            write_json(alert.to_dict())
        else:
            with output_lock:
                click.echo(f"ALERT {alert.state}: {alert.message}", err=True)

    on_update = (lambda device: write_json(device.to_dict())) if as_json and not once else None
    on_event = (lambda device, payload: write_json(event_record(device, payload))) if as_json and not once else None
    monitor = FleetMonitor(config, history=history, rules=rules, on_update=on_update, on_alert=on_alert, on_event=on_event)
    monitor.start()
    try:
        if once:
            sys.exit(_run_once(monitor, interval, as_json, write_json))
        _run_live(monitor, as_json)
    finally:
        monitor.stop()
        if history is not None:
            history.close()


def _run_once(monitor: FleetMonitor, interval: float | None, as_json: bool, write_json) -> int:
    if not monitor.subscribed.wait(15):
        raise click.ClickException(f"no connection to the broker {monitor.config.broker} within 15 s")
    # Retained status messages arrive right after subscribing; they announce each agent's interval.
    time.sleep(0.5)
    wait_s = interval or max((d.interval_s for d in monitor.snapshot()), default=DEFAULT_INTERVAL_S)
    time.sleep(wait_s + 0.5)
    monitor.drain(timeout_s=5)
    devices = monitor.snapshot()
    if as_json:
        for device in devices:
            write_json(device.to_dict())
    else:
        from rich.console import Console

        console = Console()
        console.print(render_table(devices, monitor.alerts.active, width=console.width))
    return EXIT_ALERTS if monitor.alerts.active else 0


def _run_live(monitor: FleetMonitor, as_json: bool) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *args: stop.set())
    try:
        if as_json:
            while not stop.wait(0.5):
                pass
            return
        from rich.console import Console
        from rich.live import Live

        console = Console()
        with Live(console=console, refresh_per_second=2, screen=False) as live:
            while not stop.wait(0.5):
                rows = max(5, console.size.height - 8)
                live.update(render_table(monitor.snapshot(), monitor.alerts.active, width=console.width, max_rows=rows))
    except KeyboardInterrupt:
        pass


@fleet.command()
@click.argument("device_id")
@click.option("--history", "history_path", type=click.Path(dir_okay=False, path_type=Path), help="SQLite history file [default: $XDG_DATA_HOME/edgeopt/fleet-history.sqlite].")
@click.option("--since", help="Only rows newer than this (e.g. 30m, 12h, 7d).")
@click.option("--limit", type=int, default=50, show_default=True, help="Newest rows to print.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per row.")
def history(device_id, history_path, since, limit, as_json) -> None:
    """Print the stored status changes, metrics, events and alerts of one device."""
    path = history_path or default_history_path()
    if not path.exists():
        raise InputError(f"history file {path} not found: run 'edgeopt fleet watch' first or pass --history PATH")
    try:
        since_ts = time.time() - parse_duration(since) if since else None
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if limit < 1:
        raise InputError(f"invalid --limit {limit}: use 1 or more")

    store = History(path)
    try:
        rows = store.query(device_id, since=since_ts, limit=limit)
        if not rows:
            known = store.devices()
            hint = f"known devices: {', '.join(known[:20])}" if known else "the history is empty"
            raise InputError(f"no history for device {device_id!r} in {path}; {hint}")
    finally:
        store.close()

    for row in rows:
        if as_json:
            click.echo(json.dumps({"received": row.received, "kind": row.kind, "payload": row.payload}, separators=(",", ":")))
        else:
            stamp = datetime.fromtimestamp(row.received).strftime("%Y-%m-%d %H:%M:%S")
            click.echo(f"{stamp}  {row.kind:<8} {summarize(row.kind, row.payload)}")


def summarize(kind: str, payload: dict) -> str:
    """Return one line describing a stored message."""
    if kind == "status":
        text = payload.get("state", "?")
        if payload.get("reason"):
            text += f" ({payload['reason']})"
        if payload.get("state") == "online":
            models = ", ".join(f"{m.get('name')} v{m.get('version')} on {m.get('runtime')}" for m in payload.get("models") or [])
            text += f" profile {payload.get('profile')}; {models or 'no models'}"
        return text
    if kind == "metrics":
        parts = []
        for name, model in (payload.get("models") or {}).items():
            latency = model.get("latency_ms", {})
            parts.append(
                f"{name}: {model.get('requests', 0)} req, {model.get('rps', 0):.1f} rps, "
                f"p50 {latency.get('p50', 0):.1f} ms, p99 {latency.get('p99', 0):.1f} ms, {model.get('errors', 0)} errors"
            )
        device = payload.get("device") or {}
        if device.get("power_w") is not None:
            parts.append(f"power {device['power_w']:.2f} W ({device.get('power_source')})")
        if device.get("energy_per_inference_mj") is not None:
            parts.append(f"{device['energy_per_inference_mj']:.1f} mJ/inference")
        if device.get("temperature_c") is not None:
            parts.append(f"{device['temperature_c']:.1f} °C")
        return "; ".join(parts) or "no models"
    if kind == "events":
        return f"{payload.get('event')} {payload.get('model') or ''} {payload.get('message', '')}".strip()
    if kind == "alert":
        return f"{payload.get('state')}: {payload.get('message')}"
    return json.dumps(payload)
