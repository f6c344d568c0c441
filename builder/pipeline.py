"""The build: load -> export -> optimise -> quantize -> evaluate -> choose -> bundle.

Everything is written in a temporary directory beside the output. Only a finished,
verified bundle is renamed into place, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edgeopt import __version__
from edgeopt.agent.backends import Backend, LatencyStats, OnnxRuntimeBackend, ProviderChoice, measure_latency
from edgeopt.agent.bundle import Artifact, TensorSpec, pack_bundle, sha256_file, verify_bundle, write_manifest
from edgeopt.agent.datatypes import ONNX_TYPE_TO_KSERVE, numpy_dtype
from edgeopt.builder import export as exporting
from edgeopt.builder import litert
from edgeopt.builder.data import Dataset, Preprocess, check_input_shapes, load_dataset, split_calibration_evaluation
from edgeopt.builder.errors import BuildInputError, GateError
from edgeopt.builder.evaluate import Fidelity, Gate, compare_outputs, is_classifier_output, run_backend, run_torch
from edgeopt.builder.macs import MacCountError, count_onnx_cost
from edgeopt.builder.modelspec import SourceModel, load_source_model, parse_model_spec
from edgeopt.builder.quantize import QuantizationSettings, build_candidate, exclusion_steps, prepare_for_quantization, rank_sensitive_nodes
from edgeopt.builder.report import pareto_plot_path, render_report, write_pareto_plot
from edgeopt.builder.student import StudentOptions, add_student_candidates
from edgeopt.devices.probe import detect_profile, probe_host
from edgeopt.devices.profiles import DeviceProfile, ProfileError, QuantCandidate, load_profile

log = logging.getLogger(__name__)

# Share of the worst-ranked activations kept in float on each retry of a failed INT8 candidate.
EXCLUSION_FRACTIONS = (0.05, 0.15)
SENSITIVITY_SAMPLES = 8
# Within this share of the fastest p50, a smaller artifact wins over a faster one.
LATENCY_TIE = 0.05
# Self-test tolerance floors, relative to the largest expected output magnitude.
TOLERANCE_FLOOR = {"fp32": 1e-3, "fp16": 2e-2, "int8": 5e-2}


@dataclass
class BuildOptions:
    """Everything ``edgeopt build`` accepts."""

    device: str
    model: str
    calib: Path | None
    evaluation: Path | None = None
    input_shape: tuple[int, ...] | None = None
    out: Path | None = None
    max_fidelity_drop: float = 0.01
    name: str | None = None
    version: str = "1"
    preprocess: Preprocess | None = None
    labels: Path | None = None
    fallback: bool = True
    latency_runs: int = 50
    threads: int | None = None
    student: StudentOptions | None = None


@dataclass
class CandidateResult:
    """One evaluated candidate artifact."""

    id: str
    precision: str
    format: str
    path: Path
    size: int
    recipe: dict
    fidelity: Fidelity
    passed: bool
    latency: LatencyStats | None
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    validated_on_host: bool = True
    # The runtime that evaluated and timed this candidate on the build host.
    validated_with: str = ""
    # Counted on the ONNX graph for one sample, or None for other formats.
    macs: int | None = None
    parameters: int | None = None
    # Student stages this candidate went through: "prune", "distillation", "qat" recipes.
    stages: dict = field(default_factory=dict)


class Progress:
    """Progress hooks; the CLI passes a rich-backed subclass, tests use this silent one."""

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        log.info("start: %s", description)
        yield
        log.info("done: %s", description)

    def message(self, text: str) -> None:
        log.info(text)


@dataclass
class BuildContext:
    """State shared by the build steps and the report."""

    options: BuildOptions
    profile: DeviceProfile
    source: SourceModel
    name: str
    workdir: Path
    gate: Gate
    calibration: Dataset | None = None
    evaluation: Dataset | None = None
    input_specs: list[TensorSpec] = field(default_factory=list)
    output_specs: list[TensorSpec] = field(default_factory=list)
    preprocess: Preprocess | None = None
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    candidates: list[CandidateResult] = field(default_factory=list)
    winner: CandidateResult | None = None
    decision: list[str] = field(default_factory=list)
    build_failures: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # True while student candidates are evaluated: see Fidelity.accuracy_decides.
    gate_on_accuracy: bool = False
    # Candidates of the profile that were not built, as "id: reason".
    skipped: list[str] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    source_latency: LatencyStats | None = None
    host_description: str = ""
    host_representative: bool = False
    host_profile: str | None = None
    latency_method: str = ""
    # Link from the report to the Pareto plot beside it, None when no plot is written.
    pareto_link: str | None = None

    @property
    def gate_metric_label(self) -> str:
        metric = "top-1 agreement" if any(is_classifier_output(r) for r in self.reference.values()) else "cosine similarity"
        if self.evaluation is not None and self.evaluation.labels is not None:
            metric += " (and top-1 accuracy on the labels)"
            student = self.options.student
            if student is not None and student.enabled:
                metric += "; pruned and retrained students are gated on top-1 accuracy alone"
        return metric


@dataclass
class BuildResult:
    """Paths of the written bundle and report, and the build context with the decision."""

    bundle_path: Path
    report_path: Path
    context: BuildContext


def _default_out(name: str, device: str) -> Path:
    return Path("out") / f"{name}-{device}.tar"


def _resolve_labels(options: BuildOptions, source: SourceModel) -> list[str] | None:
    if options.labels is not None:
        if not options.labels.is_file():
            raise BuildInputError(f"labels file {options.labels} not found: pass a text file with one class name per line")
        return options.labels.read_text(encoding="utf-8").splitlines()
    labels = source.attributes.get("labels")
    if callable(labels):
        labels = labels()
    return list(labels) if labels is not None else None


def _load_data(context: BuildContext) -> None:
    """Load calibration and evaluation data, export the model, and check shapes against it."""
    options, source = context.options, context.source
    if options.calib is None:
        raise BuildInputError("--calib is required: pass a .npy, .npz or image folder with representative inputs")

    preprocess = options.preprocess
    if preprocess is None and source.attributes.get("preprocess"):
        preprocess = Preprocess.from_dict(source.attributes["preprocess"])
    context.preprocess = preprocess

    source_onnx = context.workdir / "source.onnx"
    signature = None
    if source.is_onnx:
        exporting.copy_onnx(source.onnx_path, source_onnx)
        signature = exporting.input_signature(source_onnx)
        input_names = [name for name, _, _ in signature[0]]
        calibration = load_dataset(options.calib, input_names, preprocess)
    else:
        input_names = list(source.attributes.get("input_names", ["input"]))
        calibration = load_dataset(options.calib, input_names, preprocess)
        shape = options.input_shape or source.attributes.get("input_shape")
        if shape is None:
            shape = (1, *calibration.inputs[input_names[0]].shape[1:])
        if len(input_names) != 1 and options.input_shape is not None:
            raise BuildInputError("--input-shape sets one input's shape; this model has several inputs, so give the data as .npz")
        if len(input_names) == 1:
            example = {input_names[0]: np.zeros((1, *tuple(shape)[1:]), np.float32)}
        else:
            example = {name: calibration.inputs[name][:1] for name in input_names}
        exporting.export_torch(source.module, example, source.attributes.get("output_names"), source_onnx)
        signature = exporting.input_signature(source_onnx)

    inputs, outputs = signature
    context.input_specs = [TensorSpec(n, ONNX_TYPE_TO_KSERVE.get(t, t), (-1, *s[1:])) for n, s, t in inputs]
    context.output_specs = [TensorSpec(n, ONNX_TYPE_TO_KSERVE.get(t, t), (-1, *s[1:])) for n, s, t in outputs]
    expected = {spec.name: spec.shape for spec in context.input_specs}
    dtypes = {spec.name: numpy_dtype(spec.datatype) for spec in context.input_specs}

    calibration = check_input_shapes(calibration, expected, dtypes)
    evaluation = None
    if options.evaluation is not None:
        evaluation = check_input_shapes(load_dataset(options.evaluation, list(expected), preprocess, option="--eval"), expected, dtypes)
    context.calibration, context.evaluation = split_calibration_evaluation(calibration, evaluation)


def _check_gate_resolution(context: BuildContext, progress: Progress) -> None:
    """Warn when one changed top-1 class on the evaluation set already exceeds the gate."""
    samples = len(context.evaluation)
    step = 1.0 / samples
    if step > context.gate.max_drop:
        needed = int(1.0 / context.gate.max_drop) + 1 if context.gate.max_drop > 0 else samples
        message = (
            f"the evaluation set has {samples} samples, so one changed top-1 class is a drop of {step:.4f}, above the gate "
            f"of {context.gate.max_drop:.4f}: candidates pass only with zero changes. Use at least {needed} evaluation samples."
        )
        log.warning(message)
        progress.message(f"warning: {message}")
        context.warnings.append(message)


def _reference_outputs(context: BuildContext) -> None:
    names = [spec.name for spec in context.output_specs]
    if context.source.is_onnx:
        backend = OnnxRuntimeBackend(context.workdir / "source.onnx", [ProviderChoice("CPUExecutionProvider", {})])
        context.reference = run_backend(backend, context.evaluation)
    else:
        context.reference = run_torch(context.source.module, context.evaluation, names)


def _measure_source_latency(context: BuildContext) -> None:
    if context.source.is_onnx:
        return
    import torch

    sample = context.evaluation.batch(0, 1)
    tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in sample.values()]

    class TorchRunner:
        def run(self, _inputs):
            with torch.no_grad():
                return context.source.module(*tensors)

    context.source_latency = measure_latency(TorchRunner(), sample, runs=context.options.latency_runs)


def _evaluate(
    context: BuildContext, candidate_id: str, precision: str, path: Path, recipe: dict, notes: list[str], backend: Backend | None = None
) -> CandidateResult:
    """Evaluate an artifact; ONNX files default to the CPU execution provider, other formats pass ``backend``."""
    artifact_format = "tflite" if path.suffix == ".tflite" else "onnx"
    if backend is None:
        backend = OnnxRuntimeBackend(path, [ProviderChoice("CPUExecutionProvider", {})], intra_op_threads=context.options.threads)
    outputs = run_backend(backend, context.evaluation)
    fidelity = compare_outputs(context.reference, outputs, context.evaluation.labels)
    fidelity.accuracy_decides = context.gate_on_accuracy
    latency = measure_latency(backend, context.evaluation.batch(0, 1), runs=context.options.latency_runs)
    backend.close()
    size = path.stat().st_size
    cost = None
    if artifact_format == "onnx":
        size += sum(p.stat().st_size for p in exporting.external_data_files(path))
        try:
            cost = count_onnx_cost(path)
        except MacCountError as exc:
            log.warning("candidate %s: MACs not counted: %s", candidate_id, exc)
    result = CandidateResult(
        id=candidate_id,
        precision=precision,
        format=artifact_format,
        path=path,
        size=size,
        recipe=recipe,
        fidelity=fidelity,
        passed=context.gate.passes(fidelity),
        latency=latency,
        notes=notes,
        outputs=outputs,
        validated_with=backend.runtime,
        macs=cost.macs_per_sample if cost else None,
        parameters=cost.parameters if cost else None,
    )
    log.info(
        "candidate %s: %s %.4f (drop %.4f, gate %s), host p50 %.2f ms, %d bytes",
        candidate_id, fidelity.metric, fidelity.score, fidelity.drop, "pass" if result.passed else "FAIL", latency.p50_ms, size,
    )
    return result


def _build_candidates(context: BuildContext, progress: Progress) -> None:
    fp32_path = context.workdir / "model.fp32.onnx"
    with progress.step("optimising the FP32 graph"):
        exporting.optimize_graph(context.workdir / "source.onnx", fp32_path)

    needs_calibration = any(c.method in ("static", "dynamic") for c in context.profile.candidates)
    prepared = context.workdir / "prepared.onnx"
    if needs_calibration:
        with progress.step("preparing the graph for quantization"):
            prepare_for_quantization(fp32_path, prepared)

    candidate_dir = context.workdir / "candidates"
    candidate_dir.mkdir()
    tflite_float = _TfliteFloatModel(candidate_dir / "litert-float.tflite")
    for candidate in context.profile.candidates:
        try:
            if candidate.format == "tflite":
                _build_tflite_candidate(context, candidate, tflite_float, progress)
            else:
                _build_onnx_candidate(context, candidate, fp32_path, prepared, candidate_dir, progress)
        except BuildInputError:
            raise
        except Exception as exc:  # a quantizer or converter bug costs one candidate, not the build
            log.error("candidate %s could not be built: %s: %s", candidate.id, type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            context.build_failures[candidate.id] = f"{type(exc).__name__}: {exc}"


def _build_onnx_candidate(context: BuildContext, candidate: QuantCandidate, fp32_path: Path, prepared: Path, candidate_dir: Path, progress: Progress) -> None:
    """Build and evaluate one ONNX candidate; retry a failing static INT8 one with sensitive nodes in float."""
    settings = QuantizationSettings(candidate)
    path = candidate_dir / f"{candidate.id}.onnx"
    with progress.step(f"building and evaluating {candidate.id}"):
        build_candidate(settings, fp32_path, prepared, path, context.calibration)
        result = _evaluate(context, candidate.id, candidate.precision, path, settings.to_recipe(), [])
    context.candidates.append(result)

    if result.passed or candidate.method != "static":
        return

    with progress.step(f"ranking per-node sensitivity of {candidate.id}"):
        ranked = rank_sensitive_nodes(prepared, path, context.evaluation, limit=SENSITIVITY_SAMPLES)
    result.notes.append(f"Per-node sensitivity: worst activation {ranked[0].tensor} at {ranked[0].sqnr_db:.1f} dB SQNR." if ranked else "")
    for excluded in exclusion_steps(ranked, EXCLUSION_FRACTIONS):
        retry_id = f"{candidate.id}-keep{len(excluded)}"
        retry_settings = QuantizationSettings(candidate, nodes_to_exclude=excluded)
        retry_path = candidate_dir / f"{retry_id}.onnx"
        with progress.step(f"retrying {candidate.id} with {len(excluded)} sensitive nodes in float"):
            build_candidate(retry_settings, fp32_path, prepared, retry_path, context.calibration)
            retry = _evaluate(
                context, retry_id, candidate.precision, retry_path, retry_settings.to_recipe(),
                [f"{candidate.id} with the {len(excluded)} most sensitive nodes kept in float."],
            )
        context.candidates.append(retry)
        if retry.passed:
            break


# --- LiteRT candidates ------------------------------------------------------------------


def _tflite_skip_reason(context: BuildContext, candidate: QuantCandidate) -> str | None:
    if context.source.is_onnx:
        return "LiteRT candidates are converted from the PyTorch module with litert-torch, and an ONNX source has none"
    if candidate.method not in ("none", *litert.QUANTIZER_RECIPES):
        return f"method {candidate.method} is not built for tflite; use none, static or dynamic"
    if candidate.method == "dynamic":
        passed = next((c for c in context.candidates if c.format == "tflite" and c.precision == candidate.precision and c.passed
                       and c.recipe.get("method") == "static"), None)
        if passed is not None:
            return f"full-integer {passed.id} passed the gate, so dynamic-range INT8 is not needed"
    return litert.tflite_unavailable_reason()


@dataclass
class _TfliteFloatModel:
    """The FP32 .tflite conversion shared by every LiteRT candidate of one build."""

    path: Path
    error: str | None = None

    def get(self, context: BuildContext, progress: Progress) -> Path:
        """Convert the source module on first use; later calls reuse the file or repeat the failure."""
        if self.error is not None:
            raise litert.TfliteBuildError(self.error)
        if not self.path.exists():
            output_names = [spec.name for spec in context.output_specs]
            with progress.step("converting the PyTorch module to .tflite with litert-torch"):
                try:
                    litert.convert_module(context.source.module, context.calibration.batch(0, 1), output_names, self.path)
                except litert.TfliteBuildError as exc:
                    self.error = str(exc)
                    raise
        return self.path


def _build_tflite_candidate(context: BuildContext, candidate: QuantCandidate, float_model: _TfliteFloatModel, progress: Progress) -> None:
    """Build and evaluate one LiteRT candidate, or record why it was skipped."""
    reason = _tflite_skip_reason(context, candidate)
    if reason is None:
        path = float_model.path.with_name(f"{candidate.id}.tflite")
        try:
            float_path = float_model.get(context, progress)
            with progress.step(f"building and evaluating {candidate.id}"):
                if candidate.method == "none":
                    shutil.copyfile(float_path, path)
                    recipe = litert.float_recipe()
                else:
                    recipe = litert.quantize_tflite(float_path, candidate.method, context.calibration, path, context.options.threads)
                backend = litert.open_host_backend(path, context.options.threads or os.cpu_count())
                result = _evaluate(context, candidate.id, candidate.precision, path, recipe, [], backend=backend)
        except litert.TfliteBuildError as exc:
            reason = str(exc)
        else:
            context.candidates.append(result)
            return
    context.skipped.append(f"{candidate.id}: {reason}")
    log.warning("candidate %s skipped: %s", candidate.id, reason)


def _choose_winner(context: BuildContext) -> None:
    passing = [c for c in context.candidates if c.passed]
    failing = [c for c in context.candidates if not c.passed]
    if not passing:
        details = ", ".join(f"{c.id} drop {c.fidelity.drop:.4f}" for c in context.candidates)
        raise GateError(
            f"no candidate passed the fidelity gate (max drop {context.gate.max_drop}): {details}; "
            "check the preprocessing and data, or raise --max-fidelity-drop"
        )

    preference = list(context.profile.precision_preference)
    rank = {precision: index for index, precision in enumerate(preference)}

    if context.host_representative:
        fastest = min(c.latency.p50_ms for c in passing)
        close = [c for c in passing if c.latency.p50_ms <= fastest * (1 + LATENCY_TIE)]
        winner = min(close, key=lambda c: (c.size, c.latency.p50_ms))
        context.decision.append(
            f"This host's closest profile is {context.profile.id}, so host latency decides: {winner.id} has p50 {winner.latency.p50_ms:.2f} ms "
            f"(fastest passing: {fastest:.2f} ms; within {LATENCY_TIE:.0%} the smaller file wins)."
        )
    else:
        # Within a precision, the profile's format order (e.g. tflite before onnx) decides.
        formats = {artifact_format: index for index, artifact_format in enumerate(context.profile.formats)}
        # MACs counted on the graph rank pruned students ahead of their source on any board, but
        # host latency would not transfer to the board. A candidate without a count ranks last.
        winner = min(
            passing,
            key=lambda c: (
                rank.get(c.precision, len(rank)),
                formats.get(c.format, len(formats)),
                c.macs if c.macs is not None else float("inf"),
                c.fidelity.drop,
                c.size,
            ),
        )
        format_order = f", then its format preference ({' > '.join(context.profile.formats)})," if len(context.profile.formats) > 1 else ""
        context.decision.append(
            f"This host's closest profile is {context.host_profile or 'none'}, not {context.profile.id}, so the profile's precision preference ({' > '.join(preference)}){format_order} "
            f"then fewer MACs decide among passing candidates: {winner.id} ({winner.precision}, {winner.format}) passes with drop "
            f"{winner.fidelity.drop:.4f}."
        )

    better = [p for p in preference if rank[p] < rank.get(winner.precision, len(rank))]
    failed_better = [c for c in failing if c.precision in better]
    if failed_better:
        worst = ", ".join(f"{c.id} drop {c.fidelity.drop:.4f}" for c in failed_better)
        context.decision.append(
            f"FALLBACK: every {' and '.join(p for p in better if any(c.precision == p for c in failed_better))} candidate "
            f"failed the gate ({worst} > {context.gate.max_drop:.4f}), so the bundle ships {winner.precision} instead."
        )
    context.winner = winner


def _selftest_tolerance(context: BuildContext, candidate: CandidateResult, index: int, artifact_runtimes: tuple[str, ...]) -> dict:
    """Tolerance for one artifact: three times its deviation on the sample, at least a precision floor."""
    precision = candidate.precision
    runs_in_fp16 = any(
        rt.label in artifact_runtimes and any(k.endswith("fp16_enable") and v for k, v in rt.options.items())
        for rt in context.profile.runtimes
    )
    if runs_in_fp16 and precision == "fp32":
        precision = "fp16"
    scale = max(float(np.max(np.abs(ref[index]))) for ref in context.reference.values())
    deviation = max(float(np.max(np.abs(candidate.outputs[name][index] - ref[index]))) for name, ref in context.reference.items())
    return {"atol": round(max(3.0 * deviation, TOLERANCE_FLOOR[precision] * max(scale, 1e-6)), 6), "rtol": 0.0}


def _pick_selftest_sample(context: BuildContext, shipped: list[CandidateResult]) -> int:
    """Pick the evaluation sample every shipped artifact agrees on with the largest top-1 margin."""
    classifier = [n for n, r in context.reference.items() if is_classifier_output(r)]
    if not classifier:
        return 0
    ref = context.reference[classifier[0]]
    agree = np.ones(len(ref), dtype=bool)
    for candidate in shipped:
        agree &= candidate.outputs[classifier[0]].argmax(axis=1) == ref.argmax(axis=1)
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = np.where(agree, top2[:, 1] - top2[:, 0], -np.inf)
    return int(np.argmax(margin))


def _onnx_fallback(context: BuildContext, shipped: list[CandidateResult]) -> list[CandidateResult]:
    """Return the best passing ONNX candidate when nothing shipped is ONNX, so ONNX Runtime can take over."""
    if any(c.format == "onnx" for c in shipped):
        return []
    rank = {precision: index for index, precision in enumerate(context.profile.precision_preference)}
    passing = [c for c in context.candidates if c.format == "onnx" and c.passed]
    if not passing:
        return []
    fallback = min(passing, key=lambda c: (rank.get(c.precision, len(rank)), c.fidelity.drop, c.size))
    context.decision.append(f"The bundle also ships {fallback.id} ({fallback.precision}, onnx) for the ONNX Runtime entries of the chain.")
    return [fallback]


def _runtime_entries(profile: DeviceProfile) -> list[dict]:
    """Return the profile's runtime chain as the manifest records it; ``{cache_dir}`` is filled in by the agent."""
    return [
        {"kind": rt.kind, "provider": rt.provider, "options": dict(rt.options), "precisions": list(rt.precisions), "formats": list(rt.formats), "note": rt.note}
        for rt in profile.runtimes
    ]


