"""LiteRT artifacts of EfficientNet-Lite0: conversion, INT8 quantization and the agent's LiteRT backend.

The module fixture converts the pretrained model once with litert-torch and quantizes it with
ai-edge-quantizer (about 30 s on two cores). The tests then run the files through
``LiteRtBackend`` on real photos from scikit-image and scikit-learn.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edgeopt.agent.backends import BackendError, LiteRtBackend, import_litert
from edgeopt.agent.bundle import TensorSpec
from edgeopt.agent.selection import _open_litert, runtime_unavailable_reason
from edgeopt.builder import litert
from edgeopt.builder.data import Dataset
from edgeopt.devices.profiles import RuntimeOption

pytest.importorskip("litert_torch", reason="the tflite-build extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from efficientnet_lite0 import efficientnet_lite0  # noqa: E402
from prepare_photos import center_input, load_photos, random_crops, to_input  # noqa: E402


def photo_data(calibration_crops: int, evaluation_crops: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Return calibration and evaluation crops from disjoint photos, and the whole chelsea photo."""
    rng = np.random.default_rng(seed)
    photos = load_photos()
    names = sorted(photos)
    calibration = [to_input(c) for n in names[0::2] for c in random_crops(photos[n], calibration_crops, rng)]
    evaluation = [to_input(c) for n in names[1::2] for c in random_crops(photos[n], evaluation_crops, rng)]
    return {"calib": np.stack(calibration), "eval": np.stack(evaluation), "chelsea": center_input(photos["chelsea"])[None]}


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """Convert Lite0 to FP32, full-integer INT8 and dynamic-range INT8 .tflite files."""
    root = tmp_path_factory.mktemp("lite0-tflite")
    data = photo_data(calibration_crops=3, evaluation_crops=2)
    model = efficientnet_lite0()
    calibration = Dataset({"input": data["calib"]}, None, "photos")

    fp32 = root / "fp32.tflite"
    litert.convert_module(model, {"input": data["chelsea"]}, ["logits"], fp32)
    static = root / "int8.tflite"
    static_recipe = litert.quantize_tflite(fp32, "static", calibration, static, threads=2)
    dynamic = root / "int8-dynamic.tflite"
    dynamic_recipe = litert.quantize_tflite(fp32, "dynamic", None, dynamic)
    return {
        "model": model,
        "data": data,
        "fp32": fp32,
        "static": static,
        "dynamic": dynamic,
        "static_recipe": static_recipe,
        "dynamic_recipe": dynamic_recipe,
    }


def test_fp32_matches_torch(lite0):
    backend = LiteRtBackend(lite0["fp32"], num_threads=2)
    x = np.concatenate([lite0["data"]["chelsea"], lite0["data"]["eval"][:6]])
    expected = torch_logits(lite0["model"], x)

    got = backend.run({"input": x})["logits"]

    assert got.dtype == np.float32
    assert np.max(np.abs(got - expected)) < 1e-3 * np.max(np.abs(expected))
    assert np.array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    backend.close()


def test_signature_uses_manifest_names(lite0):
    backend = LiteRtBackend(lite0["fp32"])
    assert backend.inputs == [TensorSpec("input", "FP32", (-1, 3, 224, 224))]
    assert backend.outputs == [TensorSpec("logits", "FP32", (-1, 1000))]
    assert backend.runtime.startswith("LiteRT (ai-edge-litert ")
    assert "XNNPACK delegate" in backend.runtime
    backend.close()


def test_full_integer_quantizes_io(lite0):
    interpreter = import_litert().interpreter.Interpreter(model_path=str(lite0["static"]))
    runner = interpreter.get_signature_runner()
    assert runner.get_input_details()["input"]["dtype"] == np.int8
    assert runner.get_output_details()["logits"]["dtype"] == np.int8

    backend = LiteRtBackend(lite0["static"], num_threads=2)
    assert backend.inputs[0].datatype == "FP32"
    chelsea = lite0["data"]["chelsea"]
    got = backend.run({"input": chelsea})["logits"][0]
    expected = torch_logits(lite0["model"], chelsea)[0]

    assert got.dtype == np.float32
    cosine = float(got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)))
    assert cosine > 0.5
    assert lite0["static_recipe"]["recipe"] == "static_wi8_ai8"
    assert lite0["static_recipe"]["calibration_samples"] == len(lite0["data"]["calib"])
    backend.close()


