"""`edgeopt build` with pruning, distillation and QAT/QAD on scikit-learn's digits, end to end.

The teacher is the digits CNN of examples/digits, trained once per test session on the fixed
train split. The builds calibrate on the validation split and evaluate on the labeled test split.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT, TINY_SPEC
from edgeopt.cli import cli

DIGITS_SPEC = f"{ROOT / 'examples' / 'digits' / 'model.py'}:digits_cnn_pretrained"
TEACHER_MACS = 2_379_008  # the width-32 digits CNN, counted on its ONNX graph
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict[str, Path]:
    """The digits split, calibration inputs and a briefly trained teacher, exposed to the factory."""
    from digits.model import TEACHER_PATH_VARIABLE
    from digits.train_teacher import TEACHER_CONFIG, train_teacher

    from edgeopt.builder.distill import DistillConfig

    folder = tmp_path_factory.mktemp("digits")
    _, teacher_path = train_teacher(folder, progress=False, config=DistillConfig(**{**vars(TEACHER_CONFIG), "epochs": 20}))
    np.save(folder / "calib.npy", np.load(folder / "val.npz")["x"])
    train = np.load(folder / "train.npz")
    np.savez(folder / "unlabeled.npz", x=train["x"])

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TEACHER_PATH_VARIABLE, str(teacher_path))
        yield {
            "teacher": teacher_path,
            "train": folder / "train.npz",
            "unlabeled": folder / "unlabeled.npz",
            "calib": folder / "calib.npy",
            "eval": folder / "test.npz",
        }


def _host_profile() -> str | None:
    from edgeopt.devices.probe import detect_profile, probe_host

    profile = detect_profile(probe_host())
    return profile.id if profile is not None and profile.runtimes_for("onnx", "int8") else None


def _build(digits, out: Path, *extra: str, device: str | None = None, model: str = DIGITS_SPEC):
    args = [
        "build", "--device", device or _host_profile() or "x86-avx2", "--model", model,
        "--calib", str(digits["calib"]), "--eval", str(digits["eval"]), "--out", str(out), "--latency-runs", "30", *extra,
    ]
    return CliRunner().invoke(cli, args)


def _manifest(bundle: Path) -> dict:
    with tarfile.open(bundle) as tar:
        member = next(name for name in tar.getnames() if name.endswith("/manifest.json"))
        return json.load(tar.extractfile(member))


@pytest.fixture(scope="module")
def kd_build(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("kd") / "digits.tar"
    result = _build(
        digits, out, "--prune", "0.5", "--distill", "--train-data", str(digits["train"]),
        "--epochs", "12", "--patience", "12", "--lr", "2e-3", "--max-fidelity-drop", "0.03",
    )
    assert result.exit_code == 0, result.output
    return out, _manifest(out), out.with_name("digits.report.md").read_text()


@pytest.fixture(scope="module")
def qad_build(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("qad") / "digits.tar"
    result = _build(
        digits, out, "--qat", "--distill", "--train-data", str(digits["train"]),
        "--epochs", "4", "--max-fidelity-drop", "0.03",
    )
    assert result.exit_code == 0, result.output
    return out, _manifest(out), out.with_name("digits.report.md").read_text()


def test_pruned_candidates_in_manifest(kd_build):
    _, manifest, _ = kd_build
    candidates = manifest["metrics"]["candidates"]
    students = [name for name in candidates if name.startswith("pruned50-kd-")]
    assert "pruned50-kd-fp32" in students
    assert any("int8" in name for name in students), students
    for name in students:
        assert candidates[name]["stages"] == ["prune", "distillation"]
        assert candidates[name]["macs"] < 0.3 * TEACHER_MACS
        assert candidates[name]["parameters"] < 0.3 * candidates["fp32"]["parameters"]
    assert candidates["fp32"]["macs"] == TEACHER_MACS
    assert candidates["fp32"]["stages"] == []


def test_report_shows_student_stages_and_costs(kd_build):
    _, manifest, report = kd_build
    pruned_macs = manifest["metrics"]["candidates"]["pruned50-kd-fp32"]["macs"]
    row = next(line for line in report.splitlines() if line.startswith("| pruned50-kd-fp32 ") or line.startswith("| **pruned50-kd-fp32**"))
    assert "prune 50% (l2) → KD" in row
    assert f"{pruned_macs:,}" in row
    assert "| parameters | MACs |" in report
    assert "## Pruning and training" in report
    assert "Distillation of the pruned model" in report


def test_pareto_plot_beside_report(kd_build):
    out, _, report = kd_build
    plot = out.with_name("digits.report.pareto.png")
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    assert "](digits.report.pareto.png)" in report
    with tarfile.open(out) as tar:
        assert not any(name.endswith(".png") for name in tar.getnames())


def test_student_winner_fills_recipe(kd_build):
    _, manifest, _ = kd_build
    if not manifest["metrics"]["host_representative"]:
        pytest.skip("this host matches no device profile, so the precision preference picks the unpruned INT8 candidate")
    winner = manifest["metrics"]["winner"]
    assert winner.startswith("pruned50-kd-"), f"winner {winner}: {manifest['metrics']['candidates']}"
    assert manifest["metrics"]["candidates"][winner]["gate_passed"] is True

    prune = manifest["recipe"]["prune"]
    assert prune["ratio"] == 0.5
    assert prune["macs_after"] < prune["macs_before"]
    assert prune["params_after"] < prune["params_before"]
    distillation = manifest["recipe"]["distillation"]
    assert distillation["mode"] == "distillation"
    assert 1 <= distillation["best_epoch"] <= distillation["epochs_run"] == len(distillation["history"])
    assert distillation["temperature"] == 4.0


def test_unpruned_winner_leaves_recipe_empty(tmp_path, digits):
    out = tmp_path / "plain.tar"
    result = _build(digits, out, device="x86-avx2")
    assert result.exit_code == 0, result.output
    manifest = _manifest(out)
    assert manifest["recipe"]["prune"] is None
    assert manifest["recipe"]["distillation"] is None


def test_qad_candidate_evaluated(qad_build):
    _, manifest, report = qad_build
    qad = manifest["metrics"]["candidates"]["qad-int8"]
    assert qad["precision"] == "int8"
    assert qad["stages"] == ["qat"]
    assert qad["macs"] == TEACHER_MACS
    assert qad["size_bytes"] < manifest["metrics"]["candidates"]["fp32"]["size_bytes"] / 3
    assert qad["fidelity"]["samples"] == 360
    assert "| qad-int8 | QAD |" in report or "| **qad-int8** (winner) | QAD |" in report
    assert "Quantization-aware distillation of qad-int8" in report


def test_qad_recipe_records_training(tmp_path, digits):
    from edgeopt.builder.pipeline import BuildOptions, build
    from edgeopt.builder.student import StudentOptions

    options = BuildOptions(
        device="x86-avx2",
        model=DIGITS_SPEC,
        calib=digits["calib"],
        evaluation=digits["eval"],
        out=tmp_path / "api.tar",
        max_fidelity_drop=0.03,
        latency_runs=5,
        student=StudentOptions(qat=True, distill=True, train_data=digits["train"], epochs=3),
    )
    qad = next(c for c in build(options).context.candidates if c.id == "qad-int8")
    assert qad.recipe["method"] == "qad"
    assert qad.recipe["quantize_nodes"] > 0
    training = qad.recipe["training"]
    assert training["mode"] == "quantization-aware distillation"
    assert training["teacher"] == DIGITS_SPEC
    assert training["lr"] == pytest.approx(1e-4)
    assert len(training["history"]) == training["epochs_run"]
    assert qad.stages["qat"] is training
    assert any("full int8 range" in note for note in qad.notes)


# "{train}", "{unlabeled}" and "{missing}" stand for data files of the digits fixture.
BAD_INPUT = [
    (["--prune", "0.5", "--target-macs", "100000"], "give only one"),
    (["--prune", "1.5"], "--prune 1.5 is outside (0, 1)"),
    (["--prune", "0.5", "--distill"], "--distill needs training data: add --train-data"),
    (["--qat"], "--qat needs training data: add --train-data"),
    (["--distill", "--train-data", "{train}"], "--distill needs a student"),
    (["--train-data", "{train}"], "is used only by --prune"),
    (["--qat", "--train-data", "{unlabeled}"], "--qat on unlabeled --train-data"),
    (["--prune", "0.5", "--train-data", "{unlabeled}"], "fine-tuning the pruned model needs labels"),
    (["--prune", "0.5", "--prune-keep", "classifier"], "layer to keep 'classifier' is not a module"),
    (["--prune", "0.5", "--distill", "--train-data", "{missing}"], "missing.npz not found"),
    (["--prune", "0.5", "--distill", "--train-data", "{train}", "--feature-loss", "1", "--feature-layer", "stem=0"], "feature layer 'stem' is not a module"),
    (["--prune", "0.5", "--feature-layer", "0"], "--feature-layer needs --feature-loss"),
    (["--prune", "0.5", "--feature-layer", "=1"], "--feature-layer '=1' is invalid"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_exits_2_without_output(tmp_path, digits, args, message):
    files = {"train": digits["train"], "unlabeled": digits["unlabeled"], "missing": tmp_path / "missing.npz"}
    args = [arg.format(**files) for arg in args]
    out_dir = tmp_path / "out"
    result = _build(digits, out_dir / "b.tar", *args, "--epochs", "1", device="x86-avx2")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert message in errors[0]
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_onnx_source_rejected_for_pruning(tmp_path, digits):
    import torch

    from tiny_cnn import TinyCNN

    onnx_path = tmp_path / "tiny.onnx"
    torch.onnx.export(TinyCNN().eval(), (torch.zeros(1, 1, 8, 8),), str(onnx_path), input_names=["input"], output_names=["output"], dynamo=False)
    result = _build(digits, tmp_path / "out" / "b.tar", "--prune", "0.5", model=str(onnx_path), device="x86-avx2")
    assert result.exit_code == 2, result.output
    assert "is an ONNX file: pass the model as a factory" in result.output
    assert not (tmp_path / "out").exists()


def test_tiny_cnn_pruned_into_directory_bundle(tmp_path, digits):
    """A classifier Linear after a flatten keeps its 10 classes; a directory bundle gets its plot beside it."""
    out = tmp_path / "tiny"
    result = _build(digits, out, "--prune", "0.3", "--prune-importance", "l1", "--prune-round-to", "4", model=TINY_SPEC, device="x86-avx2")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    pruned = manifest["metrics"]["candidates"]["pruned30-fp32"]
    assert pruned["stages"] == ["prune"]
    assert pruned["macs"] < manifest["metrics"]["candidates"]["fp32"]["macs"]
    report = (out / "report.md").read_text()
    assert "Pruned without retraining" in report
    assert "](../tiny.pareto.png)" in report
    assert (tmp_path / "tiny.pareto.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not list(out.glob("*.png"))
