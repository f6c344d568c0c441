"""A real mosquitto broker on a free loopback port for the telemetry and fleet tests.

Register with ``pytest_plugins = ["tests.mqtt_broker"]`` or import the fixtures. The broker
binary is the Debian package ``mosquitto``; tests that need it are skipped with the install
command when it is missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import json
import threading
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto")


def find_mosquitto() -> str | None:
    for candidate in MOSQUITTO_CANDIDATES:
        path = shutil.which(candidate)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MosquittoBroker:
    """One mosquitto process with a generated configuration; it can be stopped and started again."""

    def __init__(self, directory: Path, port: int | None = None, extra_config: str = "", persistence: bool = False):
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError("mosquitto is not installed: run 'sudo apt-get install mosquitto'")
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config_path = self.directory / "mosquitto.conf"
        self.log_path = self.directory / "mosquitto.log"
        self.config_path.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    "allow_anonymous true",
                    # With persistence, sessions and their queued messages survive a restart.
                    f"persistence {'true' if persistence else 'false'}",
                    f"persistence_location {self.directory}/",
                    # A running mosquitto started as root switches to this user; root keeps the
                    # test's temporary files readable.
                    "user root",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "max_queued_messages 100000",
                    extra_config,
                    "",
                ]
            )
        )
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([self.binary, "-c", str(self.config_path)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with status {self.process.returncode}: {self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


class MessageCollector:
    """A paho subscriber that stores every message it receives, for assertions."""

    def __init__(self, port: int, topic: str, client_id: str | None = None, session_expiry_s: int = 0):
        self.messages: list[tuple[str, dict, bool]] = []
        self._condition = threading.Condition()
        self._subscribed = threading.Event()
        self.topic = topic
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or "", protocol=paho.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 1)
        properties = None
        if session_expiry_s:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry_s
        self.client.connect("127.0.0.1", port, clean_start=not session_expiry_s, properties=properties)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError(f"subscribing to {topic} timed out")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not flags.session_present:
            client.subscribe(self.topic, qos=1)
        else:
            self._subscribed.set()

    def _on_message(self, client, userdata, message):
        with self._condition:
            self.messages.append((message.topic, json.loads(message.payload), bool(message.retain)))
            self._condition.notify_all()

    def matching(self, predicate: Callable[[str, dict], bool]) -> list[dict]:
        with self._condition:
            return [payload for topic, payload, _ in self.messages if predicate(topic, payload)]

    def wait_for(self, predicate: Callable[[str, dict], bool], count: int = 1, timeout_s: float = 10.0) -> list[dict]:
        """Wait until ``count`` messages match; raise AssertionError with what arrived otherwise."""
        with self._condition:
            self._condition.wait_for(
                lambda: sum(1 for topic, payload, _ in self.messages if predicate(topic, payload)) >= count,
                timeout=timeout_s,
            )
        found = self.matching(predicate)
        if len(found) < count:
            topics = [topic for topic, _, _ in self.messages][-10:]
            raise AssertionError(f"expected {count} matching messages within {timeout_s} s, got {len(found)}; last topics {topics}")
        return found

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory):
    """A mosquitto broker shared by the whole test session."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed: run 'sudo apt-get install mosquitto'")
    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def own_mqtt_broker(tmp_path):
    """A mosquitto broker for one test, which may stop and restart it."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed: run 'sudo apt-get install mosquitto'")
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()
