"""End to end: build EfficientNet-Lite0 for rpi5 and serve its LiteRT artifact over gRPC.

The build converts the pretrained model with litert-torch, gates every candidate on real
photos and packs the bundle. The agent then runs as a user starts it, with ``--force``
because this host is not a Raspberry Pi, and Triton's gRPC client sends it photos.
"""

from __future__ import annotations

import json
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("litert_torch", reason="the tflite-build extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")

import tritonclient.grpc as triton  # noqa: E402

from agent_fixtures import start_agent  # noqa: E402
from edgeopt.builder.pipeline import BuildOptions, build  # noqa: E402
from test_litert import efficientnet_lite0, photo_data, torch_logits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rpi5_litert_bundle_served(tmp_path):
    data = photo_data(calibration_crops=4, evaluation_crops=6)
    np.save(tmp_path / "calib.npy", data["calib"])
    np.save(tmp_path / "eval.npy", data["eval"])
    options = BuildOptions(
        device="rpi5",
        model=str(REPO / "examples/efficientnet_lite0.py") + ":efficientnet_lite0",
        calib=tmp_path / "calib.npy",
        evaluation=tmp_path / "eval.npy",
        out=tmp_path / "lite0-rpi5.tar",
        latency_runs=5,
    )

    result = build(options)

    winner = result.context.winner
    assert winner.format == "tflite", f"the winner is {winner.id}; the LiteRT path needs a tflite winner"
    with tarfile.open(result.bundle_path) as tar:
        manifest = json.load(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("manifest.json"))))
    formats = [a["format"] for a in manifest["artifacts"]]
    assert formats[0] == "tflite"
    assert "onnx" in formats
    assert manifest["artifacts"][0]["runtimes"] == ["litert"]
    assert manifest["runtimes"][0] == {
        "kind": "litert", "provider": None, "options": {"num_threads": 4}, "precisions": ["int8", "fp32"], "formats": ["tflite"],
        "note": "LiteRT interpreter with the XNNPACK delegate",
    }
    report = result.report_path.read_text(encoding="utf-8")
    assert f"`{manifest['artifacts'][0]['path']}`: tflite" in report
    assert "validated on this host with LiteRT (ai-edge-litert" in report

    photos = np.concatenate([data["chelsea"], data["eval"][::3]])
    expected_top1 = torch_logits(efficientnet_lite0(), photos).argmax(axis=1)

    process, address, stdout = start_agent("--bundle", str(result.bundle_path), "--force", cache=tmp_path / "cache", timeout_s=120)
    try:
        assert "on LiteRT (ai-edge-litert" in stdout
        assert f"({manifest['artifacts'][0]['path']}, {winner.precision})" in stdout

        client = triton.InferenceServerClient(address)
        served_top1 = []
        for photo in photos:
            tensor = triton.InferInput("input", [1, 3, 224, 224], "FP32")
            tensor.set_data_from_numpy(photo[None])
            response = client.infer(manifest["name"], [tensor])
            served_top1.append(int(response.as_numpy("logits").argmax()))
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)

    assert served_top1 == expected_top1.tolist()
    assert served_top1[0] == expected_top1[0]
    assert "selected LiteRT (ai-edge-litert" in stderr
    assert process.returncode == 0
