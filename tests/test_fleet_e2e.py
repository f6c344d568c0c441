"""End to end: `edgeopt agent run` with telemetry, mosquitto, and `edgeopt fleet watch --json`.

The agent serves the small classifier bundle of agent_fixtures. Requests go over gRPC with
tritonclient; the monitor's JSON lines must show them, a broker restart must lose no metrics
message, and SIGKILL on the agent must turn it offline through its Last Will.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import tritonclient.grpc as triton

from agent_fixtures import free_port, make_classifier_bundle
from fleet_processes import LineReader, device_lines, edgeopt_process, json_records, requests_seen, stop_processes
from mqtt_broker import MosquittoBroker, find_mosquitto

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed: run 'sudo apt-get install mosquitto'")


def test_agent_broker_monitor_end_to_end(tmp_path):
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)
    broker.start()
    bundle = make_classifier_bundle(tmp_path / "bundles")
    grpc_port = free_port()

    monitor = edgeopt_process(
        "fleet", "watch", "--broker", broker.url, "--fleet", "e2e", "--json", "--no-history", "--client-id", "e2e-monitor", "--session-expiry", "300",
    )
    agent = edgeopt_process(
        "agent", "run", "--bundle", str(bundle), "--listen", f"127.0.0.1:{grpc_port}", "--cache-dir", str(tmp_path / "cache"),
        "--broker", broker.url, "--fleet", "e2e", "--device-id", "e2e-agent", "--metrics-interval", "0.5",
    )
    monitor_lines, agent_lines = LineReader(monitor), LineReader(agent)
    try:
        agent_lines.wait_for(lambda line: line.startswith("reporting to"), timeout_s=60)
        monitor_lines.wait_for(lambda line: '"device_id":"e2e-agent"' in line and '"status":"online"' in line)
        monitor_lines.wait_for(lambda line: '"type":"event"' in line and '"event":"model_loaded"' in line)
        loaded = next(r for r in json_records(monitor_lines, "event", "e2e-agent") if r["event"] == "model_loaded")
        assert loaded["model"] == "tiny"
        assert loaded["details"]["artifact"] == "model.onnx"

        x = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
        with triton.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            tensor = triton.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            for _ in range(25):
                client.infer("tiny", [tensor])

        deadline = time.monotonic() + 15
        while requests_seen(monitor_lines, "e2e-agent", "tiny") < 25 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert requests_seen(monitor_lines, "e2e-agent", "tiny") == 25
        latest = device_lines(monitor_lines, "e2e-agent")[-1]
        assert latest["profile"]
        assert "onnxruntime" in latest["runtime"]
        assert latest["power_source"] in ("rapl", "estimated", "nvml", "ina3221", "rpi5-pmic", "powermetrics")

        # Broker outage: the agent buffers, the broker keeps the monitor's session.
        before_outage = device_lines(monitor_lines, "e2e-agent")[-1]["metrics_received"]
        broker.stop()
        time.sleep(3.0)
        broker.start()
        deadline = time.monotonic() + 30
        while device_lines(monitor_lines, "e2e-agent")[-1]["metrics_received"] < before_outage + 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        after = device_lines(monitor_lines, "e2e-agent")[-1]
        assert after["metrics_received"] >= before_outage + 10
        assert after["messages_lost"] == 0
        assert after["messages_dropped_by_agent"] == 0

        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=10)
        offline = monitor_lines.wait_for(lambda line: '"device_id":"e2e-agent"' in line and '"status":"offline"' in line)
        assert json.loads(offline)["reason"] == "connection lost"
    finally:
        stop_processes(agent, monitor)
        broker.stop()
