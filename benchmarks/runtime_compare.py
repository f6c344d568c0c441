"""Compare ONNX Runtime's CPU execution provider with LiteRT's XNNPACK delegate, side by side.

For EfficientNet-Lite0 the script builds each precision in both formats from the same
PyTorch model and the same calibration photos:

* FP32: the optimised ONNX export, and the litert-torch conversion;
* INT8 static: ONNX Runtime ``quantize_static`` (the rpi5 profile's U8S8 per-channel QDQ
  recipe), and ai-edge-quantizer ``static_wi8_ai8`` (full-integer INT8);
* INT8 dynamic: ONNX Runtime ``quantize_dynamic`` (INT8 per-channel weights), and
  ai-edge-quantizer ``dynamic_wi8_afp32`` (dynamic-range INT8).

Both runtimes get the same thread count and the same batch-1 input. Per precision and thread
count, the script prints p50 and p99 latency of each runtime and the ratio ONNX Runtime p50 /
LiteRT p50 (above 1: LiteRT is faster). It also prints the top-1 agreement of each artifact
with the PyTorch FP32 model on the evaluation photos, so that a fast but wrong artifact shows.

The numbers describe the machine the script runs on. On an x86 host they say little about
an Arm board, where XNNPACK and ONNX Runtime use other kernels.

Usage: ``python benchmarks/runtime_compare.py [--threads 1,2] [--runs 50] [--out DIR]``.
Photos come from ``examples/prepare_photos.py`` (``out/data`` by default; written if missing).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from efficientnet_lite0 import efficientnet_lite0  # noqa: E402

from edgeopt.agent.backends import Backend, LiteRtBackend, OnnxRuntimeBackend, ProviderChoice, measure_latency  # noqa: E402
from edgeopt.builder import export as exporting  # noqa: E402
from edgeopt.builder import litert  # noqa: E402
from edgeopt.builder.data import Dataset  # noqa: E402
from edgeopt.builder.evaluate import run_backend, run_torch  # noqa: E402
from edgeopt.builder.quantize import QuantizationSettings, build_candidate, prepare_for_quantization  # noqa: E402
from edgeopt.devices import load_profile  # noqa: E402
from edgeopt.devices.probe import probe_host  # noqa: E402
from edgeopt.devices.profiles import QuantCandidate  # noqa: E402


@dataclass
class Pair:
    """One precision built in both formats."""

    label: str
    onnx: Path
    tflite: Path


def prepare_data(data_dir: Path) -> tuple[Dataset, Dataset]:
    if not (data_dir / "calib.npy").exists():
        subprocess.run([sys.executable, str(REPO / "examples/prepare_photos.py"), "--out", str(data_dir)], check=True)
    calibration = Dataset({"input": np.load(data_dir / "calib.npy")}, None, str(data_dir / "calib.npy"))
    evaluation = Dataset({"input": np.load(data_dir / "eval.npy")}, None, str(data_dir / "eval.npy"))
    return calibration, evaluation


def build_pairs(workdir: Path, model, calibration: Dataset) -> list[Pair]:
    """Write FP32, INT8 static and INT8 dynamic artifacts in both formats."""
    example = calibration.batch(0, 1)
    source = exporting.export_torch(model, example, ["logits"], workdir / "source.onnx")
    fp32_onnx = exporting.optimize_graph(source, workdir / "fp32.onnx")
    prepared = prepare_for_quantization(fp32_onnx, workdir / "prepared.onnx")

    static = load_profile("rpi5").candidate("int8-u8s8")
    dynamic = QuantCandidate(id="int8-dynamic", precision="int8", method="dynamic", per_channel=True)
    static_onnx = build_candidate(QuantizationSettings(static), fp32_onnx, prepared, workdir / "int8-static.onnx", calibration)
    dynamic_onnx = build_candidate(QuantizationSettings(dynamic), fp32_onnx, prepared, workdir / "int8-dynamic.onnx", calibration)

    fp32_tflite = workdir / "fp32.tflite"
    litert.convert_module(model, example, ["logits"], fp32_tflite)
    litert.quantize_tflite(fp32_tflite, "static", calibration, workdir / "int8-static.tflite")
    litert.quantize_tflite(fp32_tflite, "dynamic", None, workdir / "int8-dynamic.tflite")

    return [
        Pair("FP32", fp32_onnx, fp32_tflite),
        Pair("INT8 static", static_onnx, workdir / "int8-static.tflite"),
        Pair("INT8 dynamic", dynamic_onnx, workdir / "int8-dynamic.tflite"),
    ]


def top1_agreement(backend: Backend, evaluation: Dataset, reference: np.ndarray) -> float:
    outputs = run_backend(backend, evaluation)["logits"]
    return float(np.mean(outputs.argmax(axis=1) == reference.argmax(axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts given to both runtimes")
    parser.add_argument("--runs", type=int, default=50, help="timed batch-1 runs per artifact and thread count")
    parser.add_argument("--data", type=Path, default=REPO / "out/data", help="directory of calib.npy and eval.npy")
    parser.add_argument("--out", type=Path, help="keep the built artifacts here [default: a temporary directory]")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]

    calibration, evaluation = prepare_data(args.data)
    model = efficientnet_lite0()
    reference = run_torch(model, evaluation, ["logits"])["logits"]
    sample = evaluation.batch(0, 1)

    with tempfile.TemporaryDirectory(prefix="edgeopt-runtime-compare-") as scratch:
        workdir = args.out or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        pairs = build_pairs(workdir, model, calibration)

        print(f"EfficientNet-Lite0, batch 1, p50/p99 of {args.runs} runs after 5 warm-up runs")
        print(f"host: {probe_host().describe()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f} at start")
        print(f"top-1 agreement with PyTorch FP32 on {len(evaluation)} evaluation photos ({evaluation.source})")
        print()
        header = f"{'precision':<13} {'threads':>7} | {'ORT CPU p50':>11} {'p99':>8} {'top-1':>6} | {'LiteRT p50':>10} {'p99':>8} {'top-1':>6} | {'ORT/LiteRT':>10}"
        print(header)
        print("-" * len(header))
        for pair in pairs:
            for threads in thread_counts:
                ort_backend = OnnxRuntimeBackend(pair.onnx, [ProviderChoice("CPUExecutionProvider", {})], intra_op_threads=threads)
                tflite_backend = LiteRtBackend(pair.tflite, num_threads=threads)
                ort_latency = measure_latency(ort_backend, sample, runs=args.runs)
                tflite_latency = measure_latency(tflite_backend, sample, runs=args.runs)
                ort_top1 = top1_agreement(ort_backend, evaluation, reference)
                tflite_top1 = top1_agreement(tflite_backend, evaluation, reference)
                ort_backend.close()
                tflite_backend.close()
                print(
                    f"{pair.label:<13} {threads:>7} | {ort_latency.p50_ms:>8.2f} ms {ort_latency.p99_ms:>8.2f} {ort_top1:>6.3f} | "
                    f"{tflite_latency.p50_ms:>7.2f} ms {tflite_latency.p99_ms:>8.2f} {tflite_top1:>6.3f} | "
                    f"{ort_latency.p50_ms / tflite_latency.p50_ms:>9.2f}x"
                )
        print()
        print("ORT/LiteRT above 1 means LiteRT (XNNPACK) is faster on this host.")


if __name__ == "__main__":
    main()
