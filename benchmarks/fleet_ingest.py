"""Fleet ingest benchmark: simulated devices publish metrics at 1 Hz into mosquitto on loopback.

The fleet monitor (with SQLite history) runs in its own process and must account for every
QoS 1 message. The run is repeated with two monitors in one shared-subscription group. The
script prints both runs side by side: messages per second, loss, drain lag (time from the
last publish until every message is processed) and the CPU each monitor used.

    python benchmarks/fleet_ingest.py --devices 2000 --duration 30
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The broker settings a large fleet needs; docs/fleet.md explains each one.
FLEET_BROKER_CONFIG = """\
max_inflight_messages 1000
max_queued_messages 100000
max_queued_bytes 0
set_tcp_nodelay true
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mosquitto(directory: Path, port: int) -> subprocess.Popen:
    binary = shutil.which("mosquitto") or shutil.which("/usr/sbin/mosquitto")
    if binary is None:
        sys.exit("mosquitto is not installed: run 'sudo apt-get install mosquitto'")
    config = directory / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\nlog_dest none\n{FLEET_BROKER_CONFIG}")
    process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    sys.exit(f"mosquitto did not listen on port {port}")


def metrics_payload(device_id: str, seq: int, session: str) -> bytes:
    """Build a metrics message shaped like the agent's, with plausible values."""
    requests = 40 + seq % 7
    return json.dumps(
        {
            "schema": 1,
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "device_id": device_id,
            "session": session,
            "seq": seq,
            "interval_s": 1.0,
            "models": {
                "efficientnet-lite0": {
                    "version": "1",
                    "requests": requests,
                    "errors": 0,
                    "rps": float(requests),
                    "queue_depth": 1,
                    "latency_ms": {"p50": 21.4, "p90": 25.9, "p99": 31.2},
                }
            },
            "device": {
                "cpu_percent": 61.0,
                "memory": {"total_mb": 7812.0, "used_mb": 1402.5, "percent": 18.0},
                "temperature_c": 55.1,
                "temperatures_c": {"cpu-thermal": 55.1},
                "power_w": 5.21,
                "power_source": "rpi5-pmic",
                "power_estimated": False,
                "energy": {"joules": 5.21, "method": "integrated", "inferences": requests, "per_inference_mj": 5210.0 / requests},
                "energy_per_inference_mj": 5210.0 / requests,
            },
            "dropped": 0,
            "dropped_total": 0,
            "buffered": 0,
        },
        separators=(",", ":"),
    ).encode()


