"""Side-by-side build benchmark for EfficientNet-Lite0 on this host.

One run compares PyTorch eager FP32, ONNX Runtime FP32 and every quantized variant the device
profiles ask for (plus two diagnostic INT8 settings): size, top-1 agreement with the FP32
source and mean KL on real photo crops, host p50/p99 latency, and ratios against ONNX
Runtime FP32. All variants are built and timed with the builder's and the agent's own code.

    python benchmarks/build_efficientnet.py [--data out/data] [--runs 100] [--markdown docs/benchmarks-build.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from edgeopt.agent.backends import OnnxRuntimeBackend, ProviderChoice, measure_latency  # noqa: E402
from edgeopt.builder import export as exporting  # noqa: E402
from edgeopt.builder.data import Dataset  # noqa: E402
from edgeopt.builder.evaluate import compare_outputs, run_backend, run_torch  # noqa: E402
from edgeopt.builder.quantize import QuantizationSettings, build_candidate, prepare_for_quantization  # noqa: E402
from edgeopt.devices.probe import probe_host  # noqa: E402
from edgeopt.devices.profiles import QuantCandidate, list_profiles  # noqa: E402

# Settings no profile ships, run to show what the profile recipes avoid.
DIAGNOSTIC = [
    QuantCandidate(id="diag-u8s8-per-tensor", precision="int8", method="static", per_channel=False, note="per-tensor weights"),
    QuantCandidate(id="diag-u8s8-rr-per-tensor", precision="int8", method="static", per_channel=False, reduce_range=True, note="per-tensor weights, reduce_range"),
]


def _settings_key(candidate: QuantCandidate) -> tuple:
    return (candidate.precision, candidate.method, candidate.quant_format, candidate.activation_type, candidate.weight_type,
            candidate.per_channel, candidate.reduce_range, candidate.activation_symmetric, candidate.weight_symmetric, candidate.calibration)


def collect_variants() -> list[tuple[QuantCandidate, list[str]]]:
    """Return each distinct quantized ONNX variant of the profiles, with the profiles that use it."""
    variants: dict[tuple, tuple[QuantCandidate, list[str]]] = {}
    for profile in list_profiles():
        for candidate in profile.candidates:
            if candidate.format != "onnx" or candidate.method == "none":
                continue
            key = _settings_key(candidate)
            variants.setdefault(key, (candidate, []))[1].append(profile.id)
    for candidate in DIAGNOSTIC:
        variants.setdefault(_settings_key(candidate), (candidate, ["(diagnostic)"]))
    return list(variants.values())


def machine_details() -> str:
    import onnxruntime
    import torch

    facts = probe_host()
    vnni = "avx512_vnni" in facts.cpu_flags or "avx_vnni" in facts.cpu_flags
    return (
        f"{facts.cpu_model or platform.processor()}, {facts.cpu_count or '?'} logical CPUs, "
        f"AVX2 {'yes' if 'avx2' in facts.cpu_flags else 'no'}, VNNI {'yes' if vnni else 'no'}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "out" / "data")
    parser.add_argument("--runs", type=int, default=100, help="timed batch-1 runs per variant")
    parser.add_argument("--markdown", type=Path, help="also write the results table to this Markdown file")
    args = parser.parse_args()

    if not (args.data / "eval.npy").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "prepare_photos.py"), "--out", str(args.data)], check=True)
    calibration = Dataset({"input": np.load(args.data / "calib.npy")}, None, "calib.npy")
    evaluation = Dataset({"input": np.load(args.data / "eval.npy")}, None, "eval.npy")
    sample = evaluation.batch(0, 1)

    from efficientnet_lite0 import efficientnet_lite0

    model = efficientnet_lite0()
    reference = run_torch(model, evaluation, ["logits"])

    import torch

    class Eager:
        def run(self, inputs):
            with torch.no_grad():
                return model(torch.from_numpy(inputs["input"]))

    rows = []
    eager = measure_latency(Eager(), sample, runs=args.runs, max_seconds=60)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    rows.append(("PyTorch eager FP32", "all (source)", state_bytes, 1.0, 0.0, eager))

    with tempfile.TemporaryDirectory(prefix="edgeopt-bench-") as scratch:
        scratch = Path(scratch)
        exporting.export_torch(model, {"input": np.zeros((1, 3, 224, 224), np.float32)}, ["logits"], scratch / "source.onnx")
        fp32 = exporting.optimize_graph(scratch / "source.onnx", scratch / "fp32.onnx")
        prepared = prepare_for_quantization(fp32, scratch / "prepared.onnx")

        def evaluate(label: str, users: str, path: Path) -> None:
            backend = OnnxRuntimeBackend(path, [ProviderChoice("CPUExecutionProvider", {})])
            fidelity = compare_outputs(reference, run_backend(backend, evaluation))
            latency = measure_latency(backend, sample, runs=args.runs, max_seconds=60)
            rows.append((label, users, path.stat().st_size, fidelity.top1_agreement, fidelity.mean_kl, latency))
            print(f"{label:<34} top-1 agreement {fidelity.top1_agreement:.3f}  p50 {latency.p50_ms:6.2f} ms", flush=True)

        evaluate("ONNX Runtime FP32", "all (fallback)", fp32)
        for candidate, users in collect_variants():
            path = scratch / f"{candidate.id}.onnx"
            build_candidate(QuantizationSettings(replace(candidate)), fp32, prepared, path, calibration)
            describe = candidate.id if candidate.method != "static" else (
                f"{candidate.precision} {'S8S8' if candidate.activation_type == 'int8' else 'U8S8'}"
                f"{' sym' if candidate.activation_symmetric else ''} {'per-ch' if candidate.per_channel else 'per-tensor'}"
                f"{' rr' if candidate.reduce_range else ''} {candidate.calibration}"
            )
            evaluate(f"ORT {describe}", ", ".join(users), path)

    base = next(r for r in rows if r[0] == "ONNX Runtime FP32")
    details = machine_details()
    lines = [
        f"Measured {dt.date.today().isoformat()} on {details}.",
        f"Fidelity: {len(evaluation)} random crops of real photos (scikit-image, scikit-learn) against PyTorch eager FP32; "
        f"calibration on {len(calibration)} crops of other photos. Latency: batch 1, p50/p99 of {args.runs} runs after 5 warm-up runs, "
        "ONNX Runtime CPU execution provider with default threads (host-measured: not a prediction for any board).",
        "",
        "| variant | used by | size MiB | size vs ORT FP32 | top-1 agreement | mean KL | p50 ms | p99 ms | speed vs ORT FP32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, users, size, agreement, kl, latency in rows:
        lines.append(
            f"| {label} | {users} | {size / 1024**2:.2f} | {size / base[2]:.2f}x | {agreement:.3f} | {kl:.4f} | "
            f"{latency.p50_ms:.2f} | {latency.p99_ms:.2f} | {base[5].p50_ms / latency.p50_ms:.2f}x |"
        )
    print("\n" + "\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"\nwrote {args.markdown}")


if __name__ == "__main__":
    main()
