"""Fleet monitor, history, alerts and the `edgeopt fleet` commands against a real mosquitto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from edgeopt.agent.metrics import ServerStats
from edgeopt.agent.telemetry import TelemetryConfig, TelemetryReporter
from edgeopt.cli import cli
from edgeopt.devices import load_profile
from edgeopt.devices.power import EstimatedPowerSensor
from edgeopt.devices.sensors import SystemSensors
from edgeopt.fleet.alerts import AlertRules, AlertTracker
from edgeopt.fleet.history import History, parse_duration
from edgeopt.fleet.monitor import FleetMonitor, MonitorConfig
from edgeopt.mqtt import BrokerURL
from mqtt_broker import mqtt_broker  # noqa: F401

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"
MODEL = {"name": "classifier", "version": "1", "device": "rpi4", "runtime": "onnxruntime (CPUExecutionProvider)", "artifact": "model.onnx", "precision": "fp32"}


def make_reporter(port: int, fleet: str, device_id: str, stats: ServerStats, interval_s: float = 0.3) -> TelemetryReporter:
    profile = load_profile("rpi4")
    return TelemetryReporter(
        TelemetryConfig(broker=BrokerURL("127.0.0.1", port), fleet=fleet, device_id=device_id, metrics_interval_s=interval_s, power_sample_s=0.1),
        stats,
        models=lambda: [MODEL],
        profile=profile,
        power=EstimatedPowerSensor(profile.power, lambda: 50.0),
        system=SystemSensors(SYSFS / "rpi5"),
    )


def wait_until(condition, timeout_s: float = 10.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{message} not reached within {timeout_s} s")


def raw_publisher(port: int) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


# --- History and alerts ---------------------------------------------------------------------------


def test_history_stores_and_queries(tmp_path):
    store = History(tmp_path / "history.sqlite")
    now = time.time()
    for index in range(5):
        payload = {"ts": "t", "seq": index + 1, "models": {}}
        store.add("dev-1", "lab", "metrics", now - 10 + index, payload, json.dumps(payload).encode())
    store.add("dev-2", "lab", "status", now, {"state": "online"}, b'{"state":"online"}')
    store.add_alert("dev-1", now, "p99", "firing", "dev-1 classifier: p99 latency 80.0 ms is above 50 ms")
    store.flush()

    rows = store.query("dev-1", limit=3)

    assert [row.kind for row in rows] == ["metrics", "metrics", "alert"]
    assert rows[0].payload["seq"] == 4
    assert rows[2].payload["state"] == "firing"
    assert store.devices() == ["dev-1", "dev-2"]
    assert store.count("metrics") == 5
    store.close()


def test_history_retention_prunes(tmp_path):
    store = History(tmp_path / "history.sqlite", retention_s=60)
    now = time.time()
    store.add("dev-1", "lab", "metrics", now - 120, {"seq": 1}, b'{"seq":1}')
    store.add("dev-1", "lab", "metrics", now - 5, {"seq": 2}, b'{"seq":2}')
    store.flush()

    # The first flush prunes at once; later flushes prune once a minute.
    assert [row.payload["seq"] for row in store.query("dev-1")] == [2]
    store.add("dev-1", "lab", "metrics", now - 61, {"seq": 3}, b'{"seq":3}')
    store.flush()
    assert store.prune(now) == 1
    assert [row.payload["seq"] for row in store.query("dev-1")] == [2]
    store.close()


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


def test_parse_duration_rejects():
    with pytest.raises(ValueError, match="invalid duration '7 weeks'"):
        parse_duration("7 weeks")


def test_alert_fires_once_and_resolves():
    tracker = AlertTracker(AlertRules(max_p99_ms=50.0, max_power_w=5.0))
    slow = {"m": {"requests": 10, "latency_ms": {"p99": 80.0}}}
    fast = {"m": {"requests": 10, "latency_ms": {"p99": 20.0}}}
    idle = {"m": {"requests": 0, "latency_ms": {"p99": 0.0}}}

    first = tracker.check_metrics("d", slow, 6.0, "ina3221")
    assert [(a.kind, a.state) for a in first] == [("p99", "firing"), ("power", "firing")]
    assert tracker.check_metrics("d", slow, 6.0, "ina3221") == []
    assert tracker.check_metrics("d", idle, 6.0, "ina3221") == []
    assert len(tracker.active) == 2

    cleared = tracker.check_metrics("d", fast, 4.0, "ina3221")
    assert [(a.kind, a.state) for a in cleared] == [("p99", "resolved"), ("power", "resolved")]
    assert tracker.active == []


def test_offline_alert_transitions():
    tracker = AlertTracker(AlertRules())

    assert [a.state for a in tracker.check_online("d", False, "connection lost")] == ["firing"]
    assert tracker.check_online("d", False, "connection lost") == []
    assert [a.state for a in tracker.check_online("d", True)] == ["resolved"]


# --- Monitor with agents' reporters ---------------------------------------------------------------


def test_monitor_tracks_devices_and_alerts(mqtt_broker, tmp_path):
    alerts = []
    history = History(tmp_path / "history.sqlite")
    monitor = FleetMonitor(
        MonitorConfig(broker=BrokerURL("127.0.0.1", mqtt_broker.port), fleet="fleet-a"),
        history=history,
        rules=AlertRules(max_p99_ms=30.0),
        on_alert=alerts.append,
    )
    monitor.start()
    assert monitor.subscribed.wait(10)
    stats = {name: ServerStats() for name in ("fast-1", "slow-1")}
    reporters = [make_reporter(mqtt_broker.port, "fleet-a", name, stats[name]) for name in stats]
    other_fleet = make_reporter(mqtt_broker.port, "fleet-b", "elsewhere", ServerStats())
    for reporter in [*reporters, other_fleet]:
        reporter.start()
    try:
        for _ in range(20):
            stats["fast-1"].record("classifier", "1", 5.0, ok=True)
            stats["slow-1"].record("classifier", "1", 90.0, ok=True)

        def both_reported():
            devices = {d.device_id: d for d in monitor.snapshot()}
            return all(devices.get(n) and devices[n].models.get("classifier", {}).get("requests") for n in stats)

        wait_until(both_reported, message="metrics with requests from both devices")
        devices = {device.device_id: device for device in monitor.snapshot()}
    finally:
        for reporter in [*reporters, other_fleet]:
            reporter.stop()

    wait_until(lambda: all(d.status == "offline" for d in monitor.snapshot()), message="offline after stop")
    monitor.stop()
    history.close()

    assert set(devices) == {"fast-1", "slow-1"}
    fast = devices["fast-1"]
    assert fast.status == "online"
    assert fast.profile == "rpi4"
    assert fast.runtime == MODEL["runtime"]
    assert fast.power_source == "estimated"
    figures = load_profile("rpi4").power
    assert fast.power_w == pytest.approx(figures.idle_w + (figures.max_w - figures.idle_w) * 0.5, rel=0.01)
    assert fast.energy_method == "estimated"
    assert fast.energy_per_inference_mj > 0
    assert fast.temperature_c == pytest.approx(53.2, abs=0.1)
    assert fast.delivery.lost == 0

    p99_alerts = [a for a in alerts if a.kind == "p99" and a.state == "firing"]
    assert [a.device_id for a in p99_alerts] == ["slow-1"]
    offline = {a.device_id for a in alerts if a.kind == "offline" and a.state == "firing"}
    assert offline == {"fast-1", "slow-1"}

    stored = History(tmp_path / "history.sqlite")
    assert {row.kind for row in stored.query("slow-1", limit=500)} == {"status", "metrics", "alert"}
    stored.close()


def test_monitor_marks_silent_device_offline(mqtt_broker):
    # Record every state change: on a busy machine the device can go offline (0.6 s of
    # silence) before a polling loop sees it online.
    states = []
    monitor = FleetMonitor(
        MonitorConfig(broker=BrokerURL("127.0.0.1", mqtt_broker.port), fleet="silent", missed_intervals=3),
        on_update=lambda device: states.append((device.status, time.time())),
    )
    monitor.start()
    assert monitor.subscribed.wait(10)
    publisher = raw_publisher(mqtt_broker.port)
    status = {"schema": 1, "ts": "2025-01-01T00:00:00.000Z", "device_id": "quiet", "state": "online", "metrics_interval_s": 0.2}
    publisher.publish("edgeopt/v1/silent/quiet/status", json.dumps(status), qos=1).wait_for_publish(5)
    publisher.publish("edgeopt/v1/silent/quiet/metrics", b"{not json", qos=1).wait_for_publish(5)
    try:
        wait_until(lambda: any(status == "offline" for status, _ in states), message="offline after silence")
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        monitor.stop()

    assert states[0][0] == "online"
    offline_at = next(at for status, at in states if status == "offline")
    assert offline_at - states[0][1] < 3.0
    assert "intervals missed" in monitor.devices["quiet"].reason
    assert monitor.invalid == 1


def test_shared_group_splits_metrics(mqtt_broker):
    monitors = [
        FleetMonitor(MonitorConfig(broker=BrokerURL("127.0.0.1", mqtt_broker.port), fleet="shared", shared_group="watchers"))
        for _ in range(2)
    ]
    for monitor in monitors:
        monitor.start()
        assert monitor.subscribed.wait(10)
    publisher = raw_publisher(mqtt_broker.port)
    status = {"schema": 1, "device_id": "d0", "state": "online", "metrics_interval_s": 1}
    publisher.publish("edgeopt/v1/shared/d0/status", json.dumps(status), qos=1).wait_for_publish(5)
    total = 200
    for seq in range(1, total + 1):
        device = f"d{seq % 10}"
        payload = {"schema": 1, "device_id": device, "session": "s", "seq": seq, "models": {}, "device": {}}
        publisher.publish(f"edgeopt/v1/shared/{device}/metrics", json.dumps(payload), qos=1)
    try:
        wait_until(lambda: sum(m.devices[d].metrics_received for m in monitors for d in m.devices) >= total, message="all metrics")
        time.sleep(0.3)
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        for monitor in monitors:
            monitor.stop()

    per_monitor = [sum(device.metrics_received for device in monitor.devices.values()) for monitor in monitors]
    assert sum(per_monitor) == total
    assert all(count > 0 for count in per_monitor)
    assert all(monitor.devices["d0"].status == "online" for monitor in monitors)


# --- Command line ---------------------------------------------------------------------------------------


def test_watch_once_json_and_exit_status(mqtt_broker, tmp_path):
    stats = ServerStats()
    reporter = make_reporter(mqtt_broker.port, "cli", "cli-dev", stats, interval_s=0.5)
    reporter.start()
    try:
        assert reporter.mqtt.connected.wait(10)
        for _ in range(10):
            stats.record("classifier", "1", 120.0, ok=True)
        history = tmp_path / "history.sqlite"
        result = CliRunner().invoke(
            cli,
            ["fleet", "watch", "--broker", f"mqtt://127.0.0.1:{mqtt_broker.port}", "--fleet", "cli", "--once", "--json", "--max-p99-ms", "50", "--history", str(history)],
        )
        calm = CliRunner().invoke(
            cli,
            ["fleet", "watch", "--broker", f"mqtt://127.0.0.1:{mqtt_broker.port}", "--fleet", "cli", "--once", "--no-history", "--interval", "0.6"],
        )
    finally:
        reporter.stop()

    lines = [json.loads(line) for line in result.output.splitlines()]
    devices = [line for line in lines if line["type"] == "device"]
    alerts = [line for line in lines if line["type"] == "alert"]
    assert result.exit_code == 3, result.output
    assert devices[0]["device_id"] == "cli-dev"
    assert devices[0]["status"] == "online"
    assert devices[0]["metrics_received"] >= 1
    assert "classifier" in devices[0]["models"]
    assert alerts[0]["kind"] == "p99"
    assert alerts[0]["value"] == pytest.approx(120.0, rel=0.06)
    assert calm.exit_code == 0, calm.output
    assert "cli-dev" in calm.output

    printed = CliRunner().invoke(cli, ["fleet", "history", "cli-dev", "--history", str(history)])
    assert printed.exit_code == 0, printed.output
    assert "online profile rpi4" in printed.output
    assert "classifier: 10 req" in printed.output
    assert "p99 latency" in printed.output


def test_watch_once_table_prints_alert_once(mqtt_broker, tmp_path):
    stats = ServerStats()
    reporter = make_reporter(mqtt_broker.port, "table", "raspberrypi-3f9a12c4", stats, interval_s=0.5)
    reporter.start()
    try:
        assert reporter.mqtt.connected.wait(10)
        for _ in range(10):
            stats.record("classifier", "1", 120.0, ok=True)
        command = [
            sys.executable, "-m", "edgeopt", "fleet", "watch", "--broker", f"mqtt://127.0.0.1:{mqtt_broker.port}",
            "--fleet", "table", "--once", "--max-p99-ms", "50", "--history", str(tmp_path / "history.sqlite"),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})
    finally:
        reporter.stop()

    assert result.returncode == 3, result.stdout + result.stderr
    alert_lines = [line for line in result.stderr.splitlines() if "p99 latency" in line]
    assert len(alert_lines) == 1, result.stderr
    assert alert_lines[0].startswith("ALERT firing: raspberrypi-3f9a12c4 classifier: p99 latency")
    assert "edgeopt fleet: 1 device, 1 alert firing" in result.stdout
    assert max(len(line.rstrip()) for line in result.stdout.splitlines()) <= 80
    assert "…" not in result.stdout
    assert "~ estimated:" in result.stdout

    stored = History(tmp_path / "history.sqlite")
    alerts = [row for row in stored.query("raspberrypi-3f9a12c4", limit=100) if row.kind == "alert"]
    stored.close()
    assert [row.payload["state"] for row in alerts] == ["firing"]


def test_watch_help_documents_exit_status():
    result = CliRunner().invoke(cli, ["fleet", "watch", "--help"])

    assert result.exit_code == 0
    assert "Exit status:" in result.output
    assert "3  --once found an alert firing" in result.output


def test_history_unknown_device(tmp_path):
    store = History(tmp_path / "history.sqlite")
    store.add("known", "lab", "status", time.time(), {"state": "online"}, b'{"state":"online"}')
    store.close()

    result = CliRunner().invoke(cli, ["fleet", "history", "nope", "--history", str(tmp_path / "history.sqlite")])

    assert result.exit_code == 2
    assert "no history for device 'nope'" in result.output
    assert "known devices: known" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker", "http://x"], "invalid broker URL"),
        (["--broker", "mqtt://127.0.0.1:1", "--fleet", "a/b"], "invalid fleet name"),
        (["--broker", "mqtt://127.0.0.1:1", "--retention", "forever"], "invalid duration"),
        (["--broker", "mqtt://127.0.0.1:1", "--max-p99-ms", "-1"], "invalid --max-p99-ms"),
        (["--broker", "mqtts://127.0.0.1:1", "--ca", "/missing/ca.pem"], "CA file /missing/ca.pem not found"),
    ],
)
def test_watch_rejects_bad_input(args, message, tmp_path):
    result = CliRunner().invoke(cli, ["fleet", "watch", *args, "--history", str(tmp_path / "h.sqlite")])

    assert result.exit_code == 2
    assert message in result.output


def test_watch_live_json_streams_updates(mqtt_broker, tmp_path):
    watcher = subprocess.Popen(
        [sys.executable, "-m", "edgeopt", "fleet", "watch", "--broker", f"mqtt://127.0.0.1:{mqtt_broker.port}", "--fleet", "live", "--json", "--no-history"],
        stdout=subprocess.PIPE,
        text=True,
    )
    reporter = make_reporter(mqtt_broker.port, "live", "live-dev", ServerStats())
    try:
        time.sleep(1.0)
        reporter.start()
        lines = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and sum(1 for line in lines if line.get("metrics_received")) < 2:
            lines.append(json.loads(watcher.stdout.readline()))
    finally:
        reporter.stop()
        watcher.terminate()
        watcher.wait(timeout=10)

    assert lines[0]["device_id"] == "live-dev"
    assert lines[0]["status"] == "online"
    assert sum(1 for line in lines if line.get("metrics_received")) >= 2
    assert watcher.returncode == 0
