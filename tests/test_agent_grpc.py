"""The agent's gRPC API through the real tritonclient and the generated stubs."""

from __future__ import annotations

import shutil
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from agent_fixtures import classifier_reference, free_port, make_adder_bundle, make_classifier_bundle
from edgeopt.agent.cli import build_agent
from edgeopt.agent.dataplane import DataPlaneConfig
from edgeopt.agent.protos import inference_pb2, inference_pb2_grpc
from edgeopt.agent.server import ServerConfig


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    repository = tmp_path_factory.mktemp("repository")
    bundles = [
        make_classifier_bundle(root, version="1", seed=0),
        make_classifier_bundle(root, version="2", seed=1, tar=True),
        make_adder_bundle(root),
    ]
    make_classifier_bundle(repository, name="spare", seed=2)
    config = DataPlaneConfig(cache_dir=root / "cache", max_concurrency=1, max_queue=2, repository=repository)
    server, dataplane = build_agent(bundles, config, ServerConfig(listen=f"127.0.0.1:{free_port()}", max_message_bytes=1024 * 1024))
    yield server, dataplane, repository
    server.stop(grace=1).wait(10)


@pytest.fixture
def client(agent):
    server = agent[0]
    with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
        yield client


@pytest.fixture
def stub(agent):
    with grpc.insecure_channel(f"127.0.0.1:{agent[0].port}") as channel:
        yield inference_pb2_grpc.GRPCInferenceServiceStub(channel), channel


def _classifier_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_server_health_with_tritonclient(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    metadata = client.get_server_metadata()
    assert metadata.name == "edgeopt"
    assert "model_repository" in metadata.extensions


def test_model_metadata_lists_signature(client):
    metadata = client.get_model_metadata("adder")
    assert metadata.name == "adder"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("a", "INT32", [-1, 2]), ("b", "INT32", [-1, 2])]
    assert [(t.name, t.datatype) for t in metadata.outputs] == [("sum", "INT32"), ("twice", "INT64")]
    assert "CPUExecutionProvider" in metadata.platform


def test_infer_raw_with_tritonclient(client):
    x = np.random.default_rng(3).normal(size=(7, 4)).astype(np.float32)
    result = client.infer("tiny", [_classifier_input(x)], model_version="1", request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("probs"), classifier_reference(x, seed=0), rtol=1e-5, atol=1e-6)
    assert result.get_response().id == "r-1"


def test_default_version_is_highest(client):
    x = np.ones((1, 4), dtype=np.float32)
    result = client.infer("tiny", [_classifier_input(x)])
    assert result.get_response().model_version == "2"
    np.testing.assert_allclose(result.as_numpy("probs"), classifier_reference(x, seed=1), rtol=1e-5, atol=1e-6)


