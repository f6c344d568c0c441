"""End to end with a real model: the EfficientNet-Lite0 bundle, mosquitto and `edgeopt fleet watch --json`.

`edgeopt agent run` serves the bundle that lite0_fixtures builds. tritonclient sends
scikit-image's cat photo over gRPC; the top-1 class must be an ImageNet cat, the monitor
must show the request count and latencies, and SIGKILL on the agent must turn it offline
through its Last Will.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import time

import numpy as np
import pytest
import tritonclient.grpc as triton

from agent_fixtures import free_port
from fleet_processes import LineReader, device_lines, edgeopt_process, json_records, requests_seen, stop_processes
from lite0_fixtures import IMAGENET_CAT_CLASSES, lite0_bundle  # noqa: F401
from mqtt_broker import MosquittoBroker, find_mosquitto

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed: run 'sudo apt-get install mosquitto'"),
]

REQUESTS = 20


def test_lite0_agent_broker_monitor(tmp_path, lite0_bundle):  # noqa: F811
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    grpc_port = free_port()
    monitor = edgeopt_process("fleet", "watch", "--broker", broker.url, "--fleet", "lite0", "--json", "--no-history")
    agent = edgeopt_process(
        "agent", "run", "--bundle", str(lite0_bundle.tar), "--listen", f"127.0.0.1:{grpc_port}", "--cache-dir", str(tmp_path / "cache"),
        "--broker", broker.url, "--fleet", "lite0", "--device-id", "lite0-agent", "--metrics-interval", "1",
    )
    monitor_lines, agent_lines = LineReader(monitor), LineReader(agent)
    try:
        serving = agent_lines.wait_for(lambda line: line.startswith("serving "), timeout_s=120)
        agent_lines.wait_for(lambda line: line.startswith("reporting to"), timeout_s=30)
        model = re.match(r"serving (\S+) version", serving).group(1)
        monitor_lines.wait_for(lambda line: '"device_id":"lite0-agent"' in line and '"status":"online"' in line)

        photo = np.load(lite0_bundle.chelsea)
        top1, client_ms = [], []
        with triton.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            tensor = triton.InferInput("input", list(photo.shape), "FP32")
            tensor.set_data_from_numpy(photo)
            for _ in range(REQUESTS):
                started = time.perf_counter()
                result = client.infer(model, [tensor])
                client_ms.append((time.perf_counter() - started) * 1000)
                top1.append(int(np.argmax(result.as_numpy("logits")[0])))

        deadline = time.monotonic() + 15
        while requests_seen(monitor_lines, "lite0-agent", model) < REQUESTS and time.monotonic() < deadline:
            time.sleep(0.1)
        seen = requests_seen(monitor_lines, "lite0-agent", model)
        busy = [r for r in device_lines(monitor_lines, "lite0-agent") if r["models"].get(model, {}).get("requests")]
        loaded = [r for r in json_records(monitor_lines, "event", "lite0-agent") if r["event"] == "model_loaded"]

        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=10)
        offline = monitor_lines.wait_for(lambda line: '"device_id":"lite0-agent"' in line and '"status":"offline"' in line)
    finally:
        stop_processes(agent, monitor)
        broker.stop()

    # Shown with pytest -s or on failure: where the time went, measured on this host.
    print(
        f"lite0 on {lite0_bundle.device}: build {lite0_bundle.build_s:.0f} s, client round trip median "
        f"{statistics.median(client_ms):.1f} ms, agent p50 {busy[-1]['models'][model]['latency_ms']['p50']:.1f} ms "
        f"and p99 {busy[-1]['models'][model]['latency_ms']['p99']:.1f} ms over the last interval"
    )
    assert all(label in IMAGENET_CAT_CLASSES for label in top1), top1
    assert seen == REQUESTS

    counters = busy[-1]["models"][model]
    latency = counters["latency_ms"]
    assert counters["errors"] == 0
    assert counters["rps"] > 0
    assert 0 < latency["p50"] <= latency["p99"]
    # The agent times a request from arrival to response, so its median cannot exceed the
    # client's round trip; 10 % covers the histogram's bucket width.
    assert latency["p50"] <= 1.1 * statistics.median(client_ms)
    assert busy[-1]["runtime"].startswith("onnxruntime")
    assert busy[-1]["power_source"] in ("rapl", "estimated")

    assert loaded[0]["model"] == model
    assert loaded[0]["details"]["precision"] == "int8"
    assert '"reason":"connection lost"' in offline
