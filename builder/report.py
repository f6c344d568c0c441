"""Markdown build report: every candidate with size, fidelity, host latency and the decision."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from edgeopt.agent.selection import runtime_unavailable_reason

if TYPE_CHECKING:
    from edgeopt.agent.bundle import Artifact
    from edgeopt.builder.pipeline import BuildContext, CandidateResult

log = logging.getLogger(__name__)

# The chain entry that stands for the runtime the builder evaluates each format with.
HOST_RUNTIME_LABEL = {"onnx": "CPUExecutionProvider", "tflite": "litert"}


def _mib(size: int) -> str:
    return f"{size / 1024**2:.2f}"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def stage_labels(candidate: "CandidateResult") -> list[str]:
    """Name the stages that produced ``candidate``, in order, e.g. ["prune 50 %", "KD", "PTQ static"]."""
    labels = []
    prune = candidate.stages.get("prune")
    if prune:
        if prune.get("ratio") is not None:
            labels.append(f"prune {prune['ratio']:.0%} ({prune['importance']})")
        else:
            labels.append(f"prune to {prune['target_macs']:,} MACs ({prune['importance']})")
    training = candidate.stages.get("distillation")
    if training:
        labels.append("KD" if training["mode"] == "distillation" else "fine-tune")
    method = candidate.recipe.get("method")
    if method in ("qat", "qad"):
        labels.append(method.upper())
    elif method in ("static", "dynamic"):
        labels.append(f"PTQ {method}")
    elif method == "fp16":
        labels.append("FP16")
    elif candidate.format == "tflite" and candidate.precision != "fp32":
        labels.append("PTQ")
    return labels or ["export"]


def candidate_rows(candidates: list["CandidateResult"], winner_id: str | None, fp32_p50: float | None) -> list[str]:
    rows = [
        "| candidate | stages | precision | size MiB | parameters | MACs | top-1 agreement | mean KL | cosine | accuracy | drop | gate | host p50 ms | host p99 ms | speed vs fp32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for c in candidates:
        f = c.fidelity
        latency = c.latency
        speed = f"{fp32_p50 / latency.p50_ms:.2f}x" if latency and fp32_p50 else "–"
        gate = "pass" if c.passed else "**fail**"
        name = f"**{c.id}** (winner)" if c.id == winner_id else c.id
        rows.append(
            f"| {name} | {' → '.join(stage_labels(c))} | {c.precision} | {_mib(c.size)} | {_count(c.parameters)} | {_count(c.macs)} | {_fmt(f.top1_agreement)} | {_fmt(f.mean_kl, 5)} | {_fmt(f.cosine, 5)} | "
            f"{_fmt(f.accuracy)} | {f.drop:.4f} | {gate} | {_fmt(latency.p50_ms if latency else None, 2)} | "
            f"{_fmt(latency.p99_ms if latency else None, 2)} | {speed} |"
        )
    return rows


def render_report(context: "BuildContext") -> str:
    """Return the report text for a finished build (winner chosen, artifacts listed)."""
    fp32 = next((c for c in context.candidates if c.id == "fp32"), None)
    fp32_p50 = fp32.latency.p50_ms if fp32 and fp32.latency else None

    lines = [
        f"# edgeopt build report: {context.name} for {context.profile.id}",
        "",
        f"- Device profile: **{context.profile.id}** ({context.profile.name})",
        f"- Source model: `{context.source.spec.raw}` (sha256 `{context.source.sha256[:16]}…`)",
        f"- Calibration data: {context.calibration.source}, {len(context.calibration)} samples",
        f"- Evaluation data: {context.evaluation.source}, {len(context.evaluation)} samples"
        + (", with labels" if context.evaluation.labels is not None else ", no labels (fidelity against the FP32 source only)"),
        f"- Fidelity gate: drop of at most {context.gate.max_drop:.4f} in {context.gate_metric_label} against the FP32 source",
        f"- Host latency: {context.latency_method}",
        *_litert_latency_lines(context),
        "",
        "## Candidates",
        "",
        *candidate_rows(context.candidates, context.winner.id if context.winner else None, fp32_p50),
        "",
        "MACs (multiply-accumulates of Conv, Gemm and MatMul nodes) and parameters are counted on each ONNX graph for one sample.",
        "",
    ]
    if context.pareto_link:
        lines += [f"Quality against host p50 latency, Pareto front marked: [{Path(context.pareto_link).name}]({context.pareto_link}) "
                  "(written beside the build report, not in the bundle).", ""]
    lines += _student_lines(context)
    if context.source_latency is not None:
        lines.append(
            f"Source model in PyTorch eager mode (FP32), same host and method: p50 {context.source_latency.p50_ms:.2f} ms, "
            f"p99 {context.source_latency.p99_ms:.2f} ms."
        )
        lines.append("")

    if context.warnings:
        lines += ["## Warnings", ""] + [f"- {warning}" for warning in context.warnings] + [""]

    lines += ["## Decision", ""]
    lines += [f"- {reason}" for reason in context.decision]
    lines.append("")

    failed = [c for c in context.candidates if not c.passed]
    if failed:
        lines += ["## Candidates that failed the gate (not shipped)", ""]
        for c in failed:
            lines.append(f"- `{c.id}`: drop {c.fidelity.drop:.4f} > {context.gate.max_drop:.4f}. " + " ".join(c.notes))
        lines.append("")

    if context.skipped:
        lines += ["## Candidates not built", ""]
        lines += [f"- {entry}" for entry in context.skipped]
        lines.append("")

    if context.build_failures:
        lines += ["## Candidates that could not be built (not shipped)", ""]
        lines += [f"- `{candidate_id}`: {error}" for candidate_id, error in context.build_failures.items()]
        lines.append("")

    lines += ["## Artifacts in the bundle", ""]
    candidates = {c.id: c for c in context.candidates}
    for artifact in context.artifacts:
        host = _host_validation(context, artifact, candidates.get(artifact.candidate))
        lines.append(
            f"- `{artifact.path}`: {artifact.format} {artifact.precision}, {_mib(artifact.size)} MiB, {host}; "
            f"runtimes on {context.profile.id}: {', '.join(artifact.runtimes) or 'none'}"
        )
    lines.append("")

    notes = list(context.profile.notes)
    if not context.host_representative:
        notes.append(
            f"This build host ({context.host_description}) matches {context.host_profile or 'no profile'}, not {context.profile.id}: host latency ranks the candidates "
            "relative to each other only and does not predict latency on the board."
        )
    int8_formats = sorted({c.format for c in context.candidates if c.precision == "int8"})
    if int8_formats:
        runtimes = " and ".join({"onnx": "ONNX Runtime CPU", "tflite": "LiteRT XNNPACK"}.get(f, f) for f in int8_formats)
        notes.append(
            f"INT8 fidelity was measured with the {runtimes} kernels of this host "
            f"({context.host_description}). Another CPU's or an accelerator's INT8 kernels can round differently."
        )
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def _student_lines(context: "BuildContext") -> list[str]:
    """Describe the pruning and training runs behind the student candidates, once per distinct run."""
    students = [c for c in context.candidates if c.stages]
    if not students:
        return []
    lines = ["## Pruning and training", ""]
    prune = next((c.stages["prune"] for c in students if "prune" in c.stages), None)
    if prune:
        kept = ", ".join(prune["kept_layers"]) or "none"
        lines.append(
            f"- Pruning (Torch-Pruning, {prune['importance']} importance, layers kept: {kept}): "
            f"parameters {prune['params_before']:,} -> {prune['params_after']:,}, "
            f"MACs {prune['macs_before']:,} -> {prune['macs_after']:,} ({prune['macs_counted_by']})."
        )
    # Candidates built from one student share its stage records, so each run is listed once.
    described: list[dict] = []
    for c in students:
        for stage in ("distillation", "qat"):
            run = c.stages.get(stage)
            if run is None or any(run is other for other in described):
                continue
            described.append(run)
            lines.append(_training_line(run, c.id if stage == "qat" else "the pruned model"))
    lines.append("")
    return lines


def _training_line(run: dict, subject: str) -> str:
    teacher = f" from {run['teacher']}" if run.get("teacher") else ""
    return (
        f"- {run['mode'].capitalize()} of {subject}{teacher}: loss {run['loss']}; "
        f"{run['epochs_run']} of at most {run['epochs']} epochs (lr {run['lr']:g}, batch {run['batch_size']}), "
        f"best validation {run['val_score']} {run['best_val_score']:.4f} at epoch {run['best_epoch']}"
        + (", stopped early" if run["stopped_early"] else "")
        + f"; {run['train_samples']} train / {run['val_samples']} validation samples of {run['train_data']}."
    )


def pareto_plot_path(out: Path, report_path: Path) -> Path:
    """Return where the Pareto plot goes: ``<report stem>.pareto.png`` beside the report, outside the bundle.

    A directory bundle contains its report, so its plot goes beside the directory as ``<out>.pareto.png``.
    """
    if report_path.parent == out:
        return out.with_name(f"{out.name}.pareto.png")
    return report_path.with_name(f"{report_path.stem}.pareto.png")


def write_pareto_plot(context: "BuildContext", path: Path) -> Path | None:
    """Plot each candidate's quality against its host p50 latency to ``path``; None when matplotlib is missing.

    The quality is top-1 accuracy when the evaluation data has labels, else the gate's fidelity score.
    """
    from edgeopt.builder.pareto import Candidate, plot_pareto

    labeled = context.evaluation.labels is not None
    points = [
        Candidate(c.id, c.latency.p50_ms, c.fidelity.accuracy if labeled else c.fidelity.score)
        for c in context.candidates
        if c.latency is not None and (not labeled or c.fidelity.accuracy is not None)
    ]
    if not points:
        return None
    score_label = "top-1 accuracy on the evaluation labels" if labeled else f"fidelity ({context.gate_metric_label} with the FP32 source)"
    try:
        return plot_pareto(
            points,
            path,
            score_label=score_label,
            latency_label="host latency p50 (ms), measured as in the report",
            title=f"{context.name} for {context.profile.id}: candidates on this host",
        )
    except ImportError as exc:
        log.warning("Pareto plot not written: %s; install matplotlib (pip install 'edgeopt[builder]')", exc)
        return None


def _litert_latency_lines(context: "BuildContext") -> list[str]:
    runtimes = sorted({c.validated_with for c in context.candidates if c.format == "tflite"})
    return [f"- Host latency of LiteRT candidates: {runtime}, same batch size and run counts" for runtime in runtimes]


def _host_validation(context: "BuildContext", artifact: "Artifact", candidate: "CandidateResult | None") -> str:
    """Say which runtime validated ``artifact`` here and which of its device runtimes this host lacks."""
    if not artifact.validated_on_host or candidate is None:
        return "**not validated on this host**"
    chain = {rt.label: rt for rt in context.profile.runtimes}
    missing = [label for label in artifact.runtimes if label in chain and runtime_unavailable_reason(chain[label])]
    if HOST_RUNTIME_LABEL.get(artifact.format) in artifact.runtimes:
        text = f"validated on this host with {candidate.validated_with}"
        return text + (f" ({', '.join(missing)} not available here)" if missing else "")
    return f"only validated on the host with {candidate.validated_with}; {', '.join(missing) or 'its device runtimes'} not available here"


def summary_lines(context: "BuildContext") -> list[str]:
    """Return a few lines for the terminal: the winner and why."""
    winner = context.winner
    lines = [f"{context.profile.id}: shipped {winner.id} ({winner.precision}, {_mib(winner.size)} MiB)"]
    lines += [f"  {reason}" for reason in context.decision]
    return lines
