"""Prune, distill and quantize the digits CNN side by side, in one run.

Candidates are the FP32 teacher and four kinds of 50 % channel pruning: with no retraining,
fine-tuned on labels without a teacher, and with knowledge distillation (KD). The KD student is
then quantized three ways: ONNX Runtime static INT8 PTQ, quantization-aware training on labels
(QAT) and quantization-aware distillation from the teacher (QAD).

Every candidate is exported to ONNX and measured the same way: top-1 accuracy on the fixed
360-image test split and agreement with the teacher (ONNX Runtime, CPU), MACs and parameters
counted on the exported graph, file size, and host latency (ONNX Runtime CPU execution
provider, one intra-op thread, batch 1, p50/p99 over repeated runs through the agent's backend).

Targets checked at the end: prune 50 % + KD has at least 45 % fewer MACs than the teacher and
loses at most 1 accuracy point. Results go to ``--out`` as JSON and a Pareto plot (PNG).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from digits.prepare_data import write_split  # noqa: E402
from digits.train_teacher import TEACHER_CONFIG, load_teacher, train_teacher  # noqa: E402

from edgeopt.agent.backends import OnnxRuntimeBackend, ProviderChoice, measure_latency  # noqa: E402
from edgeopt.builder.distill import DistillConfig, distill, finetune  # noqa: E402
from edgeopt.builder.macs import count_onnx_cost  # noqa: E402
from edgeopt.builder.pareto import Candidate, plot_pareto  # noqa: E402
from edgeopt.builder.prune import prune_model  # noqa: E402
from edgeopt.builder.qat import QatConfig, export_qdq_onnx, prepare_qat, train_qat  # noqa: E402
from edgeopt.builder.traindata import TrainData, load_train_data  # noqa: E402

log = logging.getLogger("prune_distill_digits")

PRUNE_RATIO = 0.5
TARGET_MACS_REDUCTION = 0.45
TARGET_MAX_ACCURACY_DROP = 0.01
EXAMPLE = torch.zeros(1, 1, 8, 8)
INPUT_NAME, OUTPUT_NAME = "input", "logits"

# The same budget for fine-tuning and distillation, so the table isolates what the teacher adds.
RETRAIN_CONFIG = DistillConfig(temperature=4.0, alpha=0.7, epochs=60, lr=2e-3, batch_size=64, patience=15, seed=0)
QAT_CONFIG = QatConfig(DistillConfig(temperature=4.0, alpha=0.7, epochs=10, lr=2e-4, batch_size=64, patience=5, seed=0), observer_freeze_epoch=4)


@dataclass
class Row:
    """Measured figures of one candidate."""

    name: str
    accuracy: float
    agreement: float
    macs: int
    parameters: int
    size_bytes: int
    latency_p50_ms: float
    latency_p99_ms: float
    latency_runs: int


def export_fp32(model: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (EXAMPLE,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return path


def quantize_ptq(fp32_path: Path, calibration: np.ndarray, path: Path) -> Path:
    """Quantize with ONNX Runtime static PTQ: QDQ, uint8 activations, int8 per-channel weights, MinMax calibration."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 32)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepared = path.with_name(path.stem + "_prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(
        str(prepared),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    prepared.unlink()
    return path


def measure(name: str, path: Path, test: TrainData, teacher_predictions: np.ndarray | None, runs: int) -> Row:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {INPUT_NAME: test.x})
    predictions = logits.argmax(1)
    reference = predictions if teacher_predictions is None else teacher_predictions

    backend = OnnxRuntimeBackend(path, [ProviderChoice("CPUExecutionProvider", {})], intra_op_threads=1)
    latency = measure_latency(backend, {INPUT_NAME: test.x[:1]}, runs=runs, warmup=max(20, runs // 20))
    backend.close()

    cost = count_onnx_cost(path)
    row = Row(
        name=name,
        accuracy=float((predictions == test.y).mean()),
        agreement=float((predictions == reference).mean()),
        macs=cost.macs_per_sample,
        parameters=cost.parameters,
        size_bytes=path.stat().st_size,
        latency_p50_ms=latency.p50_ms,
        latency_p99_ms=latency.p99_ms,
        latency_runs=latency.runs,
    )
    log.info("measured %s: accuracy %.4f, %d MACs, p50 %.4f ms", name, row.accuracy, row.macs, row.latency_p50_ms)
    return row


def print_table(rows: list[Row]) -> None:
    teacher = rows[0]
    header = f"{'candidate':<34} {'test acc':>8} {'Δ pts':>6} {'agree':>6} {'MACs':>10} {'MACs x':>6} {'params':>8} {'size KB':>8} {'p50 ms':>8} {'p99 ms':>8} {'speedup':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.name:<34} {100 * row.accuracy:>7.2f}% {100 * (row.accuracy - teacher.accuracy):>+6.2f} "
            f"{100 * row.agreement:>5.1f}% {row.macs:>10,} {row.macs / teacher.macs:>6.2f} {row.parameters:>8,} "
            f"{row.size_bytes / 1024:>8.1f} {row.latency_p50_ms:>8.4f} {row.latency_p99_ms:>8.4f} "
            f"{teacher.latency_p50_ms / row.latency_p50_ms:>6.2f}x"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench-prune-digits"), help="output folder")
    parser.add_argument("--teacher", type=Path, help="reuse a teacher.pt from examples/digits/train_teacher.py instead of training one")
    parser.add_argument("--latency-runs", type=int, default=2000, help="timed runs per candidate (default: 2000)")
    parser.add_argument("--quick", action="store_true", help="few epochs, for a smoke run; the targets are not expected to hold")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_split(out)
    train, val, test = (load_train_data(out / f"{name}.npz") for name in ("train", "val", "test"))

    retrain, qat = RETRAIN_CONFIG, QAT_CONFIG
    teacher_config = TEACHER_CONFIG
    if args.quick:
        retrain = DistillConfig(**{**vars(retrain), "epochs": 3})
        qat = QatConfig(DistillConfig(**{**vars(qat.train), "epochs": 2}), observer_freeze_epoch=2)
        teacher_config = DistillConfig(**{**vars(teacher_config), "epochs": 5})

    if args.teacher:
        teacher = load_teacher(args.teacher)
    else:
        teacher, _ = train_teacher(out, progress=True, config=teacher_config)
    teacher.eval()
    with torch.no_grad():
        teacher_test = teacher(torch.from_numpy(test.x)).argmax(1).numpy()

    paths: dict[str, Path] = {"teacher FP32": export_fp32(teacher, out / "teacher.onnx")}

    pruned = prune_model(teacher, EXAMPLE, ratio=PRUNE_RATIO, importance="l2")
    paths["prune 50%, no retraining"] = export_fp32(pruned.model, out / "pruned_raw.onnx")

    torch.manual_seed(0)
    finetuned = prune_model(teacher, EXAMPLE, ratio=PRUNE_RATIO).model
    finetune(finetuned, train, val, retrain)
    paths["prune 50% + fine-tune (no KD)"] = export_fp32(finetuned, out / "pruned_finetuned.onnx")

    torch.manual_seed(0)
    distilled = prune_model(teacher, EXAMPLE, ratio=PRUNE_RATIO).model
    distill(distilled, teacher, train, val, retrain)
    paths["prune 50% + KD"] = export_fp32(distilled, out / "pruned_kd.onnx")

    paths["prune 50% + KD + INT8 PTQ"] = quantize_ptq(paths["prune 50% + KD"], train.x[:512], out / "pruned_kd_ptq.onnx")

    qat_student = train_qat(prepare_qat(distilled, EXAMPLE), train, val, qat).student
    paths["prune 50% + KD + QAT"] = export_qdq_onnx(qat_student, EXAMPLE, out / "pruned_kd_qat.onnx", INPUT_NAME, OUTPUT_NAME).path

    qad_student = train_qat(prepare_qat(distilled, EXAMPLE), train, val, qat, teacher=teacher).student
    paths["prune 50% + KD + QAD"] = export_qdq_onnx(qad_student, EXAMPLE, out / "pruned_kd_qad.onnx", INPUT_NAME, OUTPUT_NAME).path

    rows = [measure(name, path, test, teacher_test, args.latency_runs) for name, path in paths.items()]

    print()
    print(f"digits test split: {len(test)} images; host: {platform.processor() or platform.machine()}, "
          f"{platform.system()} {platform.release()}, onnxruntime {ort.__version__}, torch {torch.__version__}")
    print("latency: ONNX Runtime CPUExecutionProvider, 1 intra-op thread, batch 1")
    print_table(rows)

    kd = next(r for r in rows if r.name == "prune 50% + KD")
    plain = next(r for r in rows if r.name == "prune 50% + fine-tune (no KD)")
    teacher_row = rows[0]
    macs_reduction = 1 - kd.macs / teacher_row.macs
    accuracy_drop = teacher_row.accuracy - kd.accuracy
    macs_ok = macs_reduction >= TARGET_MACS_REDUCTION
    accuracy_ok = accuracy_drop <= TARGET_MAX_ACCURACY_DROP + 1e-9
    print()
    print(f"KD over fine-tune only: {100 * (kd.accuracy - plain.accuracy):+.2f} accuracy points, "
          f"{100 * (kd.agreement - plain.agreement):+.2f} agreement points")
    print(f"target MACs reduction >= {TARGET_MACS_REDUCTION:.0%}: {macs_reduction:.1%} -> {'PASS' if macs_ok else 'FAIL'}")
    print(f"target accuracy drop <= {100 * TARGET_MAX_ACCURACY_DROP:.0f} point: {100 * accuracy_drop:.2f} -> {'PASS' if accuracy_ok else 'FAIL'}")

    plot_pareto(
        [Candidate(r.name, r.latency_p50_ms, 100 * r.accuracy) for r in rows],
        out / "pareto.png",
        score_label="test top-1 accuracy (%)",
        latency_label="host latency p50 (ms, ONNX Runtime CPU, 1 thread, batch 1)",
        title="digits CNN: prune, distill, quantize",
    )
    results = {
        "host": {"machine": platform.machine(), "processor": platform.processor(), "system": f"{platform.system()} {platform.release()}"},
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "quick": args.quick,
        "rows": [asdict(r) for r in rows],
        "macs_reduction": macs_reduction,
        "accuracy_drop": accuracy_drop,
        "targets_met": macs_ok and accuracy_ok,
        "seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'results.json'} and {out / 'pareto.png'} in {time.perf_counter() - started:.0f} s")
    return 0 if (macs_ok and accuracy_ok) or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
