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


class RichProgress:
    """Build progress on stderr: a spinner per step and the elapsed time."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=self.console, transient=False)

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
def build(device, model_spec, calib, evaluation, input_shape, out, max_fidelity_drop, name, bundle_version, image_size, mean, std, layout, labels, no_fallback, latency_runs):
    """Build a verified bundle of MODEL for DEVICE: export, quantize, evaluate, choose, pack."""
    from edgeopt.builder.data import Preprocess
    from edgeopt.builder.errors import BuildInputError, GateError
    from edgeopt.builder.pipeline import BuildOptions, build as run_build
    from edgeopt.builder.report import summary_lines

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
    )
    try:
        with RichProgress() as progress:
            result = run_build(options, progress)
    except BuildInputError as exc:
        raise InputError(str(exc)) from None
    except GateError as exc:
        raise click.ClickException(str(exc)) from None

    for line in summary_lines(result.context):
        click.echo(line)
    click.echo(f"bundle: {result.bundle_path}")
    click.echo(f"report: {result.report_path}")
