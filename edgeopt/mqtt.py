"""MQTT pieces shared by the agent's telemetry reporter and the fleet monitor.

Topics are ``edgeopt/v1/<fleet>/<device_id>/<kind>`` with kind ``status`` (retained birth and
Last Will), ``metrics`` or ``events``. Payloads are JSON objects with ``schema``, ``ts``
(UTC ISO-8601) and ``device_id``. ``MqttSession`` wraps a paho-mqtt 2.x client: it connects in
the background, reconnects with exponential backoff and falls back from MQTT v5 to 3.1.1 when
the broker rejects v5.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

TOPIC_ROOT = "edgeopt/v1"
PAYLOAD_SCHEMA = 1
MESSAGE_KINDS = ("status", "metrics", "events")

# A topic level may not contain the separator or the wildcards (MQTT 5.0, section 4.7). The
# stricter set keeps ids readable in shell commands and file names.
_LEVEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def utc_timestamp() -> str:
    """Return the current UTC time as ISO-8601 with milliseconds and a ``Z`` suffix."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_topic_level(value: str, what: str) -> str:
    """Return ``value`` if it is usable as one topic level, else raise ValueError naming ``what``."""
    if not _LEVEL.match(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '_', '.', ':' or '-', starting with a letter or digit"
        )
    return value


