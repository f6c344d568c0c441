"""EfficientNet-Lite0 with its ImageNet weights, built end to end on real photos."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT
from edgeopt.agent.bundle import open_bundle
from edgeopt.cli import cli

pytestmark = pytest.mark.slow

CAT_CLASSES = range(281, 286)


@pytest.fixture(scope="module")
def photo_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    subprocess.run([sys.executable, str(ROOT / "examples" / "prepare_photos.py"), "--out", str(folder), "--crops", "12", "--eval-crops", "24"], check=True, capture_output=True)
    return folder


@pytest.fixture(scope="module")
def fp32_cat_class(photo_data):
    import torch

    from efficientnet_lite0 import efficientnet_lite0

    with torch.no_grad():
        logits = efficientnet_lite0()(torch.from_numpy(np.load(photo_data / "chelsea.npy")))
    return int(logits.argmax())


def test_fp32_model_sees_a_cat(fp32_cat_class):
    assert fp32_cat_class in CAT_CLASSES


def test_lite0_build_for_x86_avx2(tmp_path, photo_data, fp32_cat_class):
    import onnxruntime as ort

    out = tmp_path / "lite0.tar"
    result = CliRunner().invoke(
        cli,
        [
            "build", "--device", "x86-avx2", "--model", f"{ROOT / 'examples' / 'efficientnet_lite0.py'}:efficientnet_lite0",
            "--calib", str(photo_data / "calib.npy"), "--eval", str(photo_data / "eval.npy"), "--out", str(out), "--latency-runs", "10",
        ],
    )
    assert result.exit_code == 0, result.output

    directory, manifest = open_bundle(out, tmp_path / "extracted")
    metrics = manifest.raw["metrics"]
    winner = metrics["winner"]
    assert metrics["candidates"][winner]["gate_passed"]
    assert {"fp32", "int8-u8s8-rr", "int8-u8s8-rr-percentile"} <= set(metrics["candidates"])
    int8_failed = [c for c, entry in metrics["candidates"].items() if entry["precision"] == "int8" and not entry["gate_passed"]]
    if manifest.artifacts[0].precision != "int8" and int8_failed:
        assert "FALLBACK" in result.output
        assert "FALLBACK" in (directory / "report.md").read_text()

    labels = (directory / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000
    assert manifest.raw["preprocess"]["mean"] == [127.0, 127.0, 127.0]

    session = ort.InferenceSession(str(directory / manifest.artifacts[0].path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.load(photo_data / "chelsea.npy")})[0]
    assert int(logits.argmax()) == fp32_cat_class
