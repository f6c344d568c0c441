"""Execution-provider chains: fallback when a provider is missing, option handling, engine caches.

This machine's onnxruntime has no TensorRT, CUDA, Core ML, OpenVINO or XNNPACK execution
provider, so every chain falls back to the CPU execution provider here. The tests check that
the fallback happens and that each skipped provider comes with its reason. The option
dictionaries are checked as ONNX Runtime's own argument handling converts them.
"""

from __future__ import annotations

import json
import logging
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnxruntime.capi.onnxruntime_inference_collection import check_and_normalize_provider_args

from agent_fixtures import make_classifier_bundle
from edgeopt.agent.backends import EngineCacheWatch, OnnxRuntimeBackend, ProviderChoice, engine_cache_watches
from edgeopt.agent.bundle import load_manifest
from edgeopt.agent.selection import provider_choice, select_runtime
from edgeopt.builder.pipeline import BuildOptions, build
from edgeopt.cli import cli
from edgeopt.devices import list_profiles, load_profile

REPO = Path(__file__).resolve().parents[1]
MISSING_HERE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CoreMLExecutionProvider", "OpenVINOExecutionProvider", "XnnpackExecutionProvider")


def _walk(tmp_path: Path, device: str):
    bundle = make_classifier_bundle(tmp_path, device=device)
    selection = select_runtime(bundle, load_manifest(bundle), load_profile(device), tmp_path / "cache")
    selection.backend.close()
    return selection, {a.runtime: a.reason for a in selection.attempts if not a.selected}


def test_jetson_chain_falls_back_to_cpu(tmp_path):
    selection, reasons = _walk(tmp_path, "jetson-orin")

    assert [a.runtime for a in selection.attempts] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "TensorrtExecutionProvider is not available in this onnxruntime build" in reasons["TensorrtExecutionProvider"]
    assert "onnxruntime-gpu built with TensorRT" in reasons["TensorrtExecutionProvider"]
    assert "CUDAExecutionProvider is not available" in reasons["CUDAExecutionProvider"]
    assert selection.runtime.label == "CPUExecutionProvider"
    assert selection.backend.runtime.endswith("(CPUExecutionProvider)")


def test_apple_chain_falls_back_to_cpu(tmp_path):
    selection, reasons = _walk(tmp_path, "apple-silicon")

    assert "CoreMLExecutionProvider is not available" in reasons["CoreMLExecutionProvider"]
    assert "macOS" in reasons["CoreMLExecutionProvider"]
    assert selection.runtime.label == "CPUExecutionProvider"


def test_x86_chain_skips_openvino(tmp_path):
    selection, reasons = _walk(tmp_path, "x86-avx2")

    assert "onnxruntime-openvino" in reasons["OpenVINOExecutionProvider"]
    assert selection.runtime.label == "CPUExecutionProvider"


def test_rpi5_chain_without_litert(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)

    selection, reasons = _walk(tmp_path, "rpi5")

    assert reasons["litert"].startswith("LiteRT is not installed")
    assert "XnnpackExecutionProvider is not available" in reasons["XnnpackExecutionProvider"]
    assert selection.runtime.label == "CPUExecutionProvider"


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.id)
def test_options_reach_onnxruntime_as_declared(profile, tmp_path):
    cache = tmp_path / "cache"
    for runtime in profile.runtimes:
        if runtime.kind != "onnxruntime":
            continue
        choice = provider_choice(runtime, cache)

        expected = {k: v.replace("{cache_dir}", str(cache)) if isinstance(v, str) else v for k, v in runtime.options.items()}
        assert choice.name == (runtime.provider or "CPUExecutionProvider")
        assert choice.options == expected
        for value in expected.values():
            if isinstance(value, str) and value.startswith(str(cache)):
                assert Path(value).is_dir()

        # ONNX Runtime turns every key and value into a string before the provider parses it.
        names, options = check_and_normalize_provider_args([(choice.name, choice.options)], None, [choice.name])
        assert names == [choice.name]
        assert options == [{str(k): str(v) for k, v in expected.items()}]