def device_topic(fleet: str, device_id: str, kind: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/{device_id}/{kind}"


def parse_device_topic(topic: str) -> tuple[str, str, str] | None:
    """Split a device topic into (fleet, device_id, kind), or return None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT or parts[4] not in MESSAGE_KINDS:
        return None
    return parts[2], parts[3], parts[4]


@dataclass(frozen=True)
class BrokerURL:
    """Broker address from ``mqtt://[user:pass@]host:port``, or ``mqtts://`` for TLS."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    """Parse a broker URL; a missing port means 1883 (mqtt) or 8883 (mqtts)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"invalid broker URL {url!r}: use mqtt://host:port or mqtts://host:port")
    if not parts.hostname:
        raise ValueError(f"invalid broker URL {url!r}: the host is missing")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"invalid broker URL {url!r}: remove the path or query after host:port")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid broker URL {url!r}: {exc}") from exc
    tls = parts.scheme == "mqtts"
    return BrokerURL(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


@dataclass(frozen=True)
class TlsFiles:
    """CA bundle and optional client certificate and key (PEM) for ``mqtts://``."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def check(self) -> None:
        """Raise ValueError for a missing file or a certificate given without its key."""
        for what, path in (("CA file", self.ca), ("client certificate", self.cert), ("client key", self.key)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{what} {path} not found")
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key: pass both --cert and --key")


@dataclass(frozen=True)
class Will:
    """The Last Will the broker publishes when the connection drops without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttSession:
    """One paho-mqtt client that connects in the background and keeps reconnecting.

    Callbacks run on paho's network thread and must return quickly. ``on_connect`` receives the
    session after every successful CONNACK, ``on_disconnect`` a description of the cause,
    ``on_message`` paho's message object and ``on_publish`` the message id of an acknowledged
    QoS 1 publish.
    """

    def __init__(
        self,
        client_id: str,
        broker: BrokerURL,
        tls: TlsFiles | None = None,
        *,
        keepalive: int = 30,
        will: Callable[[], Will] | None = None,
        clean_start: bool = True,
        session_expiry_s: int = 0,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 60,
        max_inflight: int = 20,
        connack_timeout_s: float = 10.0,
        on_connect: Callable[[MqttSession], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        on_message: Callable[[paho.MQTTMessage], None] | None = None,
        on_publish: Callable[[int], None] | None = None,
        on_subscribe: Callable[[int], None] | None = None,
    ):
        self.client_id = client_id
        self.broker = broker
        self.tls = tls
        self.keepalive = keepalive
        self.will = will
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.max_inflight = max_inflight
        self.connack_timeout_s = connack_timeout_s
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_message = on_message
        self.on_publish = on_publish
        self.on_subscribe = on_subscribe

        self.protocol = paho.MQTTv5
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._client: paho.Client | None = None
        self._stopping = False
        self._failures = 0
        self._attempt = 0
        self._tcp_failed = False

    @property
    def protocol_name(self) -> str:
        return "5.0" if self.protocol == paho.MQTTv5 else "3.1.1"

    def start(self) -> None:
        """Start connecting in the background; this returns at once even when the broker is down."""
        with self._lock:
            self._stopping = False
            self._client = self._build_client()
            client = self._client
        log.info("connecting to %s as %s (MQTT %s)", self.broker, self.client_id, self.protocol_name)
        client.connect_async(self.broker.host, self.broker.port, keepalive=self.keepalive, **self._connect_options())
        client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly (the broker then drops the Last Will) and stop the network thread."""
        with self._lock:
            self._stopping = True
            client = self._client
        if client is None:
            return
        client.disconnect()
        client.loop_stop()
        self.connected.clear()
        log.info("disconnected from %s as %s", self.broker, self.client_id)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> paho.MQTTMessageInfo:
        with self._lock:
            client = self._client
        if client is None:
            raise RuntimeError("the MQTT session is not started")
        return client.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topics: list[str], qos: int = 1) -> int:
        """Send one SUBSCRIBE for ``topics`` and return its message id; ``on_subscribe`` gets it on SUBACK."""
        with self._lock:
            client = self._client
        if client is None:
            raise RuntimeError("the MQTT session is not started")
        _, mid = client.subscribe([(topic, qos) for topic in topics])
        return mid

    def _connect_options(self) -> dict[str, Any]:
        if self.protocol != paho.MQTTv5:
            return {}
        options: dict[str, Any] = {"clean_start": self.clean_start}
        if self.session_expiry_s:
            # MQTT v5 ends a session when the connection closes unless the client sets a session
            # expiry. A kept session receives QoS 1 messages while it is offline.
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.session_expiry_s
            options["properties"] = properties
        return options

    def _build_client(self) -> paho.Client:
        kwargs: dict[str, Any] = {"client_id": self.client_id, "protocol": self.protocol}
        if self.protocol != paho.MQTTv5:
            kwargs["clean_session"] = self.clean_start
        client = paho.Client(CallbackAPIVersion.VERSION2, **kwargs)
        if self.broker.username:
            client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            tls = self.tls or TlsFiles()
            client.tls_set(
                ca_certs=str(tls.ca) if tls.ca else None,
                certfile=str(tls.cert) if tls.cert else None,
                keyfile=str(tls.key) if tls.key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        client.reconnect_delay_set(self.reconnect_min_s, self.reconnect_max_s)
        client.max_inflight_messages_set(self.max_inflight)
        client.on_pre_connect = self._handle_pre_connect
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.on_connect_fail = self._handle_connect_fail
        return client

    # paho callbacks, on the network thread -------------------------------------------------------

    def _handle_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        # Set the Last Will before every attempt so its payload carries the current time.
        if self.will is not None:
            will = self.will()
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

        self._attempt += 1
        self._tcp_failed = False
        if self.protocol == paho.MQTTv5:
            # Some MQTT 3.1.1 brokers (amqtt 0.12, for one) neither reply nor close the
            # connection on a v5 CONNECT that carries a Last Will, so a missing CONNACK means
            # the same as a rejected protocol version.
            timer = threading.Timer(self.connack_timeout_s, self._check_connack, args=(client, self._attempt))
            timer.daemon = True
            timer.start()

    def _check_connack(self, client: paho.Client, attempt: int) -> None:
        if attempt != self._attempt or self._tcp_failed or self.connected.is_set() or self._stopping:
            return
        log.warning(
            "broker %s sent no CONNACK to MQTT 5.0 within %.0f s; reconnecting with MQTT 3.1.1",
            self.broker,
            self.connack_timeout_s,
        )
        self._downgrade(client)

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if self.protocol == paho.MQTTv5 and reason_code.value == 132:
                log.warning("broker %s rejects MQTT 5.0; reconnecting with MQTT 3.1.1", self.broker)
                threading.Thread(target=self._downgrade, args=(client,), name="mqtt-downgrade", daemon=True).start()
                return
            self._failures += 1
            log.error("broker %s rejected %s: %s (attempt %d)", self.broker, self.client_id, reason_code, self._failures)
            return
        self._failures = 0
        self._attempt = 0
        self._tcp_failed = False
        self.connected.set()
        log.info("connected to %s as %s (MQTT %s)", self.broker, self.client_id, self.protocol_name)
        if self.on_connect:
            self.on_connect(self)

    def _handle_connect_fail(self, client, userdata) -> None:
        self._tcp_failed = True
        self._failures += 1
        # paho retries with a doubling delay; log the first failure and then every tenth.
        if self._failures == 1 or self._failures % 10 == 0:
            log.warning("connecting to %s failed (attempt %d); retrying with backoff", self.broker, self._failures)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if self._stopping or not was_connected:
            return
        log.warning("connection to %s lost: %s; reconnecting with backoff", self.broker, reason_code)
        if self.on_disconnect:
            self.on_disconnect(str(reason_code))

    def _handle_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        if self.on_message:
            self.on_message(message)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if self.on_publish:
            self.on_publish(mid)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [str(code) for code in reason_codes if code.is_failure]
        if failed:
            log.error("broker %s rejected subscription %d: %s", self.broker, mid, ", ".join(failed))
            return
        if self.on_subscribe:
            self.on_subscribe(mid)

    def _downgrade(self, old_client: paho.Client) -> None:
        old_client.disconnect()
        old_client.loop_stop()
        with self._lock:
            if self._stopping:
                return
            self.protocol = paho.MQTTv311
            self._client = self._build_client()
            client = self._client
        client.connect_async(self.broker.host, self.broker.port, keepalive=self.keepalive)
        client.loop_start()
