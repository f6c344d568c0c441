"""Fleet monitor: subscribe to the agents' telemetry, keep per-device state, history and alerts.

paho's network thread only queues incoming messages. One processing thread parses them,
updates the device table, writes history in batches and evaluates alerts, so a slow SQLite
write never delays the MQTT acknowledgements.

With a shared group, metrics and events come through an MQTT v5 shared subscription
(``$share/<group>/...``) so that each monitor of the group receives a share of the messages.
Status messages are subscribed without sharing, so every monitor knows every device's birth
and Last Will.
"""

from __future__ import annotations

import copy
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeopt.fleet.alerts import Alert, AlertRules, AlertTracker
from edgeopt.fleet.history import History
from edgeopt.mqtt import TOPIC_ROOT, BrokerURL, MqttSession, TlsFiles, parse_device_topic

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0
# Sequence numbers kept per device for duplicate detection; QoS 1 redelivery happens within
# a few messages, so older numbers only cost memory.
_SEQ_WINDOW = 4096


@dataclass
class Delivery:
    """Per-device accounting of the numbered messages of one reporter session."""

    session: str | None = None
    first_seq: int | None = None
    max_seq: int = 0
    unique: int = 0
    duplicates: int = 0
    dropped_at_first: int = 0
    dropped_total: int = 0
    seen: set[int] = field(default_factory=set)

    def record(self, session: str | None, seq: int, dropped_total: int | None) -> bool:
        """Count one message; return False for a duplicate. A new session restarts the count."""
        if session != self.session:
            self.__init__(session=session)  # type: ignore[misc]
        if seq in self.seen:
            self.duplicates += 1
            return False
        if self.first_seq is None or seq < self.first_seq:
            self.first_seq = seq
            if dropped_total is not None and self.unique == 0:
                self.dropped_at_first = dropped_total
        self.seen.add(seq)
        self.unique += 1
        self.max_seq = max(self.max_seq, seq)
        if dropped_total is not None:
            self.dropped_total = max(self.dropped_total, dropped_total)
        if len(self.seen) > 2 * _SEQ_WINDOW:
            floor = self.max_seq - _SEQ_WINDOW
            self.seen = {s for s in self.seen if s > floor}
        return True

    @property
    def missing(self) -> int:
        """Messages of the seq range not received here (the agent dropped or the path lost them)."""
        if self.first_seq is None:
            return 0
        return self.max_seq - self.first_seq + 1 - self.unique

    @property
    def lost(self) -> int:
        """Missing messages that the agent did not report as dropped from its buffer."""
        return max(0, self.missing - (self.dropped_total - self.dropped_at_first))


@dataclass
class DeviceState:
    """State the monitor keeps for one device."""

    device_id: str
    fleet: str
    status: str = "unknown"
    reason: str = ""
    profile: str | None = None
    runtime: str | None = None
    models: dict[str, Any] = field(default_factory=dict)
    loaded_models: list[dict[str, Any]] = field(default_factory=list)
    power_w: float | None = None
    power_source: str | None = None
    energy_per_inference_mj: float | None = None
    energy_method: str | None = None
    temperature_c: float | None = None
    cpu_percent: float | None = None
    interval_s: float = DEFAULT_INTERVAL_S
    last_seen: float | None = None
    last_metrics: float | None = None
    metrics_received: int = 0
    events_received: int = 0
    delivery: Delivery = field(default_factory=Delivery)

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        now = now or time.time()
        return {
            "type": "device",
            "device_id": self.device_id,
            "fleet": self.fleet,
            "status": self.status,
            "reason": self.reason,
            "profile": self.profile,
            "runtime": self.runtime,
            "models": self.models,
            "loaded_models": self.loaded_models,
            "power_w": self.power_w,
            "power_source": self.power_source,
            "energy_per_inference_mj": self.energy_per_inference_mj,
            "energy_method": self.energy_method,
            "temperature_c": self.temperature_c,
            "cpu_percent": self.cpu_percent,
            "interval_s": self.interval_s,
            "last_seen_s": None if self.last_seen is None else round(now - self.last_seen, 1),
            "metrics_received": self.metrics_received,
            "events_received": self.events_received,
            "messages_lost": self.delivery.lost,
            "messages_dropped_by_agent": self.delivery.dropped_total - self.delivery.dropped_at_first,
            "duplicates": self.delivery.duplicates,
        }