def test_tensorrt_options_as_strings(tmp_path):
    runtime = load_profile("jetson-orin").runtimes[0]
    choice = provider_choice(runtime, tmp_path)

    _, [options] = check_and_normalize_provider_args([(choice.name, choice.options)], None, [choice.name])

    assert options["trt_fp16_enable"] == "True"
    assert options["trt_int8_enable"] == "True"
    assert options["trt_engine_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] == str(tmp_path / "tensorrt")
    assert options["trt_timing_cache_path"] == str(tmp_path / "tensorrt")
    assert options["trt_max_workspace_size"] == "2147483648"


def test_coreml_options_as_declared(tmp_path):
    runtime = load_profile("apple-silicon").runtimes[0]
    choice = provider_choice(runtime, tmp_path)

    assert choice.options["ModelFormat"] == "MLProgram"
    assert choice.options["MLComputeUnits"] == "ALL"
    assert choice.options["ModelCacheDirectory"] == str(tmp_path / "coreml")


def test_session_receives_declared_options(tmp_path):
    bundle = make_classifier_bundle(tmp_path)
    choice = ProviderChoice("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})

    backend = OnnxRuntimeBackend(bundle / "model.onnx", [choice])

    assert backend.provider_arguments == [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]
    assert backend.providers == ["CPUExecutionProvider"]
    backend.close()


def test_engine_cache_watch_build_then_reuse(tmp_path, caplog):
    cache = tmp_path / "tensorrt"
    cache.mkdir()
    caplog.set_level(logging.INFO, logger="edgeopt.agent.backends")

    first = EngineCacheWatch("TensorrtExecutionProvider", cache)
    (cache / "TensorrtExecutionProvider_TRTKernel_graph_1.engine").write_bytes(b"engine")
    built = first.finish(41.5, "model.fp16.onnx")

    second = EngineCacheWatch("TensorrtExecutionProvider", cache)
    reused = second.finish(0.8, "model.fp16.onnx")

    assert built.startswith("TensorrtExecutionProvider built the engine for model.fp16.onnx in 41.50 s")
    assert f"cached 1 file(s) in {cache}" in built
    assert reused.startswith(f"TensorrtExecutionProvider reused the cached engine for model.fp16.onnx from {cache}")
    assert "0.80 s" in reused
    assert [r.getMessage() for r in caplog.records] == [built, reused]


def test_engine_cache_watches_follow_options(tmp_path):
    providers = [
        ProviderChoice("TensorrtExecutionProvider", {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "trt")}),
        ProviderChoice("TensorrtExecutionProvider", {"trt_engine_cache_enable": False, "trt_engine_cache_path": str(tmp_path / "off")}),
        ProviderChoice("CoreMLExecutionProvider", {"ModelCacheDirectory": str(tmp_path / "coreml")}),
        ProviderChoice("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}),
    ]

    watches = engine_cache_watches(providers)

    assert [(w.provider, w.directory) for w in watches] == [
        ("TensorrtExecutionProvider", tmp_path / "trt"),
        ("CoreMLExecutionProvider", tmp_path / "coreml"),
    ]


def test_probe_lists_every_provider():
    result = CliRunner().invoke(cli, ["agent", "probe"])

    assert result.exit_code == 0, result.output
    assert "CPUExecutionProvider: available" in result.output
    for provider in MISSING_HERE:
        assert f"{provider}: not available: " in result.output
    assert "TensorrtExecutionProvider: not available: it needs onnxruntime-gpu built with TensorRT" in result.output


# --- builds of a small trained CNN on scikit-learn digits ---------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Train the digits CNN for a few epochs and write its factory, data and ONNX export."""
    import torch

    sys.path.insert(0, str(REPO / "examples"))
    from digits.model import digits_cnn
    from digits.prepare_data import load_split

    from edgeopt.builder.export import export_torch

    root = tmp_path_factory.mktemp("digits")
    split = load_split()
    x_train, y_train = split["train"]
    torch.manual_seed(0)
    model = digits_cnn(width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        for start in range(0, len(x_train), 64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x_train[start : start + 64])), torch.from_numpy(y_train[start : start + 64]))
            loss.backward()
            optimizer.step()
    model.eval()

    torch.save(model.state_dict(), root / "digits.pt")
    (root / "factory.py").write_text(
        "import sys\n"
        "import torch\n"
        f"sys.path.insert(0, {str(REPO / 'examples')!r})\n"
        "from digits.model import digits_cnn\n\n\n"
        "def trained_digits():\n"
        "    model = digits_cnn(width=8)\n"
        f"    model.load_state_dict(torch.load({str(root / 'digits.pt')!r}))\n"
        "    return model.eval()\n\n\n"
        "trained_digits.output_names = ['scores']\n",
        encoding="utf-8",
    )
    np.save(root / "calib.npy", split["val"][0])
    np.savez(root / "eval.npz", x=split["test"][0], y=split["test"][1])
    np.save(root / "eval.npy", split["test"][0])
    export_torch(model, {"input": split["test"][0][:1]}, ["scores"], root / "digits.onnx")
    return root


def _read_bundle(path: Path) -> tuple[dict, str]:
    with tarfile.open(path) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers()}
        manifest = json.load(tar.extractfile(members["manifest.json"]))
        report = tar.extractfile(members["report.md"]).read().decode("utf-8")
    return manifest, report


