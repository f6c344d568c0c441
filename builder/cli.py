"""``edgeopt build``: turn a model into a verified bundle for one device."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import click

from edgeopt.cli import InputError

log = logging.getLogger(__name__)


def _parse_floats(value: str | None, option: str, count: int | None = None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise InputError(f"{option} {value!r} is not a comma-separated list of numbers, e.g. 127,127,127") from None
    if count == 3 and len(numbers) == 1:
        numbers = numbers * 3
    if count is not None and len(numbers) != count:
        raise InputError(f"{option} {value!r} needs {count} values, e.g. 127,127,127")
    return numbers


def _parse_shape(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"--input-shape {value!r} is invalid: use comma-separated integers with the batch first, e.g. 1,3,224,224") from None
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise InputError(f"--input-shape {value!r} is invalid: give the batch axis and at least one positive dimension, e.g. 1,3,224,224")
    return shape


def _parse_feature_layer(value: str) -> tuple[str, str]:
    student, sep, teacher = value.partition("=")
    student, teacher = student.strip(), (teacher.strip() if sep else student.strip())
    if not student or not teacher:
        raise InputError(f"--feature-layer {value!r} is invalid: give STUDENT=TEACHER module names, e.g. 7=7, or one name used for both")
    return student, teacher


def _student_input_errors() -> tuple[type[Exception], ...]:
    """Return the exception types that mean bad input: build options, data, pruning, training or QAT settings."""
    from edgeopt.builder.distill import DistillError
    from edgeopt.builder.errors import BuildInputError
    from edgeopt.builder.prune import PruneError
    from edgeopt.builder.qat import QatError
    from edgeopt.builder.traindata import TrainDataError

    return (BuildInputError, PruneError, DistillError, TrainDataError, QatError)


def _loss_column_class():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class LossColumn(ProgressColumn):
        """The ``loss`` field of training tasks; empty for build steps that have none."""

        def render(self, task) -> Text:
            return Text(str(task.fields.get("loss", "")), style="cyan")

    return LossColumn


def _LossColumn():
    return _loss_column_class()()


class RichProgress:
    """Build progress on stderr: a spinner per step and the elapsed time."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        # Build steps are one-unit tasks; training tasks count batches, so the bar, the
        # loss fields and the remaining time are meaningful for them.
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=10),
            _LossColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(compact=True),
            console=self.console,
            transient=False,
        )

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        log.info("start: %s", description)
        task = self.progress.add_task(description, total=1)
        try:
            yield
        finally:
            self.progress.update(task, completed=1)
            log.info("done: %s", description)

    def message(self, text: str) -> None:
        self.console.print(text)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()


