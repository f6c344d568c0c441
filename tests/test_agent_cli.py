"""``edgeopt agent run`` and ``probe`` as a user runs them, including SIGTERM handling."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from click.testing import CliRunner

from agent_fixtures import classifier_reference, free_port, make_adder_bundle, make_classifier_bundle, make_slow_bundle, other_device, slow_reference, start_agent
from edgeopt.agent.dataplane import DataPlane, DataPlaneConfig
from edgeopt.agent.server import AgentServer, ListenError, ServerConfig, parse_listen
from edgeopt.cli import cli

REPO = Path(__file__).resolve().parents[1]


def test_probe_lists_runtimes():
    result = CliRunner().invoke(cli, ["agent", "probe"])
    assert result.exit_code == 0, result.output
    assert "CPUExecutionProvider" in result.output
    assert "litert: available" in result.output or "litert: not available: LiteRT is not installed" in result.output
    assert "profiles" in result.output


def test_probe_explains_bundle_choice(tmp_path):
    bundle = make_classifier_bundle(tmp_path, broken_first=True, tar=True)
    result = CliRunner().invoke(cli, ["agent", "probe", "--bundle", str(bundle), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "skipped  CPUExecutionProvider with model.broken.onnx: self-test output 'probs' differs" in result.output
    assert "would use  onnxruntime" in result.output
    assert "model.onnx (fp32)" in result.output


def test_run_without_bundle_is_input_error():
    result = CliRunner().invoke(cli, ["agent", "run"])
    assert result.exit_code == 2
    assert "--bundle" in result.output


def test_run_rejects_other_device(tmp_path):
    bundle = make_classifier_bundle(tmp_path, device=other_device())
    result = CliRunner().invoke(cli, ["agent", "run", "--bundle", str(bundle), "--listen", f"127.0.0.1:{free_port()}", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert f"built for {other_device()}" in result.output
    assert "--force" in result.output


def test_run_rejects_tampered_bundle(tmp_path):
    bundle = make_classifier_bundle(tmp_path)
    (bundle / "selftest/expected.npz").write_bytes(b"changed")
    result = CliRunner().invoke(cli, ["agent", "run", "--bundle", str(bundle), "--listen", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 2
    assert "selftest/expected.npz" in result.output


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("127.0.0.1", "the port is missing"),
        ("127.0.0.1:", "the port is missing"),
        ("127.0.0.1:abc", "port 'abc' is not a number"),
        ("127.0.0.1:70000", "port 70000 is above 65535"),
        ("127.0.0.1:-1", "port '-1' is not a number"),
        ("::1:8001", "put an IPv6 host in brackets"),
        ("[::1]", "an IPv6 host in brackets must be followed by :PORT"),
        (":8001", "the host is missing"),
    ],
)
def test_run_rejects_malformed_listen(tmp_path, value, reason):
    bundle = make_classifier_bundle(tmp_path)
    result = CliRunner().invoke(cli, ["agent", "run", "--bundle", str(bundle), "--listen", value, "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert result.output.count("Error:") == 1
    assert f"invalid --listen value {value!r}: {reason}" in result.output
    assert "expected HOST:PORT" in result.output
    assert "[::1]:8001" in result.output
    assert "choose a free" not in result.output


@pytest.mark.parametrize(("value", "host", "port"), [("127.0.0.1:0", "127.0.0.1", 0), ("[::1]:8001", "::1", 8001), ("localhost:65535", "localhost", 65535)])
def test_parse_listen_accepts_host_port(value, host, port):
    address = parse_listen(value)
    assert (address.host, address.port) == (host, port)
    assert str(address) == value


def test_run_port_in_use_is_one_error_line(tmp_path):
    bundle = make_classifier_bundle(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "edgeopt", "agent", "run", "--bundle", str(bundle), "--listen", f"127.0.0.1:{port}", "--cache-dir", str(tmp_path / "c")]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"Error: cannot listen on 127.0.0.1:{port}: address already in use; choose a free port with --listen"]


def test_server_start_rejects_port_in_use(tmp_path):
    """The library path checks too, without gRPC's own log line or wording."""
    dataplane = DataPlane(DataPlaneConfig(cache_dir=tmp_path / "c"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = AgentServer(dataplane, ServerConfig(listen=f"127.0.0.1:{port}"))
        with pytest.raises(ListenError) as info:
            server.start()
    assert str(info.value) == f"cannot listen on 127.0.0.1:{port}: address already in use; choose a free port with --listen"
    assert "GRPC_VERBOSITY" not in str(info.value)
    dataplane.close()


def test_run_help_explains_message_limit():
    result = CliRunner().invoke(cli, ["agent", "run", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "bounds both requests and responses" in text
    assert 'RESOURCE_EXHAUSTED "Received message larger than max"' in text


def test_agent_subprocess_serves_tritonclient(tmp_path):
    bundles = [make_classifier_bundle(tmp_path, tar=True), make_adder_bundle(tmp_path), make_classifier_bundle(tmp_path, name="forced", device=other_device())]
    args = [arg for b in bundles for arg in ("--bundle", str(b))]
    process, address, listening = start_agent(*args, "--force", cache=tmp_path / "cache")
    assert f"listening on {address} (max message 64 MiB, ready in" in listening
    try:
        with triton.InferenceServerClient(address) as client:
            x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
            tensor = triton.InferInput("x", [3, 4], "FP32")
            tensor.set_data_from_numpy(x)
            for model in ("tiny", "forced"):
                np.testing.assert_allclose(client.infer(model, [tensor]).as_numpy("probs"), classifier_reference(x), rtol=1e-5, atol=1e-6)
            assert client.is_model_ready("adder")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "loading anyway because of --force" in stderr


def test_sigterm_finishes_in_flight_request(tmp_path):
    bundle = make_slow_bundle(tmp_path)
    process, address, _ = start_agent("--bundle", str(bundle), "--grace", "20", cache=tmp_path / "cache")
    x = np.random.default_rng(1).normal(size=(8192, 256)).astype(np.float32)
    results = {}

    def send() -> None:
        with triton.InferenceServerClient(address) as client:
            tensor = triton.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            try:
                results["y"] = client.infer("slow", [tensor]).as_numpy("y")
            except Exception as exc:  # noqa: BLE001 - the assertion below reports it
                results["error"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    sender.join(60)
    _, stderr = process.communicate(timeout=60)

    assert "error" not in results, results.get("error")
    np.testing.assert_allclose(results["y"], slow_reference(x), rtol=1e-3, atol=1e-4)
    assert process.returncode == 0
    assert "received SIGTERM" in stderr
    assert stderr.index("received SIGTERM") < stderr.rindex("stopped")


def test_agent_imports_no_torch(tmp_path):
    bundle = make_classifier_bundle(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        import grpc
        from edgeopt.agent.cli import build_agent
        from edgeopt.agent.dataplane import DataPlaneConfig
        from edgeopt.agent.protos import inference_pb2, inference_pb2_grpc
        from edgeopt.agent.server import ServerConfig

        server, _ = build_agent([{str(bundle)!r}], DataPlaneConfig(cache_dir={str(tmp_path / 'c')!r}), ServerConfig(listen="127.0.0.1:{free_port()}"))
        request = inference_pb2.ModelInferRequest(model_name="tiny", raw_input_contents=[bytes(16)])
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        with grpc.insecure_channel(f"127.0.0.1:{{server.port}}") as channel:
            inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        server.stop(1).wait(10)
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum")))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_generated_protos_are_fresh():
    result = subprocess.run([sys.executable, "protos/generate.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