@dataclass(frozen=True)
class MonitorConfig:
    """Broker, topic filter and behaviour of one monitor."""

    broker: BrokerURL
    fleet: str | None = None
    shared_group: str | None = None
    tls: TlsFiles | None = None
    client_id: str | None = None
    session_expiry_s: int = 0
    missed_intervals: int = 3
    history_flush_s: float = 0.5

    def topics(self) -> list[str]:
        fleet = self.fleet or "+"
        status = f"{TOPIC_ROOT}/{fleet}/+/status"
        data = [f"{TOPIC_ROOT}/{fleet}/+/metrics", f"{TOPIC_ROOT}/{fleet}/+/events"]
        if self.shared_group:
            data = [f"$share/{self.shared_group}/{topic}" for topic in data]
        return [status, *data]


class FleetMonitor:
    """Watch the agents of one fleet (or all fleets) through an MQTT broker."""

    def __init__(
        self,
        config: MonitorConfig,
        *,
        history: History | None = None,
        rules: AlertRules | None = None,
        on_update: Callable[[DeviceState], None] | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        on_event: Callable[[DeviceState, dict[str, Any]], None] | None = None,
    ):
        self.config = config
        self.history = history
        self.alerts = AlertTracker(rules or AlertRules())
        self.on_update = on_update
        self.on_alert = on_alert
        self.on_event = on_event
        self.devices: dict[str, DeviceState] = {}
        self.received = 0
        self.processed = 0
        self.invalid = 0
        self.subscribed = threading.Event()
        self._queue: queue.SimpleQueue[tuple[str, bytes, float]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

        client_id = config.client_id or f"edgeopt-monitor-{uuid.uuid4().hex[:8]}"
        self.mqtt = MqttSession(
            client_id=client_id,
            broker=config.broker,
            tls=config.tls,
            clean_start=config.session_expiry_s == 0,
            session_expiry_s=config.session_expiry_s,
            on_connect=self._on_connect,
            on_message=self._on_message,
            on_subscribe=self._on_subscribe,
        )

    # Lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleet-monitor", daemon=True)
        self._thread.start()
        self.mqtt.start()
        log.info("fleet monitor started: broker %s, topics %s", self.config.broker, ", ".join(self.config.topics()))

    def stop(self) -> None:
        self.mqtt.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.history is not None:
            self.history.flush()
        log.info("fleet monitor stopped: %d messages received, %d processed", self.received, self.processed)

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until every received message is processed and written; return whether that happened."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.processed >= self.received and self._queue.empty():
                return True
            time.sleep(0.02)
        return False

    def snapshot(self) -> list[DeviceState]:
        """Return copies of the device states, sorted by device id."""
        with self._lock:
            return [copy.copy(self.devices[device_id]) for device_id in sorted(self.devices)]

    # MQTT callbacks (network thread) -----------------------------------------------------------------

    def _on_connect(self, session: MqttSession) -> None:
        session.subscribe(self.config.topics(), qos=1)

    def _on_subscribe(self, mid: int) -> None:
        # Set only on the broker's SUBACK: a message published after this point reaches the monitor.
        self.subscribed.set()

    def _on_message(self, message) -> None:
        self.received += 1
        self._queue.put((message.topic, message.payload, time.time()))

    # Processing thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        next_flush = time.monotonic() + self.config.history_flush_s
        next_check = time.monotonic() + 1.0
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                topic, payload, received = self._queue.get(timeout=0.2)
            except queue.Empty:
                pass
            else:
                try:
                    self._handle(topic, payload, received)
                except Exception:  # one malformed message must not stop the monitor
                    self.invalid += 1
                    log.exception("processing a message on %s failed", topic)
                self.processed += 1

            now = time.monotonic()
            if self.history is not None and now >= next_flush:
                self._flush_history()
                next_flush = now + self.config.history_flush_s
            if now >= next_check:
                self.check_silence()
                next_check = now + 1.0
        if self.history is not None:
            self._flush_history()

    def _flush_history(self) -> None:
        try:
            self.history.flush()
        except Exception:  # a locked or full disk must not stop live monitoring
            log.exception("writing history to %s failed; keeping the rows for the next try", self.history.path)

    def _handle(self, topic: str, raw: bytes, received: float) -> None:
        parsed = parse_device_topic(topic)
        if parsed is None:
            return
        fleet, device_id, kind = parsed
        try:
            payload = json.loads(raw)
        except ValueError:
            self.invalid += 1
            log.warning("invalid JSON on %s (%d bytes) ignored", topic, len(raw))
            return
        if not isinstance(payload, dict):
            self.invalid += 1
            log.warning("payload on %s is not a JSON object; ignored", topic)
            return

        with self._lock:
            device = self.devices.get(device_id)
            if device is None:
                device = self.devices[device_id] = DeviceState(device_id=device_id, fleet=fleet)
            events_before = device.events_received
            alerts = {"status": self._apply_status, "metrics": self._apply_metrics, "events": self._apply_event}[kind](
                device, payload, received
            )

        if self.history is not None:
            self.history.add(device_id, fleet, kind, received, payload, raw)
        # A QoS 1 redelivery of an event leaves the count unchanged and is not passed on.
        if kind == "events" and self.on_event is not None and device.events_received > events_before:
            self.on_event(device, payload)
        self._emit(device, alerts, received)

    def _apply_status(self, device: DeviceState, payload: dict[str, Any], received: float) -> list[Alert]:
        device.status = payload.get("state", "unknown")
        device.reason = payload.get("reason", "")
        device.last_seen = received
        if device.status == "online":
            device.profile = payload.get("profile")
            device.runtime = payload.get("runtime")
            device.loaded_models = payload.get("models") or []
            device.interval_s = float(payload.get("metrics_interval_s") or DEFAULT_INTERVAL_S)
            device.power_source = payload.get("power_source") or device.power_source
        return self.alerts.check_online(device.device_id, device.status == "online", device.reason)

    def _apply_metrics(self, device: DeviceState, payload: dict[str, Any], received: float) -> list[Alert]:
        seq = payload.get("seq")
        if isinstance(seq, int) and not device.delivery.record(payload.get("session"), seq, payload.get("dropped_total")):
            return []

        device.metrics_received += 1
        device.last_seen = received
        device.last_metrics = received
        device.models = payload.get("models") or {}
        device.interval_s = float(payload.get("interval_s") or device.interval_s)
        metrics_device = payload.get("device") or {}
        device.power_w = metrics_device.get("power_w")
        device.power_source = metrics_device.get("power_source")
        device.energy_per_inference_mj = metrics_device.get("energy_per_inference_mj")
        device.energy_method = (metrics_device.get("energy") or {}).get("method")
        device.temperature_c = metrics_device.get("temperature_c")
        device.cpu_percent = metrics_device.get("cpu_percent")

        alerts = []
        if device.status != "online":
            device.status = "online"
            device.reason = ""
            alerts += self.alerts.check_online(device.device_id, True)
        alerts += self.alerts.check_metrics(device.device_id, device.models, device.power_w, device.power_source)
        return alerts

    def _apply_event(self, device: DeviceState, payload: dict[str, Any], received: float) -> list[Alert]:
        seq = payload.get("seq")
        if isinstance(seq, int) and not device.delivery.record(payload.get("session"), seq, None):
            return []
        device.events_received += 1
        device.last_seen = received
        log.info("event from %s: %s %s %s", device.device_id, payload.get("event"), payload.get("model") or "", payload.get("message", ""))
        return []

    def check_silence(self, now: float | None = None) -> None:
        """Mark devices offline whose metrics stopped for ``missed_intervals`` intervals.

        Monitors of a shared group each receive only part of a device's metrics, so for them
        only the Last Will marks a device offline.
        """
        if self.config.shared_group:
            return
        now = now or time.time()
        changed = []
        with self._lock:
            for device in self.devices.values():
                if device.status != "online" or device.last_seen is None:
                    continue
                silent_s = now - device.last_seen
                if silent_s > self.config.missed_intervals * device.interval_s:
                    device.status = "offline"
                    device.reason = f"no message for {silent_s:.0f} s ({self.config.missed_intervals} intervals missed)"
                    changed.append((device, self.alerts.check_online(device.device_id, False, device.reason)))
        for device, alerts in changed:
            self._emit(device, alerts, now)

    def _emit(self, device: DeviceState, alerts: list[Alert], received: float) -> None:
        for alert in alerts:
            # An on_alert callback shows alerts itself, so a WARNING here would print them twice.
            level = logging.WARNING if alert.state == "firing" and self.on_alert is None else logging.INFO
            log.log(level, "alert %s: %s", alert.state, alert.message)
            if self.history is not None:
                self.history.add_alert(alert.device_id, received, alert.kind, alert.state, alert.message)
            if self.on_alert is not None:
                self.on_alert(alert)
        if self.on_update is not None:
            self.on_update(device)
