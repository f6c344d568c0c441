"""Agent events after startup: data-plane listeners and their MQTT events and status refresh.

The first part drives a real DataPlane with small bundles and a recording listener. The
second serves the data plane over gRPC, reports to a real mosquitto broker, and drives
RepositoryModelLoad and RepositoryModelUnload with tritonclient.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from agent_fixtures import free_port, host_device, make_classifier_bundle
from edgeopt.agent.bundle import sha256_file, write_manifest
from edgeopt.agent.dataplane import DataPlane, DataPlaneConfig, DataPlaneListener, ErrorRateLimiter
from edgeopt.agent.errors import InferenceError, InvalidInputError, LoadError
from edgeopt.agent.protos import inference_pb2
from edgeopt.agent.server import AgentServer, ServerConfig
from edgeopt.agent.telemetry import TelemetryConfig, start_agent_telemetry
from edgeopt.mqtt import BrokerURL
from mqtt_broker import MessageCollector, mqtt_broker  # noqa: F401


class RecordingListener(DataPlaneListener):
    """Store every call as (method, model name or path, extra)."""

    def __init__(self):
        self.calls: list[tuple[str, str, object]] = []

    def on_loaded(self, model):
        self.calls.append(("loaded", model.name, model.version))

    def on_unloaded(self, model, reason):
        self.calls.append(("unloaded", model.name, reason))

    def on_load_failed(self, path, error):
        self.calls.append(("load_failed", str(path), str(error)))

    def on_runtime_fallback(self, model, skipped):
        self.calls.append(("fallback", model.name, [attempt.artifact for attempt in skipped]))

    def on_inference_error(self, model, error, suppressed):
        self.calls.append(("inference_error", model.name, suppressed))


def tamper(bundle: Path) -> None:
    """Flip one byte of the model file, keeping its size, so only the sha256 check catches it."""
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))


def make_fixed_batch_bundle(root: Path, name: str = "fixedbatch") -> Path:
    """Write a bundle whose manifest accepts any batch but whose graph reshapes to batch 1.

    The self-test (batch 1) passes; a batch of 2 passes request validation and then fails
    inside ONNX Runtime, a model fault rather than a client mistake.
    """
    bundle_dir = root / f"{name}-v1"
    (bundle_dir / "selftest").mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, bundle_dir / "model.onnx")

    x = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    np.savez(bundle_dir / "selftest/inputs.npz", x=x)
    np.savez(bundle_dir / "selftest/expected.npz", y=x)
    model_file = bundle_dir / "model.onnx"
    write_manifest(
        bundle_dir,
        {
            "name": name,
            "version": "1",
            "device": host_device(),
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
            "artifacts": [
                {
                    "path": "model.onnx",
                    "format": "onnx",
                    "precision": "fp32",
                    "runtimes": ["CPUExecutionProvider"],
                    "sha256": sha256_file(model_file),
                    "size": model_file.stat().st_size,
                }
            ],
            "selftest": {"inputs": "selftest/inputs.npz", "expected": "selftest/expected.npz", "atol": 0, "rtol": 0},
        },
    )
    return bundle_dir


def infer_request(model: str, x: np.ndarray) -> inference_pb2.ModelInferRequest:
    request = inference_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


def small_config(tmp_path: Path, **options) -> DataPlaneConfig:
    return DataPlaneConfig(cache_dir=tmp_path / "cache", max_concurrency=1, intra_op_threads=1, **options)


# --- Data-plane listeners -------------------------------------------------------------------------------


def test_listener_hears_load_fallback_unload(tmp_path):
    listener = RecordingListener()
    dataplane = DataPlane(small_config(tmp_path), listeners=[listener])
    try:
        dataplane.load(make_classifier_bundle(tmp_path / "bundles", broken_first=True))
        dataplane.unload("tiny")
    finally:
        dataplane.close()

    assert listener.calls[0][:2] == ("fallback", "tiny")
    assert "model.broken.onnx" in listener.calls[0][2]
    assert listener.calls[1] == ("loaded", "tiny", "1")
    assert listener.calls[2] == ("unloaded", "tiny", "unloaded")
    assert len(listener.calls) == 3


def test_listener_hears_replace_and_shutdown(tmp_path):
    listener = RecordingListener()
    dataplane = DataPlane(small_config(tmp_path), listeners=[listener])
    bundle = make_classifier_bundle(tmp_path / "bundles")
    dataplane.load(bundle)
    dataplane.load(bundle)
    dataplane.close()

    events = [call for call in listener.calls if call[0] != "fallback"]
    assert events == [
        ("loaded", "tiny", "1"),
        ("loaded", "tiny", "1"),
        ("unloaded", "tiny", "replaced"),
        ("unloaded", "tiny", "shutdown"),
    ]


def test_listener_hears_tampered_bundle(tmp_path):
    listener = RecordingListener()
    dataplane = DataPlane(small_config(tmp_path), listeners=[listener])
    bundle = make_classifier_bundle(tmp_path / "bundles")
    tamper(bundle)
    try:
        with pytest.raises(LoadError, match="model.onnx"):
            dataplane.load(bundle)
    finally:
        dataplane.close()

    assert len(listener.calls) == 1
    method, path, message = listener.calls[0]
    assert method == "load_failed"
    assert path == str(bundle)
    assert "bundle file model.onnx does not match its sha256" in message


def test_inference_errors_rate_limited(tmp_path):
    listener = RecordingListener()
    dataplane = DataPlane(small_config(tmp_path, error_report_interval_s=0.5), listeners=[listener])
    dataplane.load(make_fixed_batch_bundle(tmp_path / "bundles"))
    batch_of_two = np.ones((2, 4), dtype=np.float32)
    try:
        for _ in range(4):
            with pytest.raises(InferenceError, match="fixedbatch"):
                dataplane.infer(infer_request("fixedbatch", batch_of_two))
        time.sleep(0.6)
        with pytest.raises(InferenceError):
            dataplane.infer(infer_request("fixedbatch", batch_of_two))
        # A client mistake is not an agent error.
        with pytest.raises(InvalidInputError):
            dataplane.infer(infer_request("fixedbatch", np.ones((1, 3), dtype=np.float32)))
        response = dataplane.infer(infer_request("fixedbatch", np.ones((1, 4), dtype=np.float32)))
    finally:
        dataplane.close()

    errors = [call for call in listener.calls if call[0] == "inference_error"]
    assert errors == [("inference_error", "fixedbatch", 0), ("inference_error", "fixedbatch", 3)]
    assert response.model_name == "fixedbatch"


def test_rate_limiter_counts_held_back():
    now = [100.0]
    limiter = ErrorRateLimiter(10.0, clock=lambda: now[0])

    assert limiter.admit("a") == 0
    assert limiter.admit("a") is None
    assert limiter.admit("b") == 0
    now[0] += 5
    assert limiter.admit("a") is None
    now[0] += 5
    assert limiter.admit("a") == 2
    limiter.forget("a")
    assert limiter.admit("a") == 0


def test_add_listener_replays_loaded_models(tmp_path):
    dataplane = DataPlane(small_config(tmp_path))
    dataplane.load(make_classifier_bundle(tmp_path / "bundles"))
    late = RecordingListener()
    try:
        dataplane.add_listener(late, replay=True)
        assert [call for call in late.calls if call[0] == "loaded"] == [("loaded", "tiny", "1")]
        dataplane.remove_listener(late)
        dataplane.unload("tiny")
    finally:
        dataplane.close()

    assert not any(call[0] == "unloaded" for call in late.calls)


def test_failing_listener_does_not_break_load(tmp_path):
    class Broken(DataPlaneListener):
        def on_loaded(self, model):
            raise RuntimeError("listener bug")

    recorder = RecordingListener()
    dataplane = DataPlane(small_config(tmp_path), listeners=[Broken(), recorder])
    try:
        model = dataplane.load(make_classifier_bundle(tmp_path / "bundles"))
        assert dataplane.model_ready("tiny")
    finally:
        dataplane.close()

    assert model.name == "tiny"
    assert ("loaded", "tiny", "1") in recorder.calls


# --- Events and status over MQTT ------------------------------------------------------------------------


def is_topic(device_id: str, kind: str):
    return lambda topic, payload: topic == f"edgeopt/v1/events/{device_id}/{kind}"


def is_event(device_id: str, event: str, model: str | None = None):
    def match(topic, payload):
        return is_topic(device_id, "events")(topic, payload) and payload["event"] == event and (model is None or payload["model"] == model)

    return match


def retained_status(port: int, device_id: str) -> dict:
    """Subscribe afresh and return the retained status message."""
    late = MessageCollector(port, f"edgeopt/v1/events/{device_id}/status")
    try:
        return late.wait_for(lambda topic, payload: True)[0]
    finally:
        late.close()


def wait_for_retained(port: int, device_id: str, predicate, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = retained_status(port, device_id)
        if predicate(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_repository_events_over_mqtt(mqtt_broker, tmp_path):
    repository = tmp_path / "repository"
    tampered = make_classifier_bundle(repository, name="tampered")
    tamper(tampered)
    make_classifier_bundle(repository, name="spare", seed=2, broken_first=True)
    make_fixed_batch_bundle(repository)

    dataplane = DataPlane(small_config(tmp_path, repository=repository, error_report_interval_s=60.0))
    dataplane.load(make_classifier_bundle(tmp_path / "bundles"))
    server = AgentServer(dataplane, ServerConfig(listen=f"127.0.0.1:{free_port()}", grace_s=1))
    server.start()
    collector = MessageCollector(mqtt_broker.port, "edgeopt/v1/events/dev-events/#")
    config = TelemetryConfig(
        broker=BrokerURL("127.0.0.1", mqtt_broker.port), fleet="events", device_id="dev-events", metrics_interval_s=0.5, power_sample_s=0.25
    )
    reporter = start_agent_telemetry(config, dataplane)
    try:
        startup = collector.wait_for(is_event("dev-events", "model_loaded", "tiny"))[0]
        assert [m["name"] for m in wait_for_retained(mqtt_broker.port, "dev-events", lambda s: s["models"])["models"]] == ["tiny"]

        with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
            with pytest.raises(InferenceServerException) as info:
                client.load_model("tampered")
            error = collector.wait_for(is_event("dev-events", "error"))[0]

            client.load_model("spare")
            fallback = collector.wait_for(is_event("dev-events", "runtime_fallback", "spare"))[0]
            loaded = collector.wait_for(is_event("dev-events", "model_loaded", "spare"))[0]
            with_spare = wait_for_retained(mqtt_broker.port, "dev-events", lambda s: len(s["models"]) == 2)

            client.unload_model("spare")
            unloaded = collector.wait_for(is_event("dev-events", "model_unloaded", "spare"))[0]
            without_spare = wait_for_retained(mqtt_broker.port, "dev-events", lambda s: len(s["models"]) == 1)

            client.load_model("fixedbatch")
            failing = triton.InferInput("x", [2, 4], "FP32")
            failing.set_data_from_numpy(np.ones((2, 4), dtype=np.float32))
            for _ in range(3):
                with pytest.raises(InferenceServerException):
                    client.infer("fixedbatch", [failing])
            inference_error = collector.wait_for(is_event("dev-events", "error", "fixedbatch"))[0]
            time.sleep(1.0)
            inference_errors = collector.matching(is_event("dev-events", "error", "fixedbatch"))
    finally:
        reporter.stop()
        server.stop(grace=1).wait(10)
        collector.close()

    assert startup["details"]["runtime"].startswith("onnxruntime")

    assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert error["model"] is None
    assert "bundle file model.onnx does not match its sha256" in error["message"]
    assert error["details"]["phase"] == "load"
    assert error["details"]["path"] == str(tampered)

    assert any("model.broken.onnx" in line for line in fallback["details"]["skipped"])
    assert loaded["details"]["artifact"] == "model.onnx"
    assert fallback["seq"] < loaded["seq"]
    assert sorted(m["name"] for m in with_spare["models"]) == ["spare", "tiny"]
    assert with_spare["state"] == "online"

    assert unloaded["details"]["reason"] == "unloaded"
    assert [m["name"] for m in without_spare["models"]] == ["tiny"]

    assert inference_error["details"]["phase"] == "inference"
    assert "fixedbatch" in inference_error["message"]
    assert len(inference_errors) == 1