def test_jetson_bundle_records_tensorrt_options(digits, tmp_path):
    options = BuildOptions(
        device="jetson-orin",
        model=f"{digits / 'factory.py'}:trained_digits",
        calib=digits / "calib.npy",
        evaluation=digits / "eval.npy",
        out=tmp_path / "digits-orin.tar",
        latency_runs=5,
    )

    result = build(options)
    manifest, report = _read_bundle(result.bundle_path)

    chain = manifest["runtimes"]
    assert [entry["provider"] for entry in chain] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert chain[0]["options"]["trt_engine_cache_path"] == "{cache_dir}/tensorrt"
    assert chain[0]["options"]["trt_fp16_enable"] is True
    assert chain[0]["options"]["trt_max_workspace_size"] == 2147483648
    fp16 = next(a for a in manifest["artifacts"] if a["precision"] == "fp16")
    assert fp16["runtimes"] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert (
        f"`{fp16['path']}`: onnx fp16" in report
        and "only validated on the host with onnxruntime" in report
        and "(CPUExecutionProvider); TensorrtExecutionProvider, CUDAExecutionProvider not available here" in report
    )


def test_onnx_source_skips_tflite_candidates(digits, tmp_path):
    options = BuildOptions(
        device="rpi5",
        model=str(digits / "digits.onnx"),
        calib=digits / "calib.npy",
        evaluation=digits / "eval.npy",
        out=tmp_path / "digits-rpi5.tar",
        latency_runs=5,
    )

    result = build(options)
    manifest, report = _read_bundle(result.bundle_path)

    assert {a["format"] for a in manifest["artifacts"]} == {"onnx"}
    skipped = manifest["metrics"]["skipped_candidates"]
    assert [entry.split(":")[0] for entry in skipped] == ["tflite-int8", "tflite-int8-dynamic", "tflite-fp32"]
    assert all("an ONNX source has none" in entry for entry in skipped)
    assert "## Candidates not built" in report
    assert "- tflite-fp32: LiteRT candidates are converted from the PyTorch module with litert-torch" in report


def test_probe_shows_chain_options(tmp_path):
    bundle = make_classifier_bundle(tmp_path, device="jetson-orin")
    cache = tmp_path / "cache"

    result = CliRunner().invoke(cli, ["agent", "probe", "--bundle", str(bundle), "--force", "--cache-dir", str(cache)])

    assert result.exit_code == 0, result.output
    assert "chain      TensorrtExecutionProvider -> CUDAExecutionProvider -> CPUExecutionProvider (jetson-orin)" in result.output
    assert f"trt_engine_cache_path={cache / 'tensorrt'}" in result.output
    assert "options    TensorrtExecutionProvider: trt_fp16_enable=True, trt_int8_enable=True" in result.output
    assert "options    CUDAExecutionProvider: cudnn_conv_algo_search=HEURISTIC" in result.output
    assert "skipped  TensorrtExecutionProvider: execution provider TensorrtExecutionProvider is not available" in result.output
    assert "would use  onnxruntime" in result.output


def test_recorded_chain_mismatch_is_reported(tmp_path):
    from edgeopt.agent.selection import recorded_chain_mismatch

    bundle = make_classifier_bundle(tmp_path, device="jetson-orin")
    manifest = load_manifest(bundle)
    profile = load_profile("jetson-orin")
    same = [{"kind": rt.kind, "provider": rt.provider, "options": dict(rt.options)} for rt in profile.runtimes]
    other = [dict(entry) for entry in same]
    other[0] = dict(other[0], options={**other[0]["options"], "trt_int8_enable": False})

    manifest.raw["runtimes"] = same
    assert recorded_chain_mismatch(manifest, profile) is None
    manifest.raw["runtimes"] = other
    message = recorded_chain_mismatch(manifest, profile)
    assert message.startswith("bundle tiny was built for the runtime chain TensorrtExecutionProvider -> CUDAExecutionProvider -> CPUExecutionProvider")
    assert "the agent uses its profile" in message