def publisher(port: int, devices: list[str], duration_s: float, start_at: float, sent: mp.Value) -> None:
    """Publish one metrics message per device per second, spread evenly over each second."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    session = f"bench-{os.getpid()}"
    while time.time() < start_at:
        time.sleep(0.01)

    count = 0
    infos = []
    for second in range(int(duration_s)):
        for index, device_id in enumerate(devices):
            due = start_at + second + index / len(devices)
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            infos.append(client.publish(f"edgeopt/v1/bench/{device_id}/metrics", metrics_payload(device_id, second + 1, session), qos=1))
            count += 1
    for info in infos:
        info.wait_for_publish(timeout=60)
    with sent.get_lock():
        sent.value += count
    client.disconnect()
    client.loop_stop()


def monitor_process(port: int, group: str | None, history_path: str, processed: mp.Value, ready: mp.Event, stop: mp.Event, results: mp.Queue) -> None:
    from edgeopt.fleet.history import History
    from edgeopt.fleet.monitor import FleetMonitor, MonitorConfig
    from edgeopt.mqtt import BrokerURL

    history = History(history_path)
    monitor = FleetMonitor(MonitorConfig(broker=BrokerURL("127.0.0.1", port), fleet="bench", shared_group=group), history=history)
    monitor.start()
    monitor.subscribed.wait(15)
    ready.set()
    while not stop.is_set():
        processed.value = monitor.processed
        time.sleep(0.1)
    processed.value = monitor.processed
    monitor.stop()
    history.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    devices = monitor.devices.values()
    results.put(
        {
            "received": monitor.received,
            "unique": sum(device.delivery.unique for device in devices),
            "duplicates": sum(device.delivery.duplicates for device in devices),
            "lost_by_seq": sum(device.delivery.lost for device in devices),
            "history_rows": history.stored,
            "cpu_s": usage.ru_utime + usage.ru_stime,
        }
    )


def run(devices: int, duration_s: float, monitors: int, publishers: int, workdir: Path) -> dict:
    port = free_port()
    broker = start_mosquitto(workdir, port)
    context = mp.get_context("spawn")
    stop = context.Event()
    results = context.Queue()
    processed = [context.Value("l", 0) for _ in range(monitors)]
    ready = [context.Event() for _ in range(monitors)]
    group = "bench-monitors" if monitors > 1 else None
    children = [
        context.Process(target=monitor_process, args=(port, group, str(workdir / f"history-{monitors}-{i}.sqlite"), processed[i], ready[i], stop, results))
        for i in range(monitors)
    ]
    for child in children:
        child.start()
    for event in ready:
        event.wait(30)

    started_monitor_cpu = time.time()
    sent = context.Value("l", 0)
    ids = [f"sim-{i:05d}" for i in range(devices)]
    start_at = time.time() + 2.0
    workers = [
        context.Process(target=publisher, args=(port, ids[i::publishers], duration_s, start_at, sent)) for i in range(publishers)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    published_at = time.time()
    expected = devices * int(duration_s)

    while sum(v.value for v in processed) < expected and time.time() - published_at < 120:
        time.sleep(0.05)
    drain_lag = time.time() - published_at
    stop.set()
    stats = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=30)
    broker_cpu = _process_cpu_seconds(broker.pid)
    broker.terminate()
    broker.wait(timeout=10)

    wall = published_at - start_at
    unique = sum(s["unique"] for s in stats)
    return {
        "monitors": monitors,
        "devices": devices,
        "duration_s": int(duration_s),
        "sent": sent.value,
        "expected": expected,
        "unique_received": unique,
        "lost": expected - unique,
        "duplicates": sum(s["duplicates"] for s in stats),
        "history_rows": sum(s["history_rows"] for s in stats),
        "msg_per_s": unique / wall,
        "drain_lag_s": drain_lag,
        "monitor_cpu_percent": [100.0 * s["cpu_s"] / (time.time() - started_monitor_cpu) for s in stats],
        "broker_cpu_s": broker_cpu,
    }


def _process_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000, help="simulated devices, each publishing at 1 Hz")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of publishing (>= 30 for the recorded figures)")
    parser.add_argument("--publishers", type=int, default=2, help="publishing processes (each one MQTT connection)")
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="edgeopt-fleet-bench-") as scratch:
        rows = [run(args.devices, args.duration, monitors, args.publishers, Path(scratch)) for monitors in (1, 2)]

    print(f"{'':28}{'1 monitor':>16}{'2 monitors (shared)':>22}")
    for key, label, fmt in [
        ("devices", "devices at 1 Hz", "{:d}"),
        ("expected", "messages published", "{:d}"),
        ("unique_received", "messages accounted", "{:d}"),
        ("lost", "lost", "{:d}"),
        ("duplicates", "duplicates (QoS 1)", "{:d}"),
        ("history_rows", "history rows written", "{:d}"),
        ("msg_per_s", "ingest msg/s", "{:.0f}"),
        ("drain_lag_s", "drain lag s", "{:.2f}"),
    ]:
        print(f"{label:28}{fmt.format(rows[0][key]):>16}{fmt.format(rows[1][key]):>22}")
    cpu = [" + ".join(f"{c:.0f}" for c in row["monitor_cpu_percent"]) for row in rows]
    print(f"{'monitor CPU % (one core)':28}{cpu[0]:>16}{cpu[1]:>22}")
    per_cpu = [row["unique_received"] / max(1e-9, sum(row["monitor_cpu_percent"]) / 100 * (row["duration_s"] + row["drain_lag_s"])) for row in rows]
    print(f"{'msg per monitor CPU-second':28}{per_cpu[0]:>16.0f}{per_cpu[1]:>22.0f}")
    broker = [f"{row['broker_cpu_s']:.1f}" if row["broker_cpu_s"] is not None else "-" for row in rows]
    print(f"{'mosquitto CPU s':28}{broker[0]:>16}{broker[1]:>22}")


if __name__ == "__main__":
    main()
