"""ServerStats histograms and the tensor codecs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgeopt.agent import codecs
from edgeopt.agent.errors import InvalidInputError
from edgeopt.agent.metrics import ServerStats
from edgeopt.agent.protos import inference_pb2


def test_stats_percentiles_within_bucket_error():
    stats = ServerStats()
    for latency in range(1, 101):
        stats.record("m", "3", float(latency), ok=latency != 50)
    snapshot = stats.snapshot()
    model = snapshot["models"]["m"]
    assert model["version"] == "3"
    assert model["requests"] == 100
    assert model["errors"] == 1
    assert model["latency_ms"]["p50"] == pytest.approx(50, rel=0.06)
    assert model["latency_ms"]["p90"] == pytest.approx(90, rel=0.06)
    assert model["latency_ms"]["p99"] == pytest.approx(99, rel=0.06)
    assert model["rps"] == pytest.approx(100 / snapshot["interval_s"])


def test_stats_reset_starts_new_interval():
    stats = ServerStats()
    stats.record("m", "1", 2.0, ok=True)
    stats.set_queue_depth("m", 3)
    stats.snapshot(reset=True)
    after = stats.snapshot(reset=False)["models"]["m"]
    assert after["requests"] == 0
    assert after["latency_ms"]["p99"] == 0.0
    assert after["queue_depth"] == 3


def test_stats_thread_safe_counts():
    stats = ServerStats()

    def worker() -> None:
        for _ in range(1000):
            stats.record("m", "1", 1.5, ok=True)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stats.snapshot()["models"]["m"]["requests"] == 8000


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.uint32, np.bool_])
def test_codec_round_trip(raw, dtype):
    array = (np.arange(12).reshape(3, 4) % 5).astype(dtype)
    response = inference_pb2.ModelInferResponse()
    codecs.encode_outputs(response, {"t": array}, raw=raw)
    tensor = response.outputs[0]
    shape = tuple(tensor.shape)
    if raw:
        decoded = codecs.decode_raw("t", tensor.datatype, shape, response.raw_output_contents[0])
    else:
        decoded = codecs.decode_typed("t", tensor.datatype, shape, tensor.contents)
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_codec_bytes_round_trip():
    array = np.array([b"cat", b"", "d\u00f6g"], dtype=object)
    response = inference_pb2.ModelInferResponse()
    codecs.encode_outputs(response, {"t": array}, raw=True)
    decoded = codecs.decode_raw("t", "BYTES", (3,), response.raw_output_contents[0])
    assert decoded.tolist() == [b"cat", b"", "d\u00f6g".encode()]


def test_codec_fp16_falls_back_to_raw():
    response = inference_pb2.ModelInferResponse()
    codecs.encode_outputs(response, {"h": np.ones(2, np.float16), "f": np.ones(2, np.float32)}, raw=False)
    assert len(response.raw_output_contents) == 2


def test_codec_rejects_out_of_range_int8():
    contents = inference_pb2.InferTensorContents(int_contents=[1, 300])
    with pytest.raises(InvalidInputError, match="outside the INT8 range"):
        codecs.decode_typed("t", "INT8", (2,), contents)


def test_codec_rejects_truncated_bytes_element():
    with pytest.raises(InvalidInputError, match="declares 10 bytes"):
        codecs.decode_raw("t", "BYTES", (1,), b"\x0a\x00\x00\x00abc")
