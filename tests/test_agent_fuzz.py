"""Property-based test: malformed inference requests get a clear status, never a crash."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_fixtures import classifier_reference, free_port, make_adder_bundle, make_classifier_bundle
from edgeopt.agent.cli import build_agent
from edgeopt.agent.dataplane import DataPlaneConfig
from edgeopt.agent.protos import inference_pb2, inference_pb2_grpc
from edgeopt.agent.server import ServerConfig

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "BF16", "", "fp32", "FLOAT"]


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    bundles = [make_classifier_bundle(root), make_adder_bundle(root)]
    server, _ = build_agent(bundles, DataPlaneConfig(cache_dir=root / "cache"), ServerConfig(listen=f"127.0.0.1:{free_port()}"))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield inference_pb2_grpc.GRPCInferenceServiceStub(channel), channel
    channel.close()
    server.stop(grace=1).wait(10)


def _valid_classifier(batch: int) -> inference_pb2.ModelInferRequest:
    x = np.linspace(-1, 1, batch * 4, dtype=np.float32).reshape(batch, 4)
    request = inference_pb2.ModelInferRequest(model_name="tiny", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=[batch, 4])
    return request


def _valid_adder() -> inference_pb2.ModelInferRequest:
    request = inference_pb2.ModelInferRequest(model_name="adder")
    request.inputs.add(name="a", datatype="INT32", shape=[1, 2]).contents.int_contents.extend([1, 2])
    request.inputs.add(name="b", datatype="INT32", shape=[1, 2]).contents.int_contents.extend([3, 4])
    return request


@st.composite
def malformed_requests(draw):
    """Draw a request that breaks exactly one rule; return it with the status and a word of the message."""
    kind = draw(
        st.sampled_from(
            [
                "model", "version", "datatype", "rank", "dim", "bytes", "missing", "extra", "duplicate",
                "raw_count", "typed_field", "typed_count", "mixed", "output", "int_range", "bool_raw",
            ]
        )
    )
    batch = draw(st.integers(1, 4))
    request = _valid_classifier(batch)
    tensor = request.inputs[0]
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    if kind == "model":
        request.model_name = draw(st.text(max_size=20).filter(lambda s: s not in ("tiny", "adder")))
        return request, grpc.StatusCode.NOT_FOUND, "model"
    if kind == "version":
        request.model_version = draw(st.text(min_size=1, max_size=8).filter(lambda s: s != "1"))
        return request, grpc.StatusCode.NOT_FOUND, "version"
    if kind == "datatype":
        tensor.datatype = draw(st.sampled_from(DATATYPES).filter(lambda d: d != "FP32") | st.text(max_size=8).filter(lambda d: d != "FP32"))
        return request, invalid, "'x'"
    if kind == "rank":
        del tensor.shape[:]
        tensor.shape.extend(draw(st.lists(st.integers(1, 8), max_size=5).filter(lambda s: len(s) != 2)))
        return request, invalid, "'x'"
    if kind == "dim":
        bad = draw(st.one_of(st.integers(-(2**63), 0), st.integers(5, 2**40), st.integers(1, 3)))
        position = 0 if bad <= 0 else 1
        tensor.shape[position] = bad
        return request, invalid, "'x'"
    if kind == "bytes":
        delta = draw(st.integers(-16 * batch, 64).filter(lambda d: d != 0))
        data = request.raw_input_contents[0]
        request.raw_input_contents[0] = data[:delta] if delta < 0 else data + bytes(delta)
        return request, invalid, "'x'"
    if kind == "missing":
        del request.inputs[:]
        del request.raw_input_contents[:]
        return request, invalid, "'x' is missing"
    if kind == "extra":
        name = draw(st.text(min_size=1, max_size=10).filter(lambda n: n != "x"))
        request.inputs.add(name=name, datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(bytes(16))
        return request, invalid, "not an input"
    if kind == "duplicate":
        request.inputs.add().CopyFrom(tensor)
        request.raw_input_contents.append(request.raw_input_contents[0])
        return request, invalid, "more than once"
    if kind == "raw_count":
        request.raw_input_contents.extend([b""] * draw(st.integers(1, 3)))
        return request, invalid, "raw_input_contents"
    if kind == "typed_field":
        del request.raw_input_contents[:]
        field = draw(st.sampled_from(["int_contents", "int64_contents", "uint_contents", "fp64_contents", "bool_contents"]))
        values = [True] * (4 * batch) if field == "bool_contents" else [1] * (4 * batch)
        getattr(tensor.contents, field).extend(values)
        return request, invalid, "fp32_contents"
    if kind == "typed_count":
        del request.raw_input_contents[:]
        count = draw(st.integers(0, 40).filter(lambda n: n != 4 * batch))
        tensor.contents.fp32_contents.extend([0.5] * count)
        return request, invalid, "'x'"
    if kind == "mixed":
        tensor.contents.fp32_contents.extend([0.5] * (4 * batch))
        return request, invalid, "'x'"
    if kind == "output":
        request.outputs.add(name=draw(st.text(max_size=10).filter(lambda n: n != "probs")))
        return request, invalid, "output"
    if kind == "int_range":
        request = _valid_adder()
        del request.inputs[1].contents.int_contents[:]
        request.inputs[1].contents.int_contents.extend([0, draw(st.integers(-(2**31), 2**31 - 1))])
        request.inputs[1].datatype = "INT8"
        return request, invalid, "'b'"
    # bool_raw: a BOOL tensor where the model expects INT32
    request = _valid_adder()
    del request.inputs[0].contents.int_contents[:]
    request.inputs[0].datatype = "BOOL"
    request.inputs[0].contents.bool_contents.extend([True, False])
    return request, invalid, "'a'"


def test_malformed_requests_then_valid_answer(stub):
    client, _ = stub
    sent = []

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=malformed_requests())
    def send_malformed(case):
        request, status, fragment = case
        sent.append(request)
        with pytest.raises(grpc.RpcError) as info:
            client.ModelInfer(request, timeout=10)
        assert info.value.code() == status, info.value.details()
        assert fragment in info.value.details()

    send_malformed()
    assert len(sent) >= 1000

    response = client.ModelInfer(_valid_classifier(3), timeout=10)
    probs = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(3, 3)
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(probs, classifier_reference(x), rtol=1e-5, atol=1e-6)

    adder = client.ModelInfer(_valid_adder(), timeout=10)
    assert list(adder.outputs[0].contents.int_contents) == [4, 6]


def test_garbage_bytes_do_not_stop_server(stub):
    _, channel = stub
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    for payload in (b"\xff" * 7, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256))):
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=10)
        assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
