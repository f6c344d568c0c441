"""`edgeopt build` end to end on a small CNN trained on scikit-learn's digits."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TINY_SPEC
from edgeopt.agent.bundle import open_bundle
from edgeopt.builder.evaluate import Fidelity, Gate, compare_outputs
from edgeopt.cli import cli


def _build(tmp_path: Path, digits_data, *extra: str, device: str = "x86-avx2", out: Path | None = None):
    out = out or tmp_path / "out" / "tiny.tar"
    args = ["build", "--device", device, "--model", TINY_SPEC, "--calib", str(digits_data["calib"]), "--eval", str(digits_data["eval"]), "--out", str(out), "--latency-runs", "5", *extra]
    return CliRunner().invoke(cli, args), out


@pytest.fixture(scope="module")
def built(tmp_path_factory, digits_data):
    tmp_path = tmp_path_factory.mktemp("build")
    result, out = _build(tmp_path, digits_data)
    assert result.exit_code == 0, result.output
    return result, out


def test_build_writes_bundle_and_report(built):
    result, out = built
    assert out.is_file()
    assert out.with_name("tiny.report.md").is_file()
    assert "x86-avx2: shipped" in result.output


def test_bundle_manifest_contents(built, tmp_path):
    _, out = built
    directory, manifest = open_bundle(out, tmp_path)
    raw = manifest.raw
    assert raw["device"] == "x86-avx2"
    assert raw["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert raw["outputs"][0]["shape"] == [-1, 10]
    assert raw["labels"] == "labels.txt"
    assert (directory / "labels.txt").read_text().split() == [str(d) for d in range(10)]
    assert raw["selftest"]["check_top1"] is True
    assert set(raw["metrics"]["candidates"]) >= {"fp32", "int8-u8s8-rr", "int8-u8s8-rr-percentile"}
    winner = raw["metrics"]["winner"]
    assert raw["metrics"]["candidates"][winner]["gate_passed"] is True
    assert raw["artifacts"][0]["candidate"] == winner
    assert "CPUExecutionProvider" in raw["artifacts"][0]["runtimes"]
    assert raw["recipe"]["evaluation"]["samples"] == 300
    assert raw["metrics"]["fidelity"]["accuracy"] > 0.8
    assert "measured_on" in raw["metrics"]["latency"]


def test_shipped_artifacts_pass_their_selftest(built, tmp_path):
    import onnxruntime as ort

    _, out = built
    directory, manifest = open_bundle(out, tmp_path)
    selftest = manifest.selftest
    inputs = dict(np.load(directory / selftest["inputs"]))
    expected = dict(np.load(directory / selftest["expected"]))
    for artifact in manifest.artifacts:
        session = ort.InferenceSession(str(directory / artifact.path), providers=["CPUExecutionProvider"])
        actual = session.run(None, inputs)[0]
        tolerance = selftest["artifacts"][artifact.path]
        assert np.allclose(actual, expected["output"], atol=tolerance["atol"], rtol=tolerance["rtol"])
        assert actual.argmax() == expected["output"].argmax()


def test_report_lists_every_candidate(built):
    _, out = built
    report = out.with_name("tiny.report.md").read_text()
    for candidate in ("fp32", "int8-u8s8-rr", "int8-u8s8-rr-percentile"):
        assert f"| {candidate}" in report or f"**{candidate}**" in report
    assert "## Decision" in report
    assert "host p50 ms" in report


def test_inspect_and_verify_cli(built):
    _, out = built
    inspect = CliRunner().invoke(cli, ["bundle", "inspect", str(out)])
    assert inspect.exit_code == 0, inspect.output
    assert "tiny-cnn version 1 for x86-avx2" in inspect.output
    verify = CliRunner().invoke(cli, ["bundle", "verify", str(out)])
    assert verify.exit_code == 0
    assert verify.output.startswith("OK")


def test_tar_holds_one_bundle_directory(built):
    _, out = built
    with tarfile.open(out) as tar:
        roots = {name.split("/")[0] for name in tar.getnames()}
    assert roots == {"tiny-cnn-x86-avx2"}


def test_build_for_jetson_ships_fp16_with_fp32_fallback(tmp_path, digits_data):
    result, out = _build(tmp_path, digits_data, device="jetson-orin")
    assert result.exit_code == 0, result.output
    _, manifest = open_bundle(out, tmp_path / "x")
    precisions = [a.precision for a in manifest.artifacts]
    assert precisions == ["fp16", "fp32"]
    assert manifest.artifacts[0].runtimes[0] == "TensorrtExecutionProvider"
    assert "not jetson-orin" in result.output


def test_build_from_onnx_file(tmp_path, digits_data):
    import torch

    from tiny_cnn import tiny_cnn

    onnx_path = tmp_path / "tiny.onnx"
    torch.onnx.export(tiny_cnn(), (torch.zeros(1, 1, 8, 8),), str(onnx_path), input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "n"}, "output": {0: "n"}}, dynamo=False)
    out = tmp_path / "onnx-bundle.tar"
    result = CliRunner().invoke(cli, ["build", "--device", "rpi5", "--model", str(onnx_path), "--calib", str(digits_data["calib"]), "--eval", str(digits_data["eval"]), "--out", str(out), "--latency-runs", "5"])
    assert result.exit_code == 0, result.output
    _, manifest = open_bundle(out, tmp_path / "x")
    assert manifest.raw["source"]["kind"] == "onnx"
    assert manifest.name == "tiny"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "jetson-orn"], "unknown device 'jetson-orn'; did you mean 'jetson-orin'?"),
        (["--model", "nowhere.py:factory"], "factory file nowhere.py"),
        (["--model", "tiny_cnn"], "is malformed"),
        (["--input-shape", "1,3,8,8"], "the model rejects inputs of shape"),
        (["--input-shape", "a,b"], "--input-shape 'a,b' is invalid"),
        (["--max-fidelity-drop", "5"], "out of range"),
    ],
)
def test_bad_input_exits_2_without_partial_output(tmp_path, digits_data, args, message):
    out_dir = tmp_path / "out"
    base = {"--device": "x86-avx2", "--model": TINY_SPEC}
    overrides = dict(zip(args[::2], args[1::2]))
    options = {**base, **overrides}
    flat = [item for pair in options.items() for item in pair]
    command = ["build", *flat, "--calib", str(digits_data["calib"]), "--out", str(out_dir / "b.tar"), "--latency-runs", "5"]
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()[-1:]) == 1
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_empty_calibration_exits_2(tmp_path):
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 1, 8, 8), np.float32))
    result = CliRunner().invoke(cli, ["build", "--device", "rpi5", "--model", TINY_SPEC, "--calib", str(empty), "--out", str(tmp_path / "out" / "b.tar")])
    assert result.exit_code == 2
    assert "is empty" in result.output
    assert list((tmp_path / "out").iterdir()) == []


def test_factory_that_raises_exits_2(tmp_path, digits_data):
    spec = TINY_SPEC.replace(":tiny_cnn", ":broken_factory")
    result = CliRunner().invoke(cli, ["build", "--device", "rpi5", "--model", spec, "--calib", str(digits_data["calib"]), "--out", str(tmp_path / "out" / "b.tar")])
    assert result.exit_code == 2
    assert "weights file missing" in result.output
    assert list((tmp_path / "out").iterdir()) == []


def test_compare_outputs_metrics():
    reference = {"out": np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0], [5.0, 0.0, 0.0]])}
    candidate = {"out": np.array([[2.0, 1.1, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0], [0.0, 5.0, 0.0]])}
    fidelity = compare_outputs(reference, candidate, labels=np.array([0, 1, 2, 1]))
    assert fidelity.top1_agreement == pytest.approx(0.75)
    assert fidelity.source_accuracy == pytest.approx(0.75)
    assert fidelity.accuracy == pytest.approx(1.0)
    assert fidelity.drop == pytest.approx(0.25)
    assert fidelity.mean_kl > 0


def test_compare_outputs_cosine_for_embeddings():
    reference = {"emb": np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]).reshape(2, 2, 2)}
    candidate = {"emb": np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]).reshape(2, 2, 2)}
    fidelity = compare_outputs(reference, candidate)
    assert fidelity.metric == "cosine"
    assert fidelity.cosine == pytest.approx((1.0 + 1 / np.sqrt(2)) / 2)


def test_gate_boundary():
    fidelity = Fidelity(samples=100, metric="top1_agreement", score=0.99)
    assert Gate(0.01).passes(fidelity)
    assert not Gate(0.009).passes(fidelity)


def test_percentile_calibration_with_prime_sample_count(tmp_path, digits_data):
    from tiny_cnn import digits_arrays

    x, _ = digits_arrays()
    calib = tmp_path / "calib61.npy"
    np.save(calib, x[1000:1061])
    out = tmp_path / "b.tar"
    result = CliRunner().invoke(cli, ["build", "--device", "x86-avx2", "--model", TINY_SPEC, "--calib", str(calib), "--eval", str(digits_data["eval"]), "--out", str(out), "--latency-runs", "5"])
    assert result.exit_code == 0, result.output
    _, manifest = open_bundle(out, tmp_path / "x")
    assert "int8-u8s8-rr-percentile" in manifest.raw["metrics"]["candidates"]
    assert manifest.raw["recipe"]["calibration"]["samples"] == 61


def test_student_gate_uses_accuracy_with_labels():
    fidelity = Fidelity(samples=100, metric="top1_agreement", score=0.95, accuracy=0.99, source_accuracy=0.99)
    assert fidelity.drop == pytest.approx(0.05)
    fidelity.accuracy_decides = True
    assert fidelity.drop == pytest.approx(0.0)
    assert fidelity.to_dict()["gate_metric"] == "accuracy"


def test_student_gate_without_labels_keeps_agreement():
    fidelity = Fidelity(samples=100, metric="top1_agreement", score=0.95, accuracy_decides=True)
    assert fidelity.drop == pytest.approx(0.05)


def test_unwritable_out_exits_2(tmp_path, digits_data):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(cli, ["build", "--device", "rpi5", "--model", TINY_SPEC, "--calib", str(digits_data["calib"]), "--out", str(blocker / "b.tar")])
    assert result.exit_code == 2, result.output
    assert f"cannot write --out {blocker / 'b.tar'}" in result.output


def test_small_eval_set_warns_about_gate_resolution(tmp_path, digits_data):
    from tiny_cnn import digits_arrays

    x, y = digits_arrays()
    small_eval = tmp_path / "eval50.npz"
    np.savez(small_eval, input=x[1500:1550], labels=y[1500:1550])
    out = tmp_path / "b.tar"
    result = CliRunner().invoke(cli, ["build", "--device", "jetson-orin", "--model", TINY_SPEC, "--calib", str(digits_data["calib"]), "--eval", str(small_eval), "--out", str(out), "--latency-runs", "5"])
    assert result.exit_code == 0, result.output
    assert "the evaluation set has 50 samples" in result.output
    assert "Use at least 101 evaluation samples" in out.with_name("b.report.md").read_text()
