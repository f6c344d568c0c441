"""Device profiles: required targets, hardware facts in recipes, loader errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeopt.cli import cli
from edgeopt.devices.probe import HostFacts, detect_profile, match_profiles, probe_host
from edgeopt.devices.profiles import PROFILE_DIR, ProfileError, list_profiles, load_profile

REQUIRED = {"jetson-orin", "jetson-xavier", "rpi5", "rpi4", "apple-silicon", "x86-avx2", "x86-avx512-vnni"}


def test_required_profiles_present():
    ids = {p.id for p in list_profiles()}
    assert REQUIRED <= ids


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.id)
def test_profile_has_checkable_facts(profile):
    assert profile.cores > 0
    assert profile.memory_mb >= 1024
    assert profile.accelerator
    assert profile.runtimes, "runtime chain must not be empty"
    assert profile.power.sensor in {"ina3221", "rpi5-pmic", "rapl", "nvml", "powermetrics", "estimated"}
    assert 0 < profile.power.idle_w < profile.power.max_w
    assert profile.recognition.condition_count() > 0
    assert any(c.precision == "fp32" for c in profile.candidates)
    assert set(profile.precision_preference) <= {"fp32", "fp16", "int8"}


def test_avx2_int8_uses_reduce_range():
    int8 = [c for c in load_profile("x86-avx2").candidates if c.precision == "int8"]
    assert int8
    assert all(c.reduce_range for c in int8)
    assert all((c.activation_type, c.weight_type) == ("uint8", "int8") for c in int8)


def test_vnni_int8_uses_full_range():
    int8 = [c for c in load_profile("x86-avx512-vnni").candidates if c.precision == "int8"]
    assert int8
    assert not any(c.reduce_range for c in int8)


@pytest.mark.parametrize("device", ["jetson-orin", "jetson-xavier"])
def test_jetson_int8_is_symmetric_qdq_and_fp16_preferred(device):
    profile = load_profile(device)
    int8 = [c for c in profile.candidates if c.precision == "int8"]
    assert int8
    for candidate in int8:
        assert candidate.quant_format == "QDQ"
        assert candidate.activation_symmetric
        assert candidate.weight_symmetric
        assert candidate.activation_type == "int8"
    assert profile.precision_preference[0] == "fp16"
    assert profile.runtimes[0].provider == "TensorrtExecutionProvider"
    assert profile.runtimes[0].options["trt_engine_cache_enable"] is True
    assert profile.runtimes[-1].provider == "CPUExecutionProvider"


def test_apple_uses_coreml_ml_program():
    runtime = load_profile("apple-silicon").runtimes[0]
    assert runtime.provider == "CoreMLExecutionProvider"
    assert runtime.options["ModelFormat"] == "MLProgram"


def test_unknown_device_names_closest_match():
    with pytest.raises(ProfileError) as info:
        load_profile("jetson-orn")
    message = str(info.value)
    assert "'jetson-orin'" in message
    assert "rpi5" in message


def test_unknown_key_rejected(tmp_path):
    text = (PROFILE_DIR / "rpi4.toml").read_text().replace('id = "rpi4"', 'id = "board"\nfrobnicate = 1')
    (tmp_path / "board.toml").write_text(text)
    with pytest.raises(ProfileError, match="frobnicate"):
        list_profiles(tmp_path)


def test_id_must_match_file_name(tmp_path):
    (tmp_path / "other.toml").write_text((PROFILE_DIR / "rpi4.toml").read_text())
    with pytest.raises(ProfileError, match="file name"):
        list_profiles(tmp_path)


def _fake_root(tmp_path: Path, model: str | None = None, tegra: str | None = None, flags: str = "") -> Path:
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    if model:
        (tmp_path / "proc/device-tree/model").write_bytes(model.encode() + b"\x00")
    if tegra:
        (tmp_path / "etc/nv_tegra_release").write_text(tegra)
    (tmp_path / "proc/cpuinfo").write_text(f"processor\t: 0\nFeatures\t: {flags}\n")
    return tmp_path


def test_probe_recognises_orin(tmp_path):
    root = _fake_root(tmp_path, "NVIDIA Jetson AGX Orin Developer Kit", "# R36 (release), REVISION: 3.0, GCID: 1", "fp asimd asimddp")
    facts = probe_host(root, system="Linux", machine="aarch64")
    assert detect_profile(facts).id == "jetson-orin"


def test_probe_recognises_rpi5_not_rpi4(tmp_path):
    root = _fake_root(tmp_path, "Raspberry Pi 5 Model B Rev 1.0", flags="fp asimd asimddp")
    facts = probe_host(root, system="Linux", machine="aarch64")
    assert [p.id for p in match_profiles(facts)] == ["rpi5"]


def test_probe_prefers_vnni_over_avx2():
    facts = HostFacts(system="Linux", machine="x86_64", cpu_flags=frozenset({"avx2", "fma", "avx512f", "avx512_vnni"}))
    assert [p.id for p in match_profiles(facts)] == ["x86-avx512-vnni", "x86-avx2"]


def test_probe_avx2_only_host():
    facts = HostFacts(system="Linux", machine="x86_64", cpu_flags=frozenset({"avx2", "fma"}))
    assert detect_profile(facts).id == "x86-avx2"


def test_probe_apple_silicon():
    facts = HostFacts(system="Darwin", machine="arm64")
    assert detect_profile(facts).id == "apple-silicon"


def test_cli_devices_lists_all():
    result = CliRunner().invoke(cli, ["devices"])
    assert result.exit_code == 0
    for device in REQUIRED:
        assert device in result.output


def test_cli_devices_show_prints_runtime_chain():
    result = CliRunner().invoke(cli, ["devices", "show", "jetson-orin"])
    assert result.exit_code == 0
    assert "TensorrtExecutionProvider" in result.output
    assert "int8-qdq-symmetric" in result.output


def test_cli_devices_show_json():
    result = CliRunner().invoke(cli, ["devices", "show", "rpi5", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["cores"] == 4


def test_cli_devices_show_unknown_exits_2():
    result = CliRunner().invoke(cli, ["devices", "show", "rpi6"])
    assert result.exit_code == 2
    assert "unknown device 'rpi6'" in result.output
    assert "did you mean" in result.output
    assert len(result.output.strip().splitlines()) == 1