def test_infer_two_inputs_with_tritonclient(client):
    a = np.array([[1, 2], [3, 4]], dtype=np.int32)
    b = np.array([[5, 6], [7, -8]], dtype=np.int32)
    inputs = [triton.InferInput("a", [2, 2], "INT32"), triton.InferInput("b", [2, 2], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("adder", inputs, outputs=[triton.InferRequestedOutput("twice")])
    np.testing.assert_array_equal(result.as_numpy("twice"), 2 * a.astype(np.int64))
    assert result.as_numpy("sum") is None


def test_infer_typed_contents(stub):
    stub, _ = stub
    request = inference_pb2.ModelInferRequest(model_name="adder")
    request.inputs.add(name="a", datatype="INT32", shape=[1, 2]).contents.int_contents.extend([1, -2])
    request.inputs.add(name="b", datatype="INT32", shape=[1, 2]).contents.int_contents.extend([10, 20])
    response = stub.ModelInfer(request)
    assert len(response.raw_output_contents) == 0
    by_name = {o.name: o for o in response.outputs}
    assert list(by_name["sum"].contents.int_contents) == [11, 18]
    assert list(by_name["twice"].contents.int64_contents) == [2, -4]
    assert list(by_name["twice"].shape) == [1, 2]


def test_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException) as info:
        client.infer("missing", [_classifier_input(np.ones((1, 4), dtype=np.float32))])
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "missing" in info.value.message()


def test_unknown_version_is_not_found(client):
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny", [_classifier_input(np.ones((1, 4), dtype=np.float32))], model_version="9")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "version" in info.value.message()


def test_wrong_shape_names_tensor_and_signature(client):
    x = np.ones((1, 5), dtype=np.float32)
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny", [_classifier_input(x)])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'x'" in info.value.message()
    assert "x: FP32[-1,4]" in info.value.message()


def test_wrong_datatype_names_tensor(client):
    tensor = triton.InferInput("x", [1, 4], "FP64")
    tensor.set_data_from_numpy(np.ones((1, 4), dtype=np.float64))
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny", [tensor])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "FP64" in info.value.message()
    assert "expected FP32" in info.value.message()


def test_byte_count_mismatch_is_invalid(stub):
    stub, _ = stub
    request = inference_pb2.ModelInferRequest(model_name="tiny", raw_input_contents=[b"\x00" * 15])
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "15 bytes" in info.value.details()
    assert "needs 16 bytes" in info.value.details()


def test_missing_and_extra_inputs_are_invalid(stub):
    stub, _ = stub
    request = inference_pb2.ModelInferRequest(model_name="adder", raw_input_contents=[b"\x00" * 8])
    request.inputs.add(name="a", datatype="INT32", shape=[1, 2])
    with pytest.raises(grpc.RpcError) as missing:
        stub.ModelInfer(request)
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'b' is missing (the request sent 'a')" in missing.value.details()

    request.inputs.add(name="b", datatype="INT32", shape=[1, 2])
    request.inputs.add(name="c", datatype="INT32", shape=[1, 2])
    request.raw_input_contents.extend([b"\x00" * 8, b"\x00" * 8])
    with pytest.raises(grpc.RpcError) as extra:
        stub.ModelInfer(request)
    assert extra.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'c' is not an input" in extra.value.details()


def test_wrong_input_name_names_sent_input(client):
    tensor = triton.InferInput("images", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny", [tensor])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x' is missing" in info.value.message()
    assert "input 'images' is not an input of this model" in info.value.message()
    assert "expected inputs x: FP32[-1,4]" in info.value.message()


def test_missing_input_lists_sent_inputs(stub):
    stub, _ = stub
    request = inference_pb2.ModelInferRequest(model_name="adder")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert "inputs 'a', 'b' are missing (the request sent no inputs)" in info.value.details()


def test_response_size_limit(client):
    # 50000 rows: the request is 800 kB, the response 1.2 MB, and the server's limit 1 MiB.
    tensors = []
    for name in ("a", "b"):
        tensor = triton.InferInput(name, [50_000, 2], "INT32")
        tensor.set_data_from_numpy(np.ones((50_000, 2), dtype=np.int32))
        tensors.append(tensor)
    with pytest.raises(InferenceServerException) as info:
        client.infer("adder", tensors)
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "Sent message larger than max" in info.value.message()


def test_message_size_limit(client):
    x = np.ones((100_000, 4), dtype=np.float32)  # 1.6 MB, above the 1 MiB limit of this server
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny", [_classifier_input(x)])
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "Received message larger than max" in info.value.message()


def test_full_queue_is_resource_exhausted(agent, client):
    _, dataplane, _ = agent
    model = dataplane.get("tiny", "1")
    x = np.ones((1, 4), dtype=np.float32)
    release = threading.Event()
    holding = []

    def hold() -> None:
        with model.queue.admit(model.name, dataplane.stats):
            holding.append(True)
            release.wait(10)

    # Occupy every place of the queue (1 run + 2 waiting), as three slow requests would.
    threads = [threading.Thread(target=hold) for _ in range(model.queue.capacity)]
    for thread in threads:
        thread.start()
    try:
        while model.queue.depth < model.queue.capacity:
            threading.Event().wait(0.01)
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [_classifier_input(x)], model_version="1")
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert dataplane.stats.snapshot(reset=False)["models"]["tiny"]["queue_depth"] == model.queue.capacity
    finally:
        release.set()
        for thread in threads:
            thread.join()

    result = client.infer("tiny", [_classifier_input(x)], model_version="1")
    np.testing.assert_allclose(result.as_numpy("probs"), classifier_reference(x), rtol=1e-5, atol=1e-6)


def test_repository_unload_and_load(client):
    client.unload_model("adder")
    assert client.is_model_ready("adder") is False
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"] if "version" not in m}
    assert index["adder"]["state"] == "UNAVAILABLE"

    client.load_model("adder")
    assert client.is_model_ready("adder")


def test_repository_loads_bundle_from_directory(agent, client):
    index = {m["name"]: m.get("state") for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["spare"] == "UNAVAILABLE"

    client.load_model("spare")
    assert client.is_model_ready("spare")
    x = np.ones((2, 4), dtype=np.float32)
    np.testing.assert_allclose(client.infer("spare", [_classifier_input(x)]).as_numpy("probs"), classifier_reference(x, seed=2), rtol=1e-5, atol=1e-6)
    client.unload_model("spare")


def test_repository_load_rejects_tampered_bundle(agent, client):
    _, _, repository = agent
    bundle = make_classifier_bundle(repository, name="tampered", seed=4)
    (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes() + b"\x00")
    with pytest.raises(InferenceServerException) as info:
        client.load_model("tampered")
    assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert "model.onnx" in info.value.message()
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert "model.onnx" in index["tampered"]["reason"]
    shutil.rmtree(bundle)


def test_repository_load_unknown_is_not_found(client):
    with pytest.raises(InferenceServerException) as info:
        client.load_model("nothing-here")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_health_service(stub):
    _, channel = stub
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    status = health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_services(stub):
    _, channel = stub
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
    ]
    listed, described = list(reflection.ServerReflectionInfo(iter(requests)))
    names = {s.name for s in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert len(described.file_descriptor_response.file_descriptor_proto) == 1


def test_metrics_record_requests(agent, client):
    _, dataplane, _ = agent
    dataplane.stats.snapshot(reset=True)
    x = np.ones((1, 4), dtype=np.float32)
    for _ in range(5):
        client.infer("tiny", [_classifier_input(x)], model_version="1")
    with pytest.raises(InferenceServerException):
        client.infer("tiny", [_classifier_input(np.ones((1, 3), dtype=np.float32))], model_version="1")

    snapshot = dataplane.stats.snapshot(reset=True)
    tiny = snapshot["models"]["tiny"]
    assert tiny["requests"] == 6
    assert tiny["errors"] == 1
    assert tiny["latency_ms"]["p50"] > 0
    assert any(m["name"] == "tiny" and "CPUExecutionProvider" in m["runtime"] for m in dataplane.models())
