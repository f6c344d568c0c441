"""Student candidates: the source model pruned, distilled or trained with fake quantization.

``edgeopt build --prune/--target-macs/--distill/--qat`` adds these candidates next to the
profile's post-training candidates. Each one is exported to ONNX and goes through the same
evaluation, fidelity gate, winner choice, report and bundle:

- ``pruned50-fp32`` (no retraining), ``pruned50-ft-fp32`` (fine-tuned on labels) or
  ``pruned50-kd-fp32`` (distilled from the source): the pruned FP32 graph;
- ``pruned50-kd-<profile candidate>``: the profile's ONNX post-training quantization candidates
  (static and dynamic INT8, FP16) applied to that pruned graph;
- ``qat-int8``/``qad-int8``, or ``pruned50-qat-int8``/``pruned50-qad-int8`` after pruning: the QDQ
  export of quantization-aware training on labels (QAT) or distillation from the source (QAD).

Every student candidate records the stages it went through in ``CandidateResult.stages``
(``prune``, ``distillation``, ``qat``), which the manifest's recipe and the report show.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeopt.builder.errors import BuildInputError
from edgeopt.builder.modelspec import ModelSpec

if TYPE_CHECKING:
    from edgeopt.builder.pipeline import BuildContext, CandidateResult, Progress
    from edgeopt.builder.traindata import TrainData

log = logging.getLogger(__name__)

# Fake-quantized training starts from an already trained model, so it takes smaller steps.
QAT_LR_SCALE = 0.1
# Taylor importance accumulates gradients over this many training batches.
TAYLOR_BATCHES = 8
SPLIT_SEED = 0
TRAINING_SEED = 0


@dataclass
class StudentOptions:
    """Pruning, distillation and quantization-aware training settings of ``edgeopt build``."""

    prune_ratio: float | None = None  # fraction of channels removed per layer group
    target_macs: int | None = None  # prune until one forward pass needs at most this many MACs
    importance: str = "l2"
    keep: tuple[str, ...] = ()  # module names whose output channels stay
    round_to: int | None = None  # keep channel counts at multiples of this
    distill: bool = False
    qat: bool = False
    train_data: Path | None = None
    val_fraction: float = 0.1
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    patience: int = 5
    temperature: float = 4.0
    alpha: float = 0.7
    feature_weight: float = 0.0
    feature_layers: tuple[tuple[str, str], ...] = ()  # (student module, teacher module) pairs
    freeze_batchnorm: bool = False  # keep BatchNorm running statistics fixed while training

    @property
    def prunes(self) -> bool:
        return self.prune_ratio is not None or self.target_macs is not None

    @property
    def enabled(self) -> bool:
        return self.prunes or self.distill or self.qat

    def check(self) -> None:
        """Raise BuildInputError for a combination of options that cannot run."""
        if self.prune_ratio is not None and self.target_macs is not None:
            raise BuildInputError(
                f"--prune {self.prune_ratio} and --target-macs {self.target_macs} both set the pruning amount: give only one"
            )
        if self.prune_ratio is not None and not 0.0 < self.prune_ratio < 1.0:
            raise BuildInputError(f"--prune {self.prune_ratio} is outside (0, 1): give the fraction of channels to remove, e.g. 0.5")
        if self.target_macs is not None and self.target_macs <= 0:
            raise BuildInputError(f"--target-macs {self.target_macs} is invalid: give a positive number of multiply-accumulates per sample")
        if self.train_data is None:
            for flag, needed in (("--distill", self.distill), ("--qat", self.qat)):
                if needed:
                    raise BuildInputError(f"{flag} needs training data: add --train-data PATH (an .npz with x and y, or an image folder)")
        elif not self.enabled:
            raise BuildInputError(f"--train-data {self.train_data} is used only by --prune, --target-macs, --distill or --qat: add one of them")
        if self.distill and not (self.prunes or self.qat):
            raise BuildInputError("--distill needs a student: add --prune RATIO or --target-macs N (or --qat for quantization-aware distillation)")
        if self.feature_weight and not self.distill:
            raise BuildInputError(f"--feature-loss {self.feature_weight} weights a distillation loss: add --distill")
        if self.feature_layers and not self.feature_weight:
            raise BuildInputError("--feature-layer needs --feature-loss W with W > 0, e.g. --feature-loss 1.0")
        if not 0.0 < self.val_fraction < 1.0:
            raise BuildInputError(f"--val-fraction {self.val_fraction} is outside (0, 1): give the share of --train-data held out, e.g. 0.1")


def check_source(spec: ModelSpec) -> None:
    """Raise BuildInputError unless ``spec`` names a model that Torch-Pruning and torch.fx can rewrite."""
    if spec.kind == "onnx":
        raise BuildInputError(
            f"--prune, --distill and --qat train the PyTorch model, and {spec.raw} is an ONNX file: "
            "pass the model as a factory 'file.py:function' or 'package.module:function'"
        )
    if spec.kind == "torchscript":
        raise BuildInputError(
            f"--prune, --distill and --qat rewrite the model's Python modules, which the TorchScript file {spec.raw} lacks: "
            "pass the model as a factory 'file.py:function' or 'package.module:function'"
        )


@dataclass
class _Student:
    """The current student model and the stages that produced it."""

    model: object  # torch.nn.Module
    pruning: str = ""  # candidate id part from pruning, e.g. "pruned50"; empty without pruning
    retraining: str = ""  # "kd" (distilled) or "ft" (fine-tuned on labels); empty without retraining
    stages: dict = dataclasses.field(default_factory=dict)

    @property
    def prefix(self) -> str:
        """Candidate id prefix, e.g. ``pruned50-kd``."""
        return "-".join(part for part in (self.pruning, self.retraining) if part)


def add_student_candidates(context: "BuildContext", progress: "Progress") -> None:
    """Prune, distill and train the source model as ``context.options.student`` requests, and evaluate each result."""
    options = context.options.student
    if options is None or not options.enabled:
        return
    options.check()
    check_source(context.source.spec)
    _check_model_io(context, options)

    train, val = _load_training_data(context, options, progress)

    import torch

    input_name = context.input_specs[0].name
    example = torch.from_numpy(np.ascontiguousarray(context.evaluation.batch(0, 1)[input_name]))
    workdir = context.workdir / "students"
    workdir.mkdir()
    teacher = context.source.module
    student = _Student(model=teacher)

    # Students are meant to differ from the source, so with labels their gate is accuracy.
    context.gate_on_accuracy = True
    try:
        _add_students(context, options, progress, train, val, example, workdir, teacher, student)
    finally:
        context.gate_on_accuracy = False


def _add_students(context, options, progress, train, val, example, workdir: Path, teacher, student: "_Student") -> None:
    """Build the pruned (and retrained) candidates, then the QAT or QAD candidate."""
    if options.prunes:
        with _failure_recorded(context, _pruning_id(options)):
            student = _prune(context, options, progress, teacher, example, train)
            if train is not None:
                student = _retrain(context, options, progress, student, teacher, train, val)
            _add_pruned_candidates(context, progress, student, example, workdir)

    if not options.qat:
        return
    if options.prunes and not student.pruning:
        context.skipped.append(f"{_qat_id(options, student)}: not trained because pruning failed")
        return
    with _failure_recorded(context, _qat_id(options, student)):
        _add_qat_candidate(context, options, progress, student, teacher, example, train, val, workdir)


@contextlib.contextmanager
def _failure_recorded(context: "BuildContext", candidate_id: str) -> Iterator[None]:
    """Record an unexpected error as a build failure of ``candidate_id`` and go on; bad input still aborts the build."""
    from edgeopt.builder.distill import DistillError
    from edgeopt.builder.prune import PruneError
    from edgeopt.builder.qat import QatError
    from edgeopt.builder.traindata import TrainDataError

    try:
        yield
    except (BuildInputError, PruneError, DistillError, TrainDataError, QatError):
        raise
    except Exception as exc:  # a pruner, trainer or exporter bug costs these candidates, not the build
        log.error("candidate %s could not be built: %s: %s", candidate_id, type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        context.build_failures[candidate_id] = f"{type(exc).__name__}: {exc}"


def _check_model_io(context: "BuildContext", options: StudentOptions) -> None:
    if len(context.input_specs) != 1 or len(context.output_specs) != 1:
        raise BuildInputError(
            f"--prune, --distill and --qat support models with one input and one output; this model has "
            f"{len(context.input_specs)} inputs and {len(context.output_specs)} outputs"
        )
    if options.qat and not context.profile.runtimes_for("onnx", "int8"):
        raise BuildInputError(f"device {context.profile.id} runs no INT8 ONNX model, so a --qat candidate could not ship: drop --qat")


def _load_training_data(context: "BuildContext", options: StudentOptions, progress) -> tuple["TrainData | None", "TrainData | None"]:
    """Load ``--train-data``, check that it fits the model and the stages, and split off the validation share."""
    if options.train_data is None:
        return None, None
    from edgeopt.builder.traindata import load_train_data

    with progress.step(f"loading training data {options.train_data}"):
        data = load_train_data(options.train_data, context.preprocess)
    expected = tuple(context.evaluation.inputs[context.input_specs[0].name].shape[1:])
    if tuple(data.x.shape[1:]) != expected:
        raise BuildInputError(
            f"--train-data {options.train_data}: samples have shape {'x'.join(map(str, data.x.shape[1:]))}, "
            f"the model input is N x {'x'.join(map(str, expected))}: preprocess the training data like the evaluation data"
        )

    if not data.labeled:
        if options.qat and not options.distill:
            raise BuildInputError(
                f"--qat on unlabeled --train-data {options.train_data} has no loss to train on: "
                "add --distill (quantization-aware distillation from the source model) or labels y"
            )
        if options.prunes and not options.distill:
            raise BuildInputError(
                f"fine-tuning the pruned model needs labels, and --train-data {options.train_data} has none: "
                "add --distill to train it against the source model"
            )
    else:
        classes = context.reference[context.output_specs[0].name].shape[-1]
        if int(data.y.min()) < 0 or int(data.y.max()) >= classes:
            raise BuildInputError(
                f"--train-data {options.train_data}: labels range {int(data.y.min())}..{int(data.y.max())}, "
                f"but the model has {classes} classes: store class indexes 0..{classes - 1}"
            )

    train, val = data.split(options.val_fraction, seed=SPLIT_SEED)
    log.info("training data %s: %d train, %d validation samples", options.train_data, len(train), len(val))
    return train, val


def _prune(context, options: StudentOptions, progress, teacher, example, train) -> _Student:
    from edgeopt.builder.prune import prune_model

    calibration = None
    if options.importance == "taylor" and train is not None:
        calibration = _taylor_batches(train, options.batch_size)
    amount = f"{options.prune_ratio:.0%} of the channels" if options.prune_ratio is not None else f"to {options.target_macs:,} MACs"
    with progress.step(f"pruning {amount} ({options.importance} importance)"):
        result = prune_model(
            teacher,
            example,
            ratio=options.prune_ratio,
            target_macs=options.target_macs,
            importance=options.importance,
            keep=options.keep,
            calibration=calibration,
            round_to=options.round_to,
        )
    summary = {**result.summary(), "round_to": options.round_to, "macs_counted_by": "forward hooks on conv and linear modules, batch 1"}
    return _Student(model=result.model, pruning=_pruning_id(options), stages={"prune": summary})


def _pruning_id(options: StudentOptions) -> str:
    if options.prune_ratio is not None:
        return f"pruned{round(options.prune_ratio * 100)}"
    return f"pruned-{_short_count(options.target_macs)}macs"


def _qat_id(options: StudentOptions, student: _Student) -> str:
    """Return e.g. ``qat-int8``, or ``pruned50-qad-int8`` for quantization-aware distillation of a pruned student."""
    return "-".join(part for part in (student.pruning, "qad" if options.distill else "qat", "int8") if part)


def _taylor_batches(train: "TrainData", batch_size: int) -> list:
    import torch

    batches = []
    for start in range(0, min(len(train), TAYLOR_BATCHES * batch_size), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(train.x[start : start + batch_size]))
        y = None if train.y is None else torch.from_numpy(np.ascontiguousarray(train.y[start : start + batch_size]))
        batches.append(x if y is None else (x, y))
    return batches


def _short_count(value: int) -> str:
    for divisor, suffix in ((10**9, "g"), (10**6, "m"), (10**3, "k")):
        if value >= divisor:
            return f"{value / divisor:.3g}{suffix}"
    return str(value)


def _training_config(options: StudentOptions, progress_bar, lr_scale: float = 1.0):
    from edgeopt.builder.distill import DistillConfig

    return DistillConfig(
        temperature=options.temperature,
        alpha=options.alpha,
        feature_weight=options.feature_weight,
        feature_layers=options.feature_layers,
        epochs=options.epochs,
        lr=options.lr * lr_scale,
        batch_size=options.batch_size,
        patience=options.patience,
        seed=TRAINING_SEED,
        freeze_batchnorm=options.freeze_batchnorm,
        progress=progress_bar is not None,
    )


def _training_recipe(mode: str, context, options: StudentOptions, config, result, train, val) -> dict:
    """Describe one training run for the manifest: loss, settings, data and the per-epoch history."""
    recipe = {
        "mode": mode,
        "teacher": context.source.spec.raw if mode in ("distillation", "quantization-aware distillation") else None,
        "epochs": config.epochs,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "optimizer": "AdamW with cosine learning-rate decay",
        "batch_size": config.batch_size,
        "patience": config.patience,
        "seed": config.seed,
        "freeze_batchnorm": config.freeze_batchnorm,
        "train_data": str(options.train_data),
        "train_samples": len(train),
        "val_samples": len(val),
        "val_fraction": options.val_fraction,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "best_val_score": round(float(result.best_score), 6),
        "val_score": result.score_name,
        "stopped_early": result.stopped_early,
        "history": [{key: round(float(value), 6) for key, value in record.items()} for record in result.history_dicts()],
    }
    if recipe["teacher"] is not None:
        recipe.update(
            {
                "temperature": config.temperature,
                "alpha": config.alpha,
                "loss": "alpha * T^2 * KL(teacher || student) on softened logits"
                + (" + (1 - alpha) * cross-entropy on labels" if train.labeled else "")
                + (" + feature MSE" if config.feature_weight else ""),
                "feature_weight": config.feature_weight,
                "feature_layers": [list(pair) for pair in config.feature_layers],
            }
        )
    else:
        recipe["loss"] = "cross-entropy on labels"
    return recipe


def _rich_bar(progress):
    """Return the running rich progress display of ``progress`` (the CLI's), or None for silent builds."""
    return getattr(progress, "progress", None)


def _retrain(context, options: StudentOptions, progress, student: _Student, teacher, train, val) -> _Student:
    """Distill the pruned student from the source model, or fine-tune it on labels without --distill."""
    from edgeopt.builder.distill import distill, finetune

    bar = _rich_bar(progress)
    config = _training_config(options, bar)
    if options.distill:
        mode, tag = "distillation", "kd"
        with progress.step(f"distilling {student.prefix} from the source model ({config.epochs} epochs at most)"):
            result = distill(student.model, teacher, train, val, config, progress_bar=bar)
    else:
        mode, tag = "fine-tuning", "ft"
        with progress.step(f"fine-tuning {student.prefix} on labels ({config.epochs} epochs at most)"):
            result = finetune(student.model, train, val, config, progress_bar=bar)
    stages = {**student.stages, "distillation": _training_recipe(mode, context, options, config, result, train, val)}
    return dataclasses.replace(student, model=result.student, retraining=tag, stages=stages)


def _tag_new(context, first: int, stages: dict, notes: list[str]) -> None:
    for candidate in context.candidates[first:]:
        candidate.stages = dict(stages)
        candidate.notes.extend(notes)


def _add_pruned_candidates(context, progress, student: _Student, example, workdir: Path) -> None:
    """Export the pruned student, evaluate it in FP32 and through the profile's ONNX post-training candidates."""
    from edgeopt.builder import export as exporting
    from edgeopt.builder.pipeline import _build_onnx_candidate, _evaluate
    from edgeopt.builder.quantize import prepare_for_quantization

    notes = [] if "distillation" in student.stages else ["Pruned without retraining: pass --train-data (and --distill) to recover accuracy."]
    exported = workdir / f"{student.prefix}.export.onnx"
    fp32_path = workdir / f"{student.prefix}-fp32.onnx"
    with progress.step(f"exporting {student.prefix} to ONNX"):
        exporting.export_torch(
            student.model,
            {context.input_specs[0].name: example.numpy()},
            [spec.name for spec in context.output_specs],
            exported,
        )
        exporting.optimize_graph(exported, fp32_path)

    fp32_id = f"{student.prefix}-fp32"
    if context.profile.runtimes_for("onnx", "fp32"):
        first = len(context.candidates)
        with progress.step(f"evaluating {fp32_id}"):
            result = _evaluate(context, fp32_id, "fp32", fp32_path, {"candidate": fp32_id, "precision": "fp32", "method": "none"}, [])
        context.candidates.append(result)
        _tag_new(context, first, student.stages, notes)
    else:
        context.skipped.append(f"{fp32_id}: device {context.profile.id} runs no FP32 ONNX model")

    post_training = [c for c in context.profile.candidates if c.format == "onnx" and c.method != "none"]
    if not post_training:
        return
    prepared = workdir / f"{student.prefix}.prepared.onnx"
    if any(c.method in ("static", "dynamic") for c in post_training):
        with progress.step(f"preparing {student.prefix} for quantization"):
            prepare_for_quantization(fp32_path, prepared)

    for candidate in post_training:
        renamed = dataclasses.replace(candidate, id=f"{student.prefix}-{candidate.id}")
        first = len(context.candidates)
        try:
            _build_onnx_candidate(context, renamed, fp32_path, prepared, workdir, progress)
        except BuildInputError:
            raise
        except Exception as exc:  # a quantizer bug costs one candidate, not the build
            log.error("candidate %s could not be built: %s: %s", renamed.id, type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            context.build_failures[renamed.id] = f"{type(exc).__name__}: {exc}"
        _tag_new(context, first, student.stages, notes)


def _add_qat_candidate(context, options: StudentOptions, progress, student: _Student, teacher, example, train, val, workdir: Path) -> None:
    """Train the student with fake quantization (on labels, or against the source with --distill), export QDQ and evaluate it."""
    from edgeopt.builder.pipeline import _evaluate
    from edgeopt.builder.qat import QatConfig, export_qdq_onnx, prepare_qat, train_qat

    mode = "quantization-aware distillation" if options.distill else "quantization-aware training"
    tag = "qad" if options.distill else "qat"
    candidate_id = _qat_id(options, student)
    bar = _rich_bar(progress)
    # Observers need at least one epoch to set the scales before they freeze.
    config = QatConfig(_training_config(options, bar, QAT_LR_SCALE), observer_freeze_epoch=max(2, min(3, options.epochs)))

    with progress.step(f"{mode} for {candidate_id} ({config.train.epochs} epochs at most)"):
        prepared = prepare_qat(student.model, example)
        result = train_qat(prepared, train, val, config, teacher=teacher if options.distill else None, progress_bar=bar)
    path = workdir / f"{candidate_id}.onnx"
    with progress.step(f"exporting and evaluating {candidate_id}"):
        export = export_qdq_onnx(result.student, example, path, context.input_specs[0].name, context.output_specs[0].name)
        training = _training_recipe(mode, context, options, config.train, result, train, val)
        recipe = {
            "candidate": candidate_id,
            "precision": "int8",
            "method": tag,
            "tool": "torch.ao.quantization.quantize_fx.prepare_qat_fx, exported with torch.onnx.export(dynamo=False)",
            "format": "QDQ",
            "activation_type": "uint8",
            "weight_type": "int8",
            "per_channel": config.per_channel_weights,
            "reduce_range": False,
            "observer_freeze_epoch": config.observer_freeze_epoch,
            "quantize_nodes": export.quantize_nodes,
            "dequantize_nodes": export.dequantize_nodes,
            "training": training,
        }
        notes = []
        # TODO: QAT exports full-range int8 weights. Profiles whose static candidates set reduce_range
        # (AVX2 without VNNI) need 7-bit weights, and the fake-quant config does not offer them yet.
        if any(c.method == "static" and c.reduce_range for c in context.profile.candidates):
            notes.append(f"QAT weights use the full int8 range, while {context.profile.id}'s PTQ recipe reduces it; host fidelity may not hold on the board.")
        first = len(context.candidates)
        context.candidates.append(_evaluate(context, candidate_id, "int8", path, recipe, []))
    _tag_new(context, first, {**student.stages, "qat": training}, notes)
