"""MQTT telemetry from the agent: retained birth and Last Will, periodic metrics and events.

The reporter runs on its own thread and never blocks the caller: ``publish_event`` only
appends to a bounded in-memory buffer. While the broker is unreachable, metrics and events
wait in that buffer and go out in order after paho reconnects (exponential backoff). When the
buffer is full the oldest message is dropped, and the next metrics message carries the count.

Every buffered message carries ``session`` (random per reporter start) and ``seq`` (1, 2, ...
within the session) so that a monitor can tell duplicates, drops and losses apart.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgeopt import __version__
from edgeopt.agent.dataplane import DataPlane, DataPlaneListener, LoadedModel
from edgeopt.agent.selection import Attempt
from edgeopt.devices.power import EnergyMeter, PowerSensor
from edgeopt.devices.profiles import DeviceProfile
from edgeopt.devices.sensors import SystemSensors
from edgeopt.mqtt import (
    PAYLOAD_SCHEMA,
    BrokerURL,
    MqttSession,
    TlsFiles,
    Will,
    check_topic_level,
    device_topic,
    utc_timestamp,
)

log = logging.getLogger(__name__)

EVENT_KINDS = ("model_loaded", "model_unloaded", "error", "runtime_fallback")


class StatsSource(Protocol):
    """The agent's per-model request statistics (``agent.metrics.ServerStats``)."""

    def snapshot(self, reset: bool = True) -> dict[str, Any]: ...


def default_device_id(root: Path | str = "/") -> str:
    """Return ``<hostname>-<8 hex>``, stable across restarts of the same machine.

    The suffix hashes /etc/machine-id, which machine-id(5) says applications should not expose
    directly; without it the MAC address of the first interface is hashed instead.
    """
    root = Path(root)
    seed = None
    for candidate in ("etc/machine-id", "var/lib/dbus/machine-id"):
        try:
            seed = (root / candidate).read_text(encoding="ascii").strip() or None
        except OSError:
            continue
        if seed:
            break
    if seed is None:
        seed = f"mac:{uuid.getnode():012x}"
    digest = hashlib.sha256(f"edgeopt-device:{seed}".encode()).hexdigest()[:8]
    host = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in socket.gethostname().split(".")[0])
    return f"{host.strip('-_') or 'device'}-{digest}"


@dataclass(frozen=True)
class TelemetryConfig:
    """Broker, topic names, reporting interval and buffer limits of the telemetry reporter."""

    broker: BrokerURL
    fleet: str = "default"
    device_id: str = field(default_factory=default_device_id)
    metrics_interval_s: float = 5.0
    tls: TlsFiles | None = None
    buffer_size: int = 1000
    max_inflight: int = 20
    keepalive_s: int = 30
    reconnect_min_s: int = 1
    reconnect_max_s: int = 60
    power_sample_s: float = 1.0
    connack_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        check_topic_level(self.fleet, "fleet name")
        check_topic_level(self.device_id, "device id")
        if self.metrics_interval_s <= 0:
            raise ValueError(f"invalid metrics interval {self.metrics_interval_s}: use a positive number of seconds")
        if self.buffer_size < 1:
            raise ValueError(f"invalid buffer size {self.buffer_size}: use at least 1 message")
        if self.tls is not None:
            self.tls.check()

    def topic(self, kind: str) -> str:
        return device_topic(self.fleet, self.device_id, kind)


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    kind: str


