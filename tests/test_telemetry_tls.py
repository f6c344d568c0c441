"""Telemetry over TLS: mosquitto with a TLS listener that requires client certificates.

The test makes a CA, a server certificate for 127.0.0.1 and localhost, and a client
certificate with the ``openssl`` command. `edgeopt agent run` reports over ``mqtts://`` and
`edgeopt fleet watch --once` reads the fleet over TLS, both with --ca/--cert/--key.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from agent_fixtures import free_port, make_classifier_bundle
from edgeopt.cli import cli
from fleet_processes import LineReader, edgeopt_process, stop_processes
from mqtt_broker import MosquittoBroker, find_mosquitto

pytestmark = [
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed: run 'sudo apt-get install mosquitto'"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed"),
]

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def issue_certificate(directory: Path, name: str, extensions: str) -> None:
    """Write NAME.key and NAME.pem, signed by the CA in ``directory``, with the given x509v3 extensions."""
    (directory / f"{name}.ext").write_text(extensions)
    openssl("req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=edgeopt test {name}", cwd=directory)
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "1", "-sha256", "-extfile", f"{name}.ext",
        cwd=directory,
    )


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""
    directory = tmp_path_factory.mktemp("pki")
    openssl(
        "req", "-x509", *EC_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-sha256", "-subj", "/CN=edgeopt test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    key_ids = "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\nbasicConstraints=critical,CA:FALSE\n"
    issue_certificate(
        directory, "server", key_ids + "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    issue_certificate(directory, "client", key_ids + "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    return directory


@pytest.fixture
def tls_broker(tmp_path, certificates):
    broker = MosquittoBroker(
        tmp_path / "broker",
        extra_config="\n".join(
            [
                f"cafile {certificates / 'ca.pem'}",
                f"certfile {certificates / 'server.pem'}",
                f"keyfile {certificates / 'server.key'}",
                "require_certificate true",
            ]
        ),
    )
    broker.start()
    yield broker
    broker.stop()


def tls_options(certificates: Path) -> list[str]:
    return ["--ca", str(certificates / "ca.pem"), "--cert", str(certificates / "client.pem"), "--key", str(certificates / "client.key")]


def test_agent_reports_and_monitor_reads_over_tls(tmp_path, certificates, tls_broker):
    url = f"mqtts://127.0.0.1:{tls_broker.port}"
    bundle = make_classifier_bundle(tmp_path / "bundles")
    agent = edgeopt_process(
        "agent", "run", "--bundle", str(bundle), "--listen", f"127.0.0.1:{free_port()}", "--cache-dir", str(tmp_path / "cache"),
        "--broker", url, *tls_options(certificates), "--fleet", "tls", "--device-id", "tls-agent", "--metrics-interval", "0.5",
    )
    agent_lines = LineReader(agent)
    try:
        agent_lines.wait_for(lambda line: line.startswith("reporting to"), timeout_s=60)
        result = CliRunner().invoke(
            cli, ["fleet", "watch", "--broker", url, *tls_options(certificates), "--fleet", "tls", "--once", "--json", "--no-history"]
        )
    finally:
        stop_processes(agent)

    records = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    devices = [record for record in records if record["type"] == "device"]
    assert result.exit_code == 0, result.output
    assert agent_lines.lines[-1].startswith("reporting to mqtts://127.0.0.1:")
    assert [device["device_id"] for device in devices] == ["tls-agent"]
    assert devices[0]["status"] == "online"
    assert devices[0]["metrics_received"] >= 1
    assert [model["name"] for model in devices[0]["loaded_models"]] == ["tiny"]
    assert agent.returncode == 0


def connect_outcome(port: int, ca: Path, cert: Path | None = None, key: Path | None = None, timeout_s: float = 5.0) -> str:
    """Connect a paho client over TLS and return "connected" or the reason it failed."""
    outcome: list[str] = []
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None, keyfile=str(key) if key else None, cert_reqs=ssl.CERT_REQUIRED)

    def on_connect(client, userdata, flags, reason_code, properties):
        outcome.append("connected" if not reason_code.is_failure else f"rejected: {reason_code}")
        done.set()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        outcome.append(f"disconnected: {reason_code}")
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect("127.0.0.1", port)
    except (ssl.SSLError, OSError) as exc:
        return f"failed: {exc}"
    client.loop_start()
    done.wait(timeout_s)
    client.disconnect()
    client.loop_stop()
    return outcome[0] if outcome else "timed out"


def test_tls_broker_requires_client_certificate(certificates, tls_broker):
    with_certificate = connect_outcome(tls_broker.port, certificates / "ca.pem", certificates / "client.pem", certificates / "client.key")
    without_certificate = connect_outcome(tls_broker.port, certificates / "ca.pem")

    assert with_certificate == "connected"
    assert without_certificate.startswith(("disconnected", "failed", "rejected")), without_certificate


def test_agent_rejects_tls_files_for_plain_url(tmp_path, certificates):
    bundle = make_classifier_bundle(tmp_path / "bundles")
    result = CliRunner().invoke(
        cli, ["agent", "run", "--bundle", str(bundle), "--broker", "mqtt://127.0.0.1:1883", *tls_options(certificates)]
    )

    assert result.exit_code == 2
    assert "need an mqtts:// broker URL" in result.output