def test_dynamic_range_keeps_top1(lite0):
    backend = LiteRtBackend(lite0["dynamic"], num_threads=2)
    chelsea = lite0["data"]["chelsea"]

    got = backend.run({"input": chelsea})["logits"]

    assert backend.inputs[0].datatype == "FP32"
    assert got.argmax() == torch_logits(lite0["model"], chelsea).argmax()
    assert lite0["dynamic"].stat().st_size < 0.35 * lite0["fp32"].stat().st_size
    assert lite0["dynamic_recipe"]["recipe"] == "dynamic_wi8_afp32"
    assert "calibration_samples" not in lite0["dynamic_recipe"]
    backend.close()


def representable_range(details: dict) -> tuple[float, float, float]:
    """Return the float min, max and step of an int8 signature tensor."""
    scale, zero_point = details["quantization"]
    return (-128 - zero_point) * scale, (127 - zero_point) * scale, scale


def test_full_integer_ranges_cover_calibration(lite0):
    runner = import_litert().interpreter.Interpreter(model_path=str(lite0["static"])).get_signature_runner()
    calibration = lite0["data"]["calib"]
    logits = torch_logits(lite0["model"], calibration)

    input_low, input_high, input_step = representable_range(runner.get_input_details()["input"])
    output_low, output_high, output_step = representable_range(runner.get_output_details()["logits"])

    # Min/max calibration keeps every calibration value representable (up to zero-point rounding).
    assert input_low <= float(calibration.min()) + input_step
    assert input_high >= float(calibration.max()) - input_step
    assert output_low <= float(logits.min()) + output_step
    assert output_high >= float(logits.max()) - output_step
    assert lite0["static_recipe"]["calibration"] == "minmax"


def test_full_integer_io_matches_manual_quantization(lite0):
    runner = import_litert().interpreter.Interpreter(model_path=str(lite0["static"])).get_signature_runner()
    input_scale, input_zero_point = runner.get_input_details()["input"]["quantization"]
    output_scale, output_zero_point = runner.get_output_details()["logits"]["quantization"]
    x = lite0["data"]["eval"][:2]

    quantized = np.clip(np.round(x / input_scale) + input_zero_point, -128, 127).astype(np.int8)
    raw = np.concatenate([runner(input=quantized[i : i + 1])["logits"] for i in range(len(x))])
    expected = (raw.astype(np.float32) - output_zero_point) * np.float32(output_scale)
    backend = LiteRtBackend(lite0["static"], num_threads=2)
    got = backend.run({"input": x})["logits"]
    backend.close()

    assert np.array_equal(got, expected)


@pytest.fixture(scope="module")
def digits_tflite(tmp_path_factory):
    """Convert the small digits CNN to FP32 .tflite; return it with its model and calibration digits."""
    from tiny_cnn import digits_arrays, tiny_cnn

    root = tmp_path_factory.mktemp("digits-tflite")
    x, _ = digits_arrays()
    model = tiny_cnn()
    fp32 = root / "fp32.tflite"
    litert.convert_module(model, {"input": x[:1]}, ["logits"], fp32)
    # Samples 0-999 trained the model.
    return {"root": root, "model": model, "fp32": fp32, "calib": x[1000:1064]}


def test_static_int8_tracks_fp32_on_calibration(digits_tflite):
    calibration = digits_tflite["calib"]
    static = digits_tflite["root"] / "int8.tflite"
    litert.quantize_tflite(digits_tflite["fp32"], "static", Dataset({"input": calibration}, None, "digits"), static, threads=1)
    runner = import_litert().interpreter.Interpreter(model_path=str(static)).get_signature_runner()
    _, _, output_step = representable_range(runner.get_output_details()["logits"])
    expected = torch_logits(digits_tflite["model"], calibration)

    backend = LiteRtBackend(static, num_threads=1)
    got = backend.run({"input": calibration})["logits"]
    backend.close()

    # A moving average of per-sample ranges clips the widest samples by dozens of steps.
    max_error_steps = float(np.max(np.abs(got - expected))) / output_step
    assert max_error_steps < 3


def test_static_calibration_ignores_order(digits_tflite):
    calibration = digits_tflite["calib"]
    forward = digits_tflite["root"] / "forward.tflite"
    reverse = digits_tflite["root"] / "reverse.tflite"

    litert.quantize_tflite(digits_tflite["fp32"], "static", Dataset({"input": calibration}, None, "digits"), forward, threads=1)
    litert.quantize_tflite(digits_tflite["fp32"], "static", Dataset({"input": calibration[::-1]}, None, "digits"), reverse, threads=1)

    assert forward.read_bytes() == reverse.read_bytes()


