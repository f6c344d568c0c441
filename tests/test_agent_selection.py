"""Device check and runtime selection over real ONNX Runtime sessions."""

from __future__ import annotations

import json
import logging

import pytest

from agent_fixtures import host_device, make_classifier_bundle, other_device
from edgeopt.agent.bundle import load_manifest, verify_bundle, write_manifest
from edgeopt.agent.errors import LoadError
from edgeopt.agent.selection import check_device, select_runtime
from edgeopt.devices import load_profile
from edgeopt.devices.probe import HostFacts

ORIN = HostFacts(
    system="Linux",
    machine="aarch64",
    device_tree_model="NVIDIA Jetson AGX Orin Developer Kit",
    nv_tegra_release="# R36 (release), REVISION: 3.0",
)
VNNI_HOST = HostFacts(system="Linux", machine="x86_64", cpu_flags=frozenset({"avx2", "fma", "avx512f", "avx512_vnni"}))


def _rewrite_manifest(bundle_dir, **changes):
    raw = json.loads((bundle_dir / "manifest.json").read_text())
    raw.update(changes)
    raw.pop("files")
    raw.pop("schema")
    write_manifest(bundle_dir, raw)
    return verify_bundle(bundle_dir)


def test_device_check_accepts_any_matching_profile(tmp_path):
    bundle = make_classifier_bundle(tmp_path, device="x86-avx2")
    profile = check_device(load_manifest(bundle), VNNI_HOST, force=False)
    assert profile.id == "x86-avx2"


def test_device_check_rejects_other_board(tmp_path):
    bundle = make_classifier_bundle(tmp_path, device="x86-avx2")
    with pytest.raises(LoadError) as info:
        check_device(load_manifest(bundle), ORIN, force=False)
    message = str(info.value)
    assert "built for x86-avx2" in message
    assert "jetson-orin" in message
    assert "--force" in message


def test_device_check_force_warns(tmp_path, caplog):
    bundle = make_classifier_bundle(tmp_path, device="x86-avx2")
    with caplog.at_level(logging.WARNING, logger="edgeopt.agent.selection"):
        profile = check_device(load_manifest(bundle), ORIN, force=True)
    assert profile.id == "x86-avx2"
    assert "loading anyway because of --force" in caplog.text


def test_device_check_unknown_profile(tmp_path):
    bundle = make_classifier_bundle(tmp_path)
    manifest = _rewrite_manifest(bundle, device="jetson-nano-9000")
    with pytest.raises(LoadError) as info:
        check_device(manifest, VNNI_HOST, force=True)
    assert "jetson-nano-9000" in str(info.value)


def test_selection_skips_failing_selftest(tmp_path, caplog):
    bundle = make_classifier_bundle(tmp_path, broken_first=True)
    manifest = load_manifest(bundle)
    with caplog.at_level(logging.INFO, logger="edgeopt.agent.selection"):
        selection = select_runtime(bundle, manifest, load_profile(host_device()), tmp_path / "cache", intra_op_threads=1)

    assert selection.artifact.path == "model.onnx"
    assert selection.runtime.label == "CPUExecutionProvider"
    skipped = [a for a in selection.attempts if a.artifact == "model.broken.onnx"]
    assert len(skipped) == 1
    assert "max abs difference" in skipped[0].reason
    assert "exceeds atol 1e-05" in skipped[0].reason
    assert "skipped CPUExecutionProvider with model.broken.onnx" in caplog.text
    selection.backend.close()


def test_per_artifact_tolerance_override(tmp_path):
    bundle = make_classifier_bundle(tmp_path, broken_first=True)
    raw = json.loads((bundle / "manifest.json").read_text())
    selftest = dict(raw["selftest"], artifacts={"model.broken.onnx": {"atol": 1.0, "rtol": 1.0}}, check_top1=False)
    manifest = _rewrite_manifest(bundle, selftest=selftest)

    selection = select_runtime(bundle, manifest, load_profile(host_device()), tmp_path / "cache")
    assert selection.artifact.path == "model.broken.onnx"
    assert "atol 1" in selection.attempts[-1].reason
    selection.backend.close()


def test_top1_check_rejects_within_tolerance(tmp_path):
    bundle = make_classifier_bundle(tmp_path, broken_first=True)
    raw = json.loads((bundle / "manifest.json").read_text())
    selftest = dict(raw["selftest"], artifacts={"model.broken.onnx": {"atol": 1.0, "rtol": 1.0}})
    manifest = _rewrite_manifest(bundle, selftest=selftest)

    selection = select_runtime(bundle, manifest, load_profile(host_device()), tmp_path / "cache")
    skipped = next(a for a in selection.attempts if a.artifact == "model.broken.onnx")
    assert "top-1 class" in skipped.reason
    assert selection.artifact.path == "model.onnx"
    selection.backend.close()


def test_rpi5_chain_skips_litert_and_xnnpack(tmp_path):
    bundle = make_classifier_bundle(tmp_path, device="rpi5")
    selection = select_runtime(bundle, load_manifest(bundle), load_profile("rpi5"), tmp_path / "cache")
    reasons = {a.runtime: a.reason for a in selection.attempts if not a.selected}
    assert reasons["litert"] == "no artifact in the bundle suits this runtime"
    assert "XnnpackExecutionProvider is not available" in reasons["XnnpackExecutionProvider"]
    assert selection.runtime.label == "CPUExecutionProvider"
    selection.backend.close()


def test_no_passing_candidate_lists_every_attempt(tmp_path):
    bundle = make_classifier_bundle(tmp_path, broken_first=True)
    raw = json.loads((bundle / "manifest.json").read_text())
    for artifact in raw["artifacts"]:
        artifact["runtimes"] = ["TensorrtExecutionProvider"]
        artifact["precision"] = "fp16"
    manifest = _rewrite_manifest(bundle, artifacts=raw["artifacts"])

    with pytest.raises(LoadError) as info:
        select_runtime(bundle, manifest, load_profile(host_device()), tmp_path / "cache")
    assert "no artifact in the bundle suits this runtime" in str(info.value)


def test_signature_mismatch_is_skipped(tmp_path):
    bundle = make_classifier_bundle(tmp_path)
    manifest = _rewrite_manifest(bundle, inputs=[{"name": "image", "datatype": "FP32", "shape": [-1, 4]}])
    with pytest.raises(LoadError) as info:
        select_runtime(bundle, manifest, load_profile(host_device()), tmp_path / "cache")
    assert "differ from the manifest's ['image']" in str(info.value)