class TelemetryReporter:
    """Publish an agent's status, metrics and events to an MQTT broker."""

    def __init__(
        self,
        config: TelemetryConfig,
        stats: StatsSource,
        *,
        models: Callable[[], list[dict[str, Any]]] = list,
        profile: DeviceProfile | None = None,
        power: PowerSensor | None = None,
        system: SystemSensors | None = None,
    ):
        self.config = config
        self.stats = stats
        self.models = models
        self.profile = profile
        self.power = power
        self.system = system or SystemSensors()
        self.session_id = uuid.uuid4().hex[:12]

        self._meter = EnergyMeter(power) if power is not None else None
        self._outbox: collections.deque[_Outgoing] = collections.deque()
        self._inflight: dict[int, _Outgoing] = {}
        self._early_acks: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._status_due = threading.Event()
        # Orders the retained status messages: no birth may follow the final ``offline``.
        self._status_lock = threading.Lock()
        self._offline_sent = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._dropped_total = 0
        self._dropped_reported = 0
        self.acknowledged = 0
        self.started_at = time.monotonic()

        self.mqtt = MqttSession(
            client_id=f"edgeopt-agent-{config.device_id}",
            broker=config.broker,
            tls=config.tls,
            keepalive=config.keepalive_s,
            will=self._will,
            reconnect_min_s=config.reconnect_min_s,
            reconnect_max_s=config.reconnect_max_s,
            max_inflight=config.max_inflight,
            connack_timeout_s=config.connack_timeout_s,
            on_connect=self._on_connect,
            on_publish=self._on_publish,
        )

    # Public API --------------------------------------------------------------------------------------

    @property
    def dropped_total(self) -> int:
        return self._dropped_total

    @property
    def buffered(self) -> int:
        with self._lock:
            return len(self._outbox) + len(self._inflight)

    def start(self) -> None:
        """Start connecting and reporting in the background; the broker may be down."""
        self.stats.snapshot(reset=True)
        self.mqtt.start()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()
        log.info(
            "telemetry started: device %s, fleet %s, broker %s, metrics every %.1f s, power source %s",
            self.config.device_id,
            self.config.fleet,
            self.config.broker,
            self.config.metrics_interval_s,
            self.power.source if self.power else "none",
        )

    def stop(self, flush_timeout_s: float = 3.0) -> None:
        """Publish ``offline`` (retained), deliver the buffered messages within the timeout, then disconnect."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

        deadline = time.monotonic() + flush_timeout_s
        if self.mqtt.connected.is_set():
            self._flush()
            with self._status_lock:
                self._offline_sent = True
                info = self.mqtt.publish(self.config.topic("status"), self._status_payload("offline", "shutdown"), qos=1, retain=True)
            while time.monotonic() < deadline and (self.buffered or not info.is_published()):
                self._flush()
                time.sleep(0.02)
        left = self.buffered
        if left:
            log.warning("telemetry stopped with %d messages undelivered", left)
        self.mqtt.stop()
        if self.power is not None:
            self.power.close()
        log.info("telemetry stopped: device %s", self.config.device_id)

    def publish_event(self, event: str, model: str | None = None, message: str = "", **details: Any) -> None:
        """Queue an event (model_loaded, model_unloaded, error, runtime_fallback) without network I/O."""
        if event not in EVENT_KINDS:
            raise ValueError(f"unknown event {event!r}; use one of {', '.join(EVENT_KINDS)}")
        payload = {"event": event, "model": model, "message": message, "details": details}
        self._enqueue("events", payload)
        self._wake.set()

    def publish_status(self) -> None:
        """Schedule the retained birth, with the current models, for the reporter thread.

        This returns at once. Calls made before the thread runs yield one message. While
        disconnected nothing is queued, because every reconnect publishes the birth anyway.
        """
        self._status_due.set()
        self._wake.set()

    # Payloads ----------------------------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        return {"schema": PAYLOAD_SCHEMA, "ts": utc_timestamp(), "device_id": self.config.device_id}

    def _status_payload(self, state: str, reason: str | None = None) -> bytes:
        payload = self._header()
        payload.update(fleet=self.config.fleet, state=state, session=self.session_id)
        if reason:
            payload["reason"] = reason
        if state == "online":
            models = self.models()
            payload.update(
                profile=self.profile.id if self.profile else None,
                profile_name=self.profile.name if self.profile else None,
                models=models,
                runtime=models[0].get("runtime") if models else None,
                metrics_interval_s=self.config.metrics_interval_s,
                power_source=self.power.source if self.power else None,
                agent_version=__version__,
                hostname=socket.gethostname(),
            )
        return json.dumps(payload, separators=(",", ":")).encode()

    def _will(self) -> Will:
        return Will(self.config.topic("status"), self._status_payload("offline", "connection lost"))

    def _device_payload(self, requests: int) -> dict[str, Any]:
        device = self.system.sample().to_dict()
        if self._meter is None:
            device.update(power_w=None, power_source=None, power_estimated=None, energy=None)
            return device
        interval = self._meter.take()
        last = self._meter.last
        device.update(
            power_w=None if interval.mean_power_w is None else round(interval.mean_power_w, 3),
            power_source=interval.source,
            power_estimated=interval.method == "estimated",
            rails_w={rail.name: round(rail.power_w, 3) for rail in last.rails} if last else {},
            energy={
                "joules": None if interval.energy_j is None else round(interval.energy_j, 4),
                "method": interval.method,
                "inferences": requests,
                "per_inference_mj": _round(interval.per_inference_mj(requests), 3),
                "power_samples": interval.samples,
            },
        )
        device["energy_per_inference_mj"] = device["energy"]["per_inference_mj"]
        return device

    def _metrics_payload(self) -> dict[str, Any]:
        snapshot = self.stats.snapshot(reset=True)
        models = snapshot.get("models", {})
        requests = sum(int(m.get("requests", 0)) for m in models.values())
        with self._lock:
            dropped = self._dropped_total - self._dropped_reported
            self._dropped_reported = self._dropped_total
        return {
            "interval_s": round(float(snapshot.get("interval_s", self.config.metrics_interval_s)), 3),
            "models": models,
            "device": self._device_payload(requests),
            "dropped": dropped,
            "dropped_total": self._dropped_total,
            "buffered": self.buffered,
        }

    # Buffer and delivery -------------------------------------------------------------------------------

    def _enqueue(self, kind: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._seq += 1
            payload = self._header()
            payload.update(session=self.session_id, seq=self._seq)
            payload.update(body)
            message = _Outgoing(self.config.topic(kind), json.dumps(payload, separators=(",", ":")).encode(), kind)
            if len(self._outbox) >= self.config.buffer_size:
                self._outbox.popleft()
                self._dropped_total += 1
                if self._dropped_total == 1 or self._dropped_total % 100 == 0:
                    log.warning(
                        "telemetry buffer full (%d messages): dropped the oldest, %d dropped so far",
                        self.config.buffer_size,
                        self._dropped_total,
                    )
            self._outbox.append(message)

    def _flush(self) -> None:
        """Hand buffered messages to paho while connected, keeping at most ``max_inflight`` unacknowledged."""
        while self.mqtt.connected.is_set():
            with self._lock:
                if not self._outbox or len(self._inflight) >= self.config.max_inflight:
                    return
                message = self._outbox.popleft()

            # paho calls on_publish while holding its own message lock, so self._lock must not be
            # held here. paho keeps a QoS 1 message it could not send and resends it after reconnecting.
            info = self.mqtt.publish(message.topic, message.payload, qos=1)

            with self._lock:
                if info.mid in self._early_acks:
                    self._early_acks.discard(info.mid)
                    self.acknowledged += 1
                else:
                    self._inflight[info.mid] = message

    def _on_publish(self, mid: int) -> None:
        with self._lock:
            if self._inflight.pop(mid, None) is not None:
                self.acknowledged += 1
            else:
                # The PUBACK arrived before _flush recorded the message id.
                self._early_acks.add(mid)
        self._wake.set()

    def _on_connect(self, session: MqttSession) -> None:
        self._status_due.clear()
        self._publish_birth()
        self._wake.set()

    def _refresh_status(self) -> None:
        if not self._status_due.is_set() or not self.mqtt.connected.is_set():
            return
        self._status_due.clear()
        if self._publish_birth():
            log.info("telemetry: refreshed the retained status of device %s", self.config.device_id)

    def _publish_birth(self) -> bool:
        # MqttSession sets ``connected`` before it calls on_connect, so stop() can publish
        # ``offline`` while the network thread is still about to publish the birth.
        with self._status_lock:
            if self._offline_sent:
                return False
            self.mqtt.publish(self.config.topic("status"), self._status_payload("online"), qos=1, retain=True)
            return True

    def _run(self) -> None:
        interval = self.config.metrics_interval_s
        sample_every = min(self.config.power_sample_s, interval)
        next_metrics = time.monotonic() + interval
        next_sample = time.monotonic() + sample_every
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if self._meter is not None and now >= next_sample:
                    self._meter.sample()
                    next_sample = now + sample_every
                if now >= next_metrics:
                    self._enqueue("metrics", self._metrics_payload())
                    # Keep a fixed rate; after a stall, skip the missed slots instead of bursting.
                    next_metrics += interval * max(1, int((now - next_metrics) // interval) + 1)
                self._flush()
                self._refresh_status()
            except Exception:  # a failing sensor or stats source must not end reporting
                log.exception("telemetry step failed for device %s; continuing", self.config.device_id)

            wait = min(next_metrics, next_sample if self._meter is not None else next_metrics) - time.monotonic()
            self._wake.wait(timeout=max(0.0, wait))
            self._wake.clear()


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# Agent command-line wiring ---------------------------------------------------------------------------


def config_from_options(
    broker: str,
    fleet: str,
    device_id: str | None,
    metrics_interval_s: float,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> TelemetryConfig:
    """Build the reporter configuration from ``edgeopt agent run`` options; bad input raises ValueError."""
    from edgeopt.mqtt import parse_broker_url

    url = parse_broker_url(broker)
    tls = TlsFiles(ca=ca, cert=cert, key=key) if (ca or cert or key) else None
    if tls is not None and not url.tls:
        raise ValueError(f"--ca, --cert and --key need an mqtts:// broker URL, not {url}")
    options: dict[str, Any] = {"broker": url, "fleet": fleet, "metrics_interval_s": metrics_interval_s, "tls": tls}
    if device_id:
        options["device_id"] = device_id
    return TelemetryConfig(**options)


def start_agent_telemetry(config: TelemetryConfig, dataplane: DataPlane) -> TelemetryReporter:
    """Start reporting for a running data plane and subscribe to its events.

    The models loaded so far are announced as events (``runtime_fallback`` where candidates
    were skipped, then ``model_loaded``); later loads, unloads and failures follow as they
    happen. The device profile is the one the loaded bundles were built for, else the profile
    that matches this host; its power sensor is opened with the estimate as the fallback.
    """
    from edgeopt.devices.power import open_power_sensor
    from edgeopt.devices.probe import detect_profile
    from edgeopt.devices.profiles import ProfileError, load_profile

    models = dataplane.models()
    profile = None
    if models:
        try:
            profile = load_profile(models[0]["device"])
        except ProfileError as exc:
            log.warning("bundle device %r has no profile here (%s); detecting the host", models[0]["device"], exc)
    profile = profile or detect_profile()
    power = open_power_sensor(profile) if profile is not None else None

    reporter = TelemetryReporter(config, dataplane.stats, models=dataplane.models, profile=profile, power=power)
    reporter.start()
    dataplane.add_listener(TelemetryListener(reporter), replay=True)
    return reporter


class TelemetryListener(DataPlaneListener):
    """Publish data-plane events and refresh the retained birth when the loaded models change."""

    def __init__(self, reporter: TelemetryReporter):
        self.reporter = reporter

    def on_loaded(self, model: LoadedModel) -> None:
        details = model.describe()
        self.reporter.publish_event("model_loaded", model=model.name, message=f"version {model.version} on {details['runtime']}", **details)
        self.reporter.publish_status()

    def on_unloaded(self, model: LoadedModel, reason: str) -> None:
        self.reporter.publish_event(
            "model_unloaded", model=model.name, message=f"version {model.version} {reason}", version=model.version, reason=reason
        )
        self.reporter.publish_status()

    def on_load_failed(self, path: Path, error: Exception) -> None:
        self.reporter.publish_event("error", message=str(error), phase="load", path=str(path), error_type=type(error).__name__)

    def on_runtime_fallback(self, model: LoadedModel, skipped: list[Attempt]) -> None:
        runtime = model.backend.runtime
        self.reporter.publish_event(
            "runtime_fallback",
            model=model.name,
            message=f"using {runtime} after {len(skipped)} candidates were skipped",
            version=model.version,
            runtime=runtime,
            skipped=[attempt.describe() for attempt in skipped],
        )

    def on_inference_error(self, model: LoadedModel, error: Exception, suppressed: int) -> None:
        self.reporter.publish_event(
            "error",
            model=model.name,
            message=str(error),
            phase="inference",
            version=model.version,
            error_type=type(error).__name__,
            suppressed=suppressed,
        )