def _latency_method(context: BuildContext, candidate: CandidateResult) -> str:
    if candidate.format == "onnx":
        return context.latency_method
    return f"{candidate.validated_with}, batch 1, p50/p99 of up to {context.options.latency_runs} runs after 5 warm-up runs"


def _assemble_bundle(context: BuildContext, bundle_dir: Path, labels: list[str] | None) -> None:
    bundle_dir.mkdir(parents=True)
    shipped = [context.winner]
    fp32 = next((c for c in context.candidates if c.id == "fp32"), None)
    if context.options.fallback and context.winner.precision != "fp32" and fp32 is not None:
        shipped.append(fp32)
    if context.options.fallback:
        shipped += _onnx_fallback(context, shipped)

    index = _pick_selftest_sample(context, shipped)
    selftest_dir = bundle_dir / "selftest"
    selftest_dir.mkdir()
    np.savez(selftest_dir / "inputs.npz", **context.evaluation.batch(index, index + 1))
    np.savez(selftest_dir / "expected.npz", **{name: ref[index : index + 1] for name, ref in context.reference.items()})

    tolerances = {}
    file_names = {}
    for candidate in shipped:
        file_name = file_names[candidate.id] = f"model.{candidate.id}{candidate.path.suffix}"
        shutil.copyfile(candidate.path, bundle_dir / file_name)
        runtimes = tuple(context.profile.runtimes_for(candidate.format, candidate.precision))
        context.artifacts.append(
            Artifact(
                path=file_name,
                sha256=sha256_file(bundle_dir / file_name),
                size=(bundle_dir / file_name).stat().st_size,
                format=candidate.format,
                precision=candidate.precision,
                runtimes=runtimes,
                candidate=candidate.id,
                validated_on_host=candidate.validated_on_host,
            )
        )
        tolerances[file_name] = _selftest_tolerance(context, candidate, index, runtimes)

    if labels:
        (bundle_dir / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")

    classifier = any(is_classifier_output(r) for r in context.reference.values())
    winner_tol = tolerances[file_names[context.winner.id]]
    metrics = {
        "winner": context.winner.id,
        "size_bytes": context.winner.size,
        "fidelity": context.winner.fidelity.to_dict(),
        "latency": {**context.winner.latency.to_dict(), "measured_on": context.host_description, "method": _latency_method(context, context.winner)},
        "latency_measured_on": f"{context.host_description}; {_latency_method(context, context.winner)}",
        "host_representative": context.host_representative,
        "candidates": {
            c.id: {
                "precision": c.precision,
                "size_bytes": c.size,
                "fidelity": c.fidelity.to_dict(),
                "gate_passed": c.passed,
                "latency": c.latency.to_dict() if c.latency else None,
                "runtime": c.validated_with,
                "macs": c.macs,
                "parameters": c.parameters,
                "stages": list(c.stages),
            }
            for c in context.candidates
        },
    }
    if context.skipped:
        metrics["skipped_candidates"] = list(context.skipped)
    if context.source_latency is not None:
        metrics["source_latency"] = {**context.source_latency.to_dict(), "runtime": "PyTorch eager FP32"}

    manifest = {
        "name": context.name,
        "version": context.options.version,
        "device": context.profile.id,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "edgeopt_version": __version__,
        "source": {"spec": context.source.spec.raw, "kind": context.source.spec.kind, "sha256": context.source.sha256},
        "inputs": [spec.to_dict() for spec in context.input_specs],
        "outputs": [spec.to_dict() for spec in context.output_specs],
        "preprocess": context.preprocess.to_manifest() if context.preprocess else None,
        "labels": "labels.txt" if labels else None,
        "artifacts": [a.to_dict() for a in context.artifacts],
        "runtimes": _runtime_entries(context.profile),
        "recipe": {
            "prune": context.winner.stages.get("prune"),
            "distillation": context.winner.stages.get("distillation"),
            "quantization": context.winner.recipe,
            "max_fidelity_drop": context.gate.max_drop,
            "calibration": {"source": context.calibration.source, "samples": len(context.calibration)},
            "evaluation": {"source": context.evaluation.source, "samples": len(context.evaluation)},
        },
        "metrics": metrics,
        "selftest": {
            "inputs": "selftest/inputs.npz",
            "expected": "selftest/expected.npz",
            "atol": winner_tol["atol"],
            "rtol": winner_tol["rtol"],
            "artifacts": tolerances,
            "check_top1": classifier,
        },
    }
    (bundle_dir / "report.md").write_text(render_report(context), encoding="utf-8")
    write_manifest(bundle_dir, manifest)
    verify_bundle(bundle_dir)


def _publish(staging: Path, bundle_dir: Path, out: Path) -> None:
    """Move the finished bundle to ``out`` (a .tar file or a directory) atomically."""
    if out.suffix == ".tar":
        temporary_tar = staging / out.name
        pack_bundle(bundle_dir, temporary_tar)
        os.replace(temporary_tar, out)
        return
    if out.exists():
        previous = staging / "previous"
        os.replace(out, previous)
    os.replace(bundle_dir, out)


def build(options: BuildOptions, progress: Progress | None = None) -> BuildResult:
    """Run the whole build; raise BuildInputError for bad input and GateError when nothing passes."""
    progress = progress or Progress()
    if not 0 <= options.max_fidelity_drop < 1:
        raise BuildInputError(f"--max-fidelity-drop {options.max_fidelity_drop} is out of range: use a fraction such as 0.01 (one point)")
    try:
        profile = load_profile(options.device)
    except ProfileError as exc:
        raise BuildInputError(str(exc)) from None

    spec = parse_model_spec(options.model)
    name = options.name or spec.default_name
    out = Path(options.out) if options.out else _default_out(name, profile.id)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    except OSError as exc:
        raise BuildInputError(f"cannot write --out {out}: {exc.strerror or exc}; choose a writable directory") from None
    try:
        with progress.step(f"loading {spec.raw}"):
            source = load_source_model(spec)
        facts = probe_host()
        context = BuildContext(options=options, profile=profile, source=source, name=name, workdir=staging, gate=Gate(options.max_fidelity_drop))
        detected = detect_profile(facts)
        context.host_representative = detected is not None and detected.id == profile.id
        context.host_profile = detected.id if detected else None
        context.host_description = facts.describe()
        import onnxruntime as ort

        threads = options.threads or os.cpu_count()
        context.latency_method = (
            f"onnxruntime {ort.__version__} CPUExecutionProvider, {threads} intra-op threads, batch 1, "
            f"p50/p99 of up to {options.latency_runs} runs after 5 warm-up runs"
        )

        with progress.step("loading data and exporting to ONNX"):
            _load_data(context)
        with progress.step("computing FP32 source outputs on the evaluation set"):
            _reference_outputs(context)
        if any(is_classifier_output(r) for r in context.reference.values()):
            _check_gate_resolution(context, progress)
            _measure_source_latency(context)

        add_student_candidates(context, progress)
        _build_candidates(context, progress)
        _choose_winner(context)

        labels = _resolve_labels(options, source)
        report_path = out.with_name(out.name.removesuffix(".tar") + ".report.md") if out.suffix == ".tar" else out / "report.md"
        plot_path = pareto_plot_path(out, report_path)
        temporary_plot = write_pareto_plot(context, staging / plot_path.name)
        if temporary_plot is not None:
            context.pareto_link = os.path.relpath(plot_path, report_path.parent)
        with progress.step("writing and verifying the bundle"):
            bundle_dir = staging / "bundle" / f"{name}-{profile.id}"
            _assemble_bundle(context, bundle_dir, labels)
            report_text = (bundle_dir / "report.md").read_text(encoding="utf-8")
            _publish(staging, bundle_dir, out)

        if temporary_plot is not None:
            os.replace(temporary_plot, plot_path)
        if out.suffix == ".tar":
            temporary_report = staging / "report.md"
            temporary_report.write_text(report_text, encoding="utf-8")
            os.replace(temporary_report, report_path)
        return BuildResult(bundle_path=out, report_path=report_path, context=context)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
