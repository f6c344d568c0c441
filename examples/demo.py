"""The `make demo` job: build EfficientNet-Lite0 bundles, serve one, watch it over MQTT.

Steps:
1. prepare calibration and evaluation crops from the photos shipped with scikit-image and
   scikit-learn, and check that the FP32 model puts the cat photo in an ImageNet cat class;
2. `edgeopt build` for jetson-orin, rpi5 and x86-avx2, printing each report's summary;
3. start an MQTT broker (mosquitto when installed, otherwise an embedded amqtt broker);
4. start `edgeopt agent run` on the bundle for this machine, reporting to the broker;
5. classify the cat photo through the KServe v2 gRPC API with tritonclient, printing class and latency;
6. print the fleet monitor's view (`edgeopt fleet watch --once`).

    python examples/demo.py [--out out/demo] [--devices jetson-orin,rpi5,x86-avx2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

CAT_CLASSES = range(281, 286)  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def edgeopt(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeopt", *args], cwd=ROOT, check=True, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sanity_check_fp32(data_dir: Path) -> int:
    """Classify the cat photo with the FP32 PyTorch model; raise if it is not a cat class."""
    import torch

    from efficientnet_lite0 import efficientnet_lite0, imagenet_labels

    cat = np.load(data_dir / "chelsea.npy")
    with torch.no_grad():
        logits = efficientnet_lite0()(torch.from_numpy(cat))
    top1 = int(logits.argmax())
    print(f"FP32 PyTorch model: chelsea.png -> class {top1} ({imagenet_labels()[top1]})")
    if top1 not in CAT_CLASSES:
        raise SystemExit(f"sanity check failed: class {top1} is not an ImageNet cat class (281-285)")
    return top1


@contextlib.contextmanager
def mqtt_broker():
    """Yield the URL of a loopback MQTT broker: mosquitto if installed, else an embedded amqtt one."""
    port = free_port()
    mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if mosquitto:
        with tempfile.TemporaryDirectory() as scratch:
            config = Path(scratch) / "mosquitto.conf"
            config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
            process = subprocess.Popen([mosquitto, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(f"broker: mosquitto on 127.0.0.1:{port}")
            try:
                _wait_for_port(port)
                yield f"mqtt://127.0.0.1:{port}"
            finally:
                process.terminate()
                process.wait(10)
        return

    code = (
        "import asyncio, sys\n"
        "from amqtt.broker import Broker\n"
        "async def main():\n"
        f"    broker = Broker({{'listeners': {{'default': {{'type': 'tcp', 'bind': '127.0.0.1:{port}'}}}}, 'auth': {{'allow-anonymous': True}}}})\n"
        "    await broker.start()\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"broker: embedded amqtt on 127.0.0.1:{port} (mosquitto is not installed)")
    try:
        _wait_for_port(port)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def _wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise SystemExit(f"broker did not start listening on 127.0.0.1:{port}")


@contextlib.contextmanager
def running_agent(bundle: Path, broker: str, cache: Path):
    port = free_port()
    command = [
        sys.executable, "-m", "edgeopt", "agent", "run", "--bundle", str(bundle), "--listen", f"127.0.0.1:{port}",
        "--cache-dir", str(cache), "--broker", broker, "--fleet", "demo", "--device-id", "demo-host", "--metrics-interval", "2",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise SystemExit("the agent exited before listening")
            print(f"agent: {line.rstrip()}")
            if "listening on" in line:
                break
        yield f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def classify(address: str, model: str, data_dir: Path) -> None:
    import tritonclient.grpc as grpcclient

    from efficientnet_lite0 import imagenet_labels

    cat = np.load(data_dir / "chelsea.npy").astype(np.float32)
    client = grpcclient.InferenceServerClient(address)
    metadata = client.get_model_metadata(model)
    request = grpcclient.InferInput(metadata.inputs[0].name, list(cat.shape), "FP32")
    request.set_data_from_numpy(cat)

    latencies = []
    for _ in range(20):
        started = time.perf_counter()
        result = client.infer(model, [request])
        latencies.append((time.perf_counter() - started) * 1000)
    logits = result.as_numpy(metadata.outputs[0].name)
    top1 = int(logits.argmax())
    print(
        f"gRPC ModelInfer via tritonclient: chelsea.png -> class {top1} ({imagenet_labels()[top1]}); "
        f"round-trip p50 {np.percentile(latencies, 50):.2f} ms over 20 requests on this host (loopback, batch 1)"
    )


def keep_sending(address: str, model: str, data_dir: Path, stop: threading.Event) -> None:
    """Send the cat photo every 50 ms until ``stop`` is set, so the monitor receives live metrics."""
    import tritonclient.grpc as grpcclient

    cat = np.load(data_dir / "chelsea.npy").astype(np.float32)
    client = grpcclient.InferenceServerClient(address)
    request = grpcclient.InferInput(client.get_model_metadata(model).inputs[0].name, list(cat.shape), "FP32")
    request.set_data_from_numpy(cat)
    while not stop.is_set():
        client.infer(model, [request])
        stop.wait(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description="edgeopt demo")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument("--devices", default="jetson-orin,rpi5,x86-avx2")
    args = parser.parse_args()
    devices = [d for d in args.devices.split(",") if d]
    data_dir = args.out / "data"

    banner("1. Data from real photos")
    subprocess.run([sys.executable, str(ROOT / "examples" / "prepare_photos.py"), "--out", str(data_dir)], check=True)
    sanity_check_fp32(data_dir)

    banner("2. Build one bundle per device")
    bundles = {}
    for device in devices:
        bundle = args.out / f"efficientnet-lite0-{device}.tar"
        print(f"\n--- edgeopt build --device {device} ---", flush=True)
        edgeopt(
            "build", "--device", device, "--model", "examples/efficientnet_lite0.py:efficientnet_lite0",
            "--calib", str(data_dir / "calib.npy"), "--eval", str(data_dir / "eval.npy"), "--out", str(bundle), "--latency-runs", "20",
        )
        bundles[device] = bundle

    from edgeopt.devices.probe import match_profiles, probe_host

    local = [p.id for p in match_profiles(probe_host()) if p.id in bundles]
    serve_device = local[0] if local else "x86-avx2"
    if serve_device not in bundles:
        print(f"\nno bundle matches this machine ({', '.join(p.id for p in match_profiles(probe_host()))}); skipping serving")
        return

    banner(f"3-5. Serve the {serve_device} bundle over gRPC with MQTT telemetry")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with mqtt_broker() as broker, running_agent(bundles[serve_device], broker, args.out / "cache") as address:
        classify(address, "efficientnet-lite0", data_dir)

        banner("6. Fleet monitor (edgeopt fleet watch --once) while requests keep arriving")
        stop = threading.Event()
        sender = threading.Thread(target=keep_sending, args=(address, "efficientnet-lite0", data_dir, stop), daemon=True)
        sender.start()
        time.sleep(2.5)
        monitor_env = {**os.environ, "COLUMNS": "180"}
        subprocess.run(
            [sys.executable, "-m", "edgeopt", "fleet", "watch", "--broker", broker, "--fleet", "demo", "--once", "--no-history"],
            cwd=ROOT, env=monitor_env,
        )
        stop.set()
        sender.join(10)

    print(f"\nBundles and reports are in {args.out}.")


if __name__ == "__main__":
    main()
