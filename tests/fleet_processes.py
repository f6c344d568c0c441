"""Helpers for end-to-end tests that run `edgeopt agent run` and `edgeopt fleet watch` as processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time


class LineReader:
    """Collect a subprocess's standard output lines on a thread."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, timeout_s: float = 20.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no matching line within {timeout_s} s; last lines: {self.lines[-5:]}")


def json_records(reader: LineReader, record_type: str, device_id: str) -> list[dict]:
    """Return the monitor's ``--json`` records of one type ("device", "event", "alert") for a device."""
    records = []
    for line in list(reader.lines):
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("type") == record_type and record.get("device_id") == device_id:
                records.append(record)
    return records


def device_lines(reader: LineReader, device_id: str) -> list[dict]:
    return json_records(reader, "device", device_id)


def requests_seen(reader: LineReader, device_id: str, model: str) -> int:
    """Sum the per-interval request counts of distinct metrics messages."""
    per_message = {}
    for record in device_lines(reader, device_id):
        counters = record["models"].get(model)
        if counters and record["metrics_received"]:
            per_message[record["metrics_received"]] = counters["requests"]
    return sum(per_message.values())


def edgeopt_process(*args: str) -> subprocess.Popen:
    """Start ``python -m edgeopt ARGS`` with unbuffered text output on a pipe."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgeopt", *args], stdout=subprocess.PIPE, text=True, env=env)


def stop_processes(*processes: subprocess.Popen) -> None:
    """Terminate processes that still run, killing those that ignore SIGTERM for 10 s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
