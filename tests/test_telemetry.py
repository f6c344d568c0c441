"""The agent's MQTT telemetry reporter against a real mosquitto broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeopt.agent.metrics import ServerStats
from edgeopt.agent.telemetry import TelemetryConfig, TelemetryReporter, default_device_id
from edgeopt.devices import load_profile
from edgeopt.devices.power import EstimatedPowerSensor, Ina3221Sensor
from edgeopt.devices.sensors import SystemSensors
from edgeopt.mqtt import BrokerURL, TlsFiles, check_topic_level, parse_broker_url, parse_device_topic
from mqtt_broker import MessageCollector, MosquittoBroker, free_port, mqtt_broker, own_mqtt_broker  # noqa: F401

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"
MODELS = [
    {"name": "classifier", "version": "2", "device": "x86-avx2", "runtime": "onnxruntime (CPUExecutionProvider)", "artifact": "model.onnx", "precision": "fp32"}
]


def make_reporter(broker_port: int, device_id: str, stats: ServerStats | None = None, **config) -> TelemetryReporter:
    options = {"metrics_interval_s": 0.3, "reconnect_min_s": 1, "reconnect_max_s": 1, "power_sample_s": 0.1}
    options.update(config)
    profile = load_profile("rpi4")
    return TelemetryReporter(
        TelemetryConfig(broker=BrokerURL("127.0.0.1", broker_port), fleet="test", device_id=device_id, **options),
        stats or ServerStats(),
        models=lambda: MODELS,
        profile=profile,
        power=EstimatedPowerSensor(profile.power, lambda: 25.0),
        system=SystemSensors(SYSFS / "rpi5"),
    )


def is_kind(kind: str, device_id: str):
    return lambda topic, payload: topic == f"edgeopt/v1/test/{device_id}/{kind}"


# --- Configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.local", BrokerURL("broker.local", 1883)),
        ("mqtts://broker.local", BrokerURL("broker.local", 8883, tls=True)),
        ("mqtt://127.0.0.1:18830", BrokerURL("127.0.0.1", 18830)),
        ("mqtt://agent%40a:p%3Ass@10.0.0.2:1884", BrokerURL("10.0.0.2", 1884, username="agent@a", password="p:ss")),
    ],
)
def test_broker_url_parses(url, expected):
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://broker:1883", "use mqtt://"),
        ("mqtt://", "host is missing"),
        ("mqtt://broker:1883/topic", "remove the path"),
        ("mqtt://broker:99999", "invalid broker URL"),
    ],
)
def test_broker_url_rejects_bad_input(url, message):
    with pytest.raises(ValueError, match=message):
        parse_broker_url(url)


def test_broker_url_hides_password():
    assert str(parse_broker_url("mqtt://user:secret@host:1")) == "mqtt://user@host:1"


@pytest.mark.parametrize("value", ["a/b", "fleet+", "#", "", "-lead", "x" * 129])
def test_topic_level_rejects(value):
    with pytest.raises(ValueError, match="invalid fleet name"):
        check_topic_level(value, "fleet name")


def test_device_topic_parses():
    assert parse_device_topic("edgeopt/v1/lab/pi-7/metrics") == ("lab", "pi-7", "metrics")
    assert parse_device_topic("edgeopt/v1/lab/pi-7/other") is None
    assert parse_device_topic("other/v1/lab/pi-7/metrics") is None


def test_config_rejects_bad_values(tmp_path):
    broker = BrokerURL("127.0.0.1", 1883)
    with pytest.raises(ValueError, match="invalid device id"):
        TelemetryConfig(broker=broker, device_id="a/b")
    with pytest.raises(ValueError, match="invalid metrics interval"):
        TelemetryConfig(broker=broker, device_id="d", metrics_interval_s=0)
    with pytest.raises(ValueError, match="not found"):
        TelemetryConfig(broker=broker, device_id="d", tls=TlsFiles(ca=tmp_path / "missing.pem"))
    (tmp_path / "cert.pem").write_text("x")
    with pytest.raises(ValueError, match="needs its key"):
        TelemetryConfig(broker=broker, device_id="d", tls=TlsFiles(cert=tmp_path / "cert.pem"))


def test_device_id_stable_per_machine(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    (first / "etc").mkdir(parents=True)
    (second / "etc").mkdir(parents=True)
    (first / "etc/machine-id").write_text("4c4c4544004d3510804fb4c04f4d3132\n")
    (second / "etc/machine-id").write_text("0f1e2d3c4b5a69788796a5b4c3d2e1f0\n")

    first_id = default_device_id(first)

    assert first_id == default_device_id(first)
    assert first_id != default_device_id(second)
    assert "4c4c4544" not in first_id
    check_topic_level(first_id, "device id")
    check_topic_level(default_device_id(tmp_path / "empty"), "device id")


# --- Reporter against mosquitto -------------------------------------------------------------------


def test_reporter_publishes_birth_metrics_events(mqtt_broker):
    collector = MessageCollector(mqtt_broker.port, "edgeopt/v1/test/dev-a/#")
    stats = ServerStats()
    reporter = make_reporter(mqtt_broker.port, "dev-a", stats)
    reporter.start()
    try:
        birth = collector.wait_for(is_kind("status", "dev-a"))[0]
        for latency in (2.0, 4.0, 8.0, 100.0):
            stats.record("classifier", "2", latency, ok=True)
        stats.record("classifier", "2", 3.0, ok=False)
        reporter.publish_event("runtime_fallback", model="classifier", message="TensorRT missing", chosen="CPUExecutionProvider")
        metrics = collector.wait_for(
            lambda topic, payload: is_kind("metrics", "dev-a")(topic, payload) and "classifier" in payload["models"]
        )[0]
        event = collector.wait_for(is_kind("events", "dev-a"))[0]
    finally:
        reporter.stop()
        collector.close()

    assert birth["state"] == "online"
    assert birth["schema"] == 1
    assert birth["device_id"] == "dev-a"
    assert birth["profile"] == "rpi4"
    assert birth["models"] == MODELS
    assert birth["runtime"] == MODELS[0]["runtime"]
    assert birth["metrics_interval_s"] == 0.3
    assert birth["ts"].endswith("Z")

    model = metrics["models"]["classifier"]
    assert model["requests"] == 5
    assert model["errors"] == 1
    assert model["version"] == "2"
    assert set(model["latency_ms"]) == {"p50", "p90", "p99"}
    assert model["latency_ms"]["p99"] > model["latency_ms"]["p50"]
    assert metrics["seq"] >= 1
    assert metrics["session"] == reporter.session_id
    assert metrics["dropped"] == 0

    device = metrics["device"]
    assert device["power_source"] == "estimated"
    assert device["power_estimated"] is True
    assert device["energy"]["method"] == "estimated"
    assert device["energy"]["inferences"] == 5
    expected_mj = 1000 * device["energy"]["joules"] / 5
    assert device["energy_per_inference_mj"] == pytest.approx(expected_mj, rel=1e-3)
    assert device["temperature_c"] == pytest.approx(53.2, abs=0.1)
    assert device["memory"]["total_mb"] > 0

    assert event["event"] == "runtime_fallback"
    assert event["model"] == "classifier"
    assert event["details"] == {"chosen": "CPUExecutionProvider"}


def test_reporter_measured_power_source(mqtt_broker):
    collector = MessageCollector(mqtt_broker.port, "edgeopt/v1/test/dev-jetson/metrics")
    profile = load_profile("jetson-orin")
    reporter = TelemetryReporter(
        TelemetryConfig(broker=BrokerURL("127.0.0.1", mqtt_broker.port), fleet="test", device_id="dev-jetson", metrics_interval_s=0.3, power_sample_s=0.1),
        ServerStats(),
        profile=profile,
        power=Ina3221Sensor(SYSFS / "jetson-orin-nano"),
        system=SystemSensors(SYSFS / "jetson-orin-nano"),
    )
    reporter.start()
    try:
        metrics = collector.wait_for(lambda topic, payload: True)[0]
    finally:
        reporter.stop()
        collector.close()

    device = metrics["device"]
    assert device["power_source"] == "ina3221"
    assert device["power_estimated"] is False
    assert device["energy"]["method"] == "integrated"
    assert device["power_w"] == pytest.approx(5.064 * 1.416, rel=1e-3)
    assert device["rails_w"]["VDD_IN"] == pytest.approx(7.171, abs=1e-3)
    assert device["energy_per_inference_mj"] is None


def test_birth_is_retained(mqtt_broker):
    reporter = make_reporter(mqtt_broker.port, "dev-retained")
    reporter.start()
    try:
        assert reporter.mqtt.connected.wait(10)
        time.sleep(0.2)
        late = MessageCollector(mqtt_broker.port, "edgeopt/v1/test/dev-retained/status")
        status = late.wait_for(lambda topic, payload: True)[0]
        late.close()
    finally:
        reporter.stop()

    assert status["state"] == "online"
    assert late.messages[0][2] is True


def test_stop_publishes_retained_offline(mqtt_broker):
    reporter = make_reporter(mqtt_broker.port, "dev-stop")
    reporter.start()
    assert reporter.mqtt.connected.wait(10)
    reporter.stop()

    late = MessageCollector(mqtt_broker.port, "edgeopt/v1/test/dev-stop/status")
    status = late.wait_for(lambda topic, payload: True)[0]
    late.close()

    assert status["state"] == "offline"
    assert status["reason"] == "shutdown"


def test_event_kind_is_checked(mqtt_broker):
    reporter = make_reporter(mqtt_broker.port, "dev-events")
    with pytest.raises(ValueError, match="unknown event 'crash'"):
        reporter.publish_event("crash")


REPORTER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from edgeopt.agent.metrics import ServerStats
    from edgeopt.agent.telemetry import TelemetryConfig, TelemetryReporter
    from edgeopt.mqtt import BrokerURL
    reporter = TelemetryReporter(
        TelemetryConfig(broker=BrokerURL("127.0.0.1", int(sys.argv[1])), fleet="test", device_id=sys.argv[2]),
        ServerStats(),
    )
    reporter.start()
    reporter.mqtt.connected.wait(10)
    print("connected", flush=True)
    time.sleep(60)
    """
)


