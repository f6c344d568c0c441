"""Bundle manifest writing, verification, packing and safe extraction."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeopt.agent.bundle import (
    SCHEMA_VERSION,
    BundleError,
    extract_bundle,
    load_manifest,
    open_bundle,
    pack_bundle,
    sha256_file,
    verify_bundle,
    write_manifest,
)
from edgeopt.cli import cli


def _make_bundle(root: Path) -> Path:
    bundle = root / "demo-rpi5"
    (bundle / "selftest").mkdir(parents=True)
    (bundle / "model.fp32.onnx").write_bytes(b"onnx-bytes" * 100)
    (bundle / "selftest" / "inputs.npz").write_bytes(b"inputs")
    artifact = {
        "path": "model.fp32.onnx",
        "sha256": sha256_file(bundle / "model.fp32.onnx"),
        "size": 1000,
        "format": "onnx",
        "precision": "fp32",
        "runtimes": ["CPUExecutionProvider"],
    }
    write_manifest(
        bundle,
        {
            "name": "demo",
            "version": "1",
            "device": "rpi5",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 2]}],
            "artifacts": [artifact],
        },
    )
    return bundle


def test_manifest_lists_every_file_with_sha256(tmp_path):
    bundle = _make_bundle(tmp_path)
    manifest = load_manifest(bundle)
    listed = {entry["path"]: entry["sha256"] for entry in manifest.raw["files"]}
    assert set(listed) == {"model.fp32.onnx", "selftest/inputs.npz"}
    assert listed["model.fp32.onnx"] == sha256_file(bundle / "model.fp32.onnx")
    assert manifest.raw["schema"] == SCHEMA_VERSION


def test_verify_passes_untouched_bundle(tmp_path):
    assert verify_bundle(_make_bundle(tmp_path)).name == "demo"


def test_single_changed_byte_fails_naming_file(tmp_path):
    bundle = _make_bundle(tmp_path)
    path = bundle / "model.fp32.onnx"
    data = bytearray(path.read_bytes())
    data[500] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.fp32.onnx does not match its sha256"):
        verify_bundle(bundle)


def test_missing_file_fails(tmp_path):
    bundle = _make_bundle(tmp_path)
    (bundle / "selftest" / "inputs.npz").unlink()
    with pytest.raises(BundleError, match="selftest/inputs.npz is missing"):
        verify_bundle(bundle)


def test_unlisted_file_fails(tmp_path):
    bundle = _make_bundle(tmp_path)
    (bundle / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.bin is not listed"):
        verify_bundle(bundle)


def test_unknown_schema_rejected(tmp_path):
    bundle = _make_bundle(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    # A bundle from a newer edgeopt has a consistent digest; only the schema is unknown.
    (bundle / "manifest.sha256").write_text(sha256_file(bundle / "manifest.json") + "  manifest.json\n")
    with pytest.raises(BundleError, match="schema 99 is not supported"):
        verify_bundle(bundle)


@pytest.mark.parametrize("old,new", [(b'"rpi5"', b'"rpi4"'), (b"\"size\": 6", b"\"size\": 7"), (b'"demo"', b'"dema"')])
def test_changed_manifest_byte_fails(tmp_path, old, new):
    bundle = _make_bundle(tmp_path)
    path = bundle / "manifest.json"
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))
    with pytest.raises(BundleError, match="manifest.json does not match its sha256"):
        verify_bundle(bundle)


def test_missing_manifest_digest_fails(tmp_path):
    bundle = _make_bundle(tmp_path)
    (bundle / "manifest.sha256").unlink()
    with pytest.raises(BundleError, match="manifest.sha256 is missing"):
        verify_bundle(bundle)


def test_unreadable_tar_is_one_line(tmp_path):
    path = tmp_path / "broken.tar"
    path.write_bytes(b"\x00not a tar" * 10)
    with pytest.raises(BundleError) as info:
        open_bundle(path, tmp_path / "x")
    assert "is not a readable tar archive" in str(info.value)
    assert "\n" not in str(info.value)


def test_tar_round_trip(tmp_path):
    bundle = _make_bundle(tmp_path)
    tar_path = tmp_path / "demo.tar"
    pack_bundle(bundle, tar_path)
    directory, manifest = open_bundle(tar_path, tmp_path / "extracted")
    assert manifest.name == "demo"
    assert (directory / "model.fp32.onnx").is_file()


def _tar_with(tmp_path: Path, add) -> Path:
    tar_path = tmp_path / "evil.tar"
    with tarfile.open(tar_path, "w") as tar:
        add(tar)
    return tar_path


def _add_file(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_extraction_rejects_path_escape(tmp_path):
    tar_path = _tar_with(tmp_path, lambda tar: _add_file(tar, "../escape.txt"))
    with pytest.raises(BundleError, match="escapes"):
        extract_bundle(tar_path, tmp_path / "target")
    assert not (tmp_path / "escape.txt").exists()
    assert list((tmp_path / "target").iterdir()) == []


def test_extraction_rejects_symlink(tmp_path):
    def add(tar):
        info = tarfile.TarInfo("bundle/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)

    with pytest.raises(BundleError, match="link or special file"):
        extract_bundle(_tar_with(tmp_path, add), tmp_path / "target")


def test_extraction_enforces_size_limit(tmp_path):
    tar_path = _tar_with(tmp_path, lambda tar: _add_file(tar, "bundle/big.bin", b"0" * 4096))
    with pytest.raises(BundleError, match="extraction limit"):
        extract_bundle(tar_path, tmp_path / "target", max_bytes=1024)


def test_extraction_needs_manifest(tmp_path):
    tar_path = _tar_with(tmp_path, lambda tar: _add_file(tar, "bundle/readme.txt"))
    with pytest.raises(BundleError, match="manifest.json"):
        extract_bundle(tar_path, tmp_path / "target")


def test_cli_verify_reports_changed_file(tmp_path):
    bundle = _make_bundle(tmp_path)
    tar_path = tmp_path / "demo.tar"
    (bundle / "model.fp32.onnx").write_bytes(b"tampered" * 125)
    pack_bundle(bundle, tar_path)
    result = CliRunner().invoke(cli, ["bundle", "verify", str(tar_path)])
    assert result.exit_code != 0
    assert "model.fp32.onnx" in result.output


def test_cli_inspect_prints_artifacts(tmp_path):
    result = CliRunner().invoke(cli, ["bundle", "inspect", str(_make_bundle(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "demo version 1 for rpi5" in result.output
    assert "model.fp32.onnx" in result.output