def test_batch_equals_single_runs(lite0):
    backend = LiteRtBackend(lite0["fp32"], num_threads=2)
    x = lite0["data"]["eval"][:4]

    batched = backend.run({"input": x})["logits"]
    single = np.concatenate([backend.run({"input": x[i : i + 1]})["logits"] for i in range(len(x))])

    assert batched.shape == (4, 1000)
    assert np.array_equal(batched, single)
    backend.close()


def test_concurrent_runs_match_serial(lite0):
    backend = LiteRtBackend(lite0["fp32"], num_threads=1)
    x = lite0["data"]["eval"][:3]
    expected = [backend.run({"input": x[i : i + 1]})["logits"] for i in range(3)]
    results: dict[int, np.ndarray] = {}
    errors = []

    def work(index: int) -> None:
        try:
            results[index] = backend.run({"input": x[index : index + 1]})["logits"]
        except BackendError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    for index in range(3):
        assert np.array_equal(results[index], expected[index])
    backend.close()


def test_wrong_shape_names_input(lite0):
    backend = LiteRtBackend(lite0["fp32"])
    with pytest.raises(BackendError) as info:
        backend.run({"input": np.zeros((1, 3, 100, 100), np.float32)})
    assert "input 'input' has shape [1, 3, 100, 100], expected [-1, 3, 224, 224]" in str(info.value)


def test_missing_input_is_backend_error(lite0):
    backend = LiteRtBackend(lite0["fp32"])
    with pytest.raises(BackendError) as info:
        backend.run({"pixels": lite0["data"]["chelsea"]})
    assert "needs input 'input'" in str(info.value)


def test_closed_backend_rejects_runs(lite0):
    backend = LiteRtBackend(lite0["fp32"])
    backend.close()
    with pytest.raises(BackendError) as info:
        backend.run({"input": lite0["data"]["chelsea"]})
    assert "closed" in str(info.value)


def test_profile_threads_reach_interpreter(lite0):
    backend = _open_litert(RuntimeOption(kind="litert", options={"num_threads": 3}), lite0["fp32"], Path("/nonexistent"), 1)
    assert backend.num_threads == 3
    assert "3 threads" in backend.runtime
    backend.close()


def test_unknown_litert_option_rejected(lite0):
    with pytest.raises(BackendError) as info:
        _open_litert(RuntimeOption(kind="litert", options={"threads": 2}), lite0["fp32"], Path("/nonexistent"), None)
    assert "unknown LiteRT option(s) threads" in str(info.value)
    assert "num_threads" in str(info.value)


def test_xnnpack_off_still_runs(lite0):
    backend = LiteRtBackend(lite0["fp32"], num_threads=2, xnnpack=False)
    chelsea = lite0["data"]["chelsea"]
    assert "XNNPACK off" in backend.runtime
    assert backend.run({"input": chelsea})["logits"].argmax() == torch_logits(lite0["model"], chelsea).argmax()
    backend.close()


def test_import_falls_back_to_tflite_runtime(monkeypatch):
    interpreter_module = import_litert().interpreter
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    # tflite-runtime exposes the same interpreter module API as ai-edge-litert.
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", interpreter_module)

    found = import_litert()

    assert found.package == "tflite-runtime"
    assert found.interpreter is interpreter_module


def test_missing_litert_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)

    reason = runtime_unavailable_reason(RuntimeOption(kind="litert"))

    assert reason.startswith("LiteRT is not installed")
    assert "pip install 'edgeopt[litert]'" in reason
    assert litert.tflite_unavailable_reason().startswith("cannot evaluate .tflite files on this host")


def test_unknown_quantization_method(lite0, tmp_path):
    with pytest.raises(litert.TfliteBuildError) as info:
        litert.quantize_tflite(lite0["fp32"], "fp16", None, tmp_path / "x.tflite")
    assert "'fp16' is not supported" in str(info.value)
    assert not (tmp_path / "x.tflite").exists()


def test_static_without_calibration(lite0, tmp_path):
    with pytest.raises(litert.TfliteBuildError) as info:
        litert.quantize_tflite(lite0["fp32"], "static", None, tmp_path / "x.tflite")
    assert "needs calibration data" in str(info.value)


def test_agent_litert_imports_no_torch(lite0):
    import subprocess

    code = (
        "import sys\n"
        "from edgeopt.agent.backends import LiteRtBackend\n"
        "import edgeopt.agent.selection\n"
        f"LiteRtBackend({str(lite0['fp32'])!r}).close()\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'jax', 'litert_torch') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