def test_sigkill_triggers_last_will(mqtt_broker):
    collector = MessageCollector(mqtt_broker.port, "edgeopt/v1/test/dev-killed/status")
    process = subprocess.Popen(
        [sys.executable, "-c", REPORTER_SCRIPT, str(mqtt_broker.port), "dev-killed"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "connected"
        collector.wait_for(lambda topic, payload: payload["state"] == "online")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        offline = collector.wait_for(lambda topic, payload: payload["state"] == "offline")[0]
    finally:
        if process.poll() is None:
            process.kill()
        collector.close()

    assert offline["reason"] == "connection lost"
    assert offline["device_id"] == "dev-killed"


def test_outage_loses_no_metrics(tmp_path):
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)
    broker.start()
    collector = MessageCollector(broker.port, "edgeopt/v1/test/dev-outage/#", client_id="collector-outage", session_expiry_s=300)
    reporter = make_reporter(broker.port, "dev-outage", metrics_interval_s=0.2)
    reporter.start()
    try:
        collector.wait_for(is_kind("metrics", "dev-outage"), count=3)
        broker.stop()
        time.sleep(2.0)
        buffered_during_outage = reporter.buffered
        broker.start()
        reporter.publish_event("error", model="classifier", message="after restart")
        collector.wait_for(is_kind("events", "dev-outage"), timeout_s=20)
        time.sleep(0.5)
    finally:
        reporter.stop()
        collector.close()
        broker.stop()

    seqs = {payload["seq"] for payload in collector.matching(lambda topic, payload: "seq" in payload)}
    assert buffered_during_outage >= 5
    assert reporter.dropped_total == 0
    assert seqs == set(range(1, max(seqs) + 1))


def test_overflow_drops_oldest_and_counts(tmp_path):
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)
    broker.start()
    collector = MessageCollector(broker.port, "edgeopt/v1/test/dev-overflow/#", client_id="collector-overflow", session_expiry_s=300)
    collector.client.disconnect()
    collector.client.loop_stop()
    broker.stop()

    reporter = make_reporter(broker.port, "dev-overflow", metrics_interval_s=10.0, buffer_size=5)
    reporter.start()
    try:
        for index in range(12):
            started = time.perf_counter()
            reporter.publish_event("error", message=f"event {index}")
            assert time.perf_counter() - started < 0.5
        assert reporter.buffered == 5
        assert reporter.dropped_total == 7

        broker.start()
        collector = MessageCollector(broker.port, "edgeopt/v1/test/dev-overflow/#", client_id="collector-overflow", session_expiry_s=300)
        events = collector.wait_for(is_kind("events", "dev-overflow"), count=5, timeout_s=20)
        metrics = collector.wait_for(is_kind("metrics", "dev-overflow"), timeout_s=20)[0]
    finally:
        reporter.stop()
        collector.close()
        broker.stop()

    assert [event["message"] for event in events] == [f"event {index}" for index in range(7, 12)]
    assert [event["seq"] for event in events] == list(range(8, 13))
    assert metrics["dropped"] == 7
    assert metrics["dropped_total"] == 7


def test_falls_back_to_mqtt311(tmp_path):
    amqtt_broker = pytest.importorskip("amqtt.broker")
    port = free_port()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.new_event_loop()
    broker = amqtt_broker.Broker(config, loop=loop)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(broker.start(), loop).result(timeout=10)

    reporter = make_reporter(port, "dev-v311", connack_timeout_s=2.0)
    reporter.start()
    try:
        assert reporter.mqtt.connected.wait(15)
        protocol = reporter.mqtt.protocol_name
        statuses = []
        subscriber = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        subscriber.on_message = lambda client, userdata, message: statuses.append(json.loads(message.payload))
        subscriber.connect("127.0.0.1", port)
        subscriber.subscribe("edgeopt/v1/test/dev-v311/status", qos=1)
        subscriber.loop_start()
        deadline = time.monotonic() + 10
        while not statuses and time.monotonic() < deadline:
            time.sleep(0.05)
        subscriber.disconnect()
        subscriber.loop_stop()
    finally:
        reporter.stop()
        asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)

    assert protocol == "3.1.1"
    assert statuses[0]["state"] == "online"