@click.command()
@click.option("--device", required=True, help="Device profile id (see `edgeopt devices`).")
@click.option("--model", "model_spec", required=True, help="file.py:function, package.module:function, or a .pt / .pt2 / .onnx file.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration data: .npy (N x input shape), .npz keyed by input name, or an image folder.")
@click.option("--eval", "evaluation", type=click.Path(path_type=Path), help="Evaluation data, disjoint from --calib; without it, --calib is split in half.")
@click.option("--input-shape", help="Input shape with the batch first, e.g. 1,3,224,224 (batch becomes dynamic).")
@click.option("--out", type=click.Path(path_type=Path), help="Output .tar file or directory [default: out/NAME-DEVICE.tar].")
@click.option("--max-fidelity-drop", type=float, default=0.01, show_default=True, help="Largest allowed drop in top-1 agreement (or cosine, or accuracy with labels) against the FP32 source, as a fraction.")
@click.option("--name", help="Model name in the bundle [default: from the model spec].")
@click.option("--version", "bundle_version", default="1", show_default=True, help="Bundle version string.")
@click.option("--image-size", help="Image folders: resize to HEIGHT,WIDTH (or one number).")
@click.option("--mean", help="Image folders: per-channel mean subtracted from 0-255 pixels, e.g. 127,127,127.")
@click.option("--std", help="Image folders: per-channel divisor after the mean, e.g. 128,128,128.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default=None, help="Image folders: tensor layout [default: NCHW].")
@click.option("--labels", type=click.Path(path_type=Path), help="Text file of class names, one per line, shipped in the bundle.")
@click.option("--no-fallback", is_flag=True, help="Ship only the winner, without the FP32 fallback artifact.")
@click.option("--latency-runs", type=click.IntRange(5, 10_000), default=50, show_default=True, help="Timed runs per candidate for host latency.")
@click.option("--prune", "prune_ratio", type=float, help="Structured pruning: fraction of output channels removed per layer group, in (0, 1), e.g. 0.5. Adds pruned candidates.")
@click.option("--target-macs", type=int, help="Structured pruning until one sample needs at most N multiply-accumulates (conv and linear layers); instead of --prune.")
@click.option("--prune-importance", type=click.Choice(["l1", "l2", "taylor"]), default="l2", show_default=True, help="Channel importance: weight L1 or L2 norm, or first-order Taylor (needs --train-data).")
@click.option("--prune-keep", multiple=True, metavar="NAME", help="Module name whose output channels are not pruned (repeatable); the layer producing the model output is always kept.")
@click.option("--prune-round-to", type=click.IntRange(1, None), help="Keep pruned channel counts at multiples of N, e.g. 8 for SIMD-friendly widths [default: no rounding].")
@click.option("--distill", is_flag=True, help="Train the pruned model (or the --qat model) against the source model's softened logits (knowledge distillation).")
@click.option("--train-data", type=click.Path(path_type=Path), help="Training data for --distill, --qat and pruning fine-tuning: .npz with x (model-ready inputs) and optional y (class indexes), or an image folder (one subfolder per class, or flat for unlabeled).")
@click.option("--epochs", type=click.IntRange(1, None), default=30, show_default=True, help="Maximum training epochs of distillation, fine-tuning and --qat each.")
@click.option("--lr", type=click.FloatRange(0, None, min_open=True), default=1e-3, show_default=True, help="AdamW learning rate (cosine decay); --qat trains at a tenth of it.")
@click.option("--batch-size", type=click.IntRange(1, None), default=64, show_default=True, help="Training batch size in samples.")
@click.option("--patience", type=click.IntRange(1, None), default=5, show_default=True, help="Stop training after this many epochs without a better validation score; the best epoch is kept.")
@click.option("--temperature", type=click.FloatRange(0, None, min_open=True), default=4.0, show_default=True, help="Distillation temperature T that softens both models' logits.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.7, show_default=True, help="Weight of the KL distillation term; 1 - alpha weights cross-entropy on labels.")
@click.option("--feature-loss", "feature_weight", type=click.FloatRange(0, None), default=0.0, show_default=True, help="Weight of the intermediate-feature MSE loss (needs --feature-layer).")
@click.option("--feature-layer", "feature_layers", multiple=True, metavar="S=T", help="Student module S matched to teacher module T for the feature loss (repeatable); S alone uses the same name on both.")
@click.option("--freeze-batchnorm", is_flag=True, help="Keep BatchNorm running statistics fixed while training, for small or narrow --train-data such as a few hundred crops.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Share of --train-data held out for validation, early stopping and best-epoch choice.")
@click.option("--qat", is_flag=True, help="Add an INT8 candidate from quantization-aware training (fake quantization, QDQ export); with --distill it is quantization-aware distillation.")
def build(
    device, model_spec, calib, evaluation, input_shape, out, max_fidelity_drop, name, bundle_version, image_size, mean, std, layout, labels, no_fallback, latency_runs,
    prune_ratio, target_macs, prune_importance, prune_keep, prune_round_to, distill, train_data, epochs, lr, batch_size, patience, temperature, alpha,
    feature_weight, feature_layers, freeze_batchnorm, val_fraction, qat,
):
    """Build a verified bundle of MODEL for DEVICE: export, quantize, evaluate, choose, pack."""
    from edgeopt.builder.data import Preprocess
    from edgeopt.builder.errors import BuildInputError, GateError
    from edgeopt.builder.modelspec import parse_model_spec
    from edgeopt.builder.pipeline import BuildOptions, build as run_build
    from edgeopt.builder.report import summary_lines
    from edgeopt.builder.student import StudentOptions, check_source

    preprocess = None
    if image_size or mean or std or layout:
        if not image_size:
            raise InputError("--mean/--std/--layout need --image-size too, e.g. --image-size 224")
        size = _parse_floats(image_size, "--image-size")
        size = tuple(int(v) for v in (size * 2 if len(size) == 1 else size))
        try:
            preprocess = Preprocess(
                size=size,
                mean=_parse_floats(mean, "--mean", 3) or (0.0, 0.0, 0.0),
                std=_parse_floats(std, "--std", 3) or (1.0, 1.0, 1.0),
                layout=layout or "NCHW",
            )
        except BuildInputError as exc:
            raise InputError(str(exc)) from None

    student = StudentOptions(
        prune_ratio=prune_ratio,
        target_macs=target_macs,
        importance=prune_importance,
        keep=tuple(prune_keep),
        round_to=prune_round_to,
        distill=distill,
        qat=qat,
        train_data=train_data,
        val_fraction=val_fraction,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        patience=patience,
        temperature=temperature,
        alpha=alpha,
        feature_weight=feature_weight,
        feature_layers=tuple(_parse_feature_layer(value) for value in feature_layers),
        freeze_batchnorm=freeze_batchnorm,
    )
    try:
        student.check()
        if student.enabled:
            check_source(parse_model_spec(model_spec))
    except BuildInputError as exc:
        raise InputError(str(exc)) from None

    options = BuildOptions(
        device=device,
        model=model_spec,
        calib=calib,
        evaluation=evaluation,
        input_shape=_parse_shape(input_shape),
        out=out,
        max_fidelity_drop=max_fidelity_drop,
        name=name,
        version=bundle_version,
        preprocess=preprocess,
        labels=labels,
        fallback=not no_fallback,
        latency_runs=latency_runs,
        student=student if student.enabled else None,
    )
    try:
        with RichProgress() as progress:
            result = run_build(options, progress)
    except _student_input_errors() as exc:
        raise InputError(str(exc)) from None
    except GateError as exc:
        raise click.ClickException(str(exc)) from None

    for line in summary_lines(result.context):
        click.echo(line)
    click.echo(f"bundle: {result.bundle_path}")
    click.echo(f"report: {result.report_path}")
