"""``edgeopt bundle``: inspect and verify bundles without loading a model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from edgeopt.agent.bundle import BundleError, Manifest, open_bundle
from edgeopt.cli import InputError


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size} B"


def _summarize(value, limit: int = 160) -> str:
    """Render a recipe entry on one line: scalars as they are, lists as a count, long text cut."""
    if isinstance(value, dict):
        text = ", ".join(f"{k}={_summarize(v, 40)}" for k, v in value.items() if v is not None)
    elif isinstance(value, list):
        text = f"[{len(value)} entries]" if len(value) > 4 or any(isinstance(v, (dict, list)) for v in value) else ", ".join(map(str, value))
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_manifest(manifest: Manifest) -> str:
    raw = manifest.raw
    lines = [
        f"bundle     {manifest.name} version {manifest.version} for {manifest.device}",
        f"created    {raw.get('created', '?')} by edgeopt {raw.get('edgeopt_version', '?')}",
        f"source     {raw.get('source', {}).get('spec', '?')} (sha256 {str(raw.get('source', {}).get('sha256', '?'))[:16]}…)",
        "inputs     " + "; ".join(t.describe() for t in manifest.inputs),
        "outputs    " + "; ".join(t.describe() for t in manifest.outputs),
    ]
    if raw.get("preprocess"):
        lines.append("preprocess " + json.dumps(raw["preprocess"]))
    if raw.get("labels"):
        lines.append(f"labels     {raw['labels']}")
    lines.append("artifacts (best first):")
    for artifact in manifest.artifacts:
        host = "" if artifact.validated_on_host else ", not validated on the host"
        lines.append(
            f"  {artifact.path:<28} {artifact.format:<6} {artifact.precision:<5} {_human_size(artifact.size):>10}"
            f"  runtimes: {', '.join(artifact.runtimes) or 'none'}{host}"
        )
    recipe = raw.get("recipe", {})
    if recipe:
        lines.append("recipe:")
        lines.extend(f"  {key:<18} {_summarize(value)}" for key, value in recipe.items() if value is not None)
    metrics = raw.get("metrics", {})
    for candidate_id, entry in metrics.get("candidates", {}).items():
        fidelity = entry.get("fidelity", {})
        latency = entry.get("latency", {})
        parts = [f"{k}={v}" for k, v in fidelity.items() if isinstance(v, (int, float))]
        if latency:
            parts.append(f"host p50 {latency.get('p50_ms')} ms")
        lines.append(f"metrics    {candidate_id}: {', '.join(parts)}")
    if metrics.get("latency_measured_on"):
        lines.append(f"measured   {metrics['latency_measured_on']}")
    selftest = manifest.selftest
    if selftest:
        lines.append(f"selftest   inputs {selftest.get('inputs')}, expected {selftest.get('expected')}")
    lines.append(f"files      {len(raw['files'])} listed with sha256")
    return "\n".join(lines)


@click.group()
def bundle() -> None:
    """Inspect or verify a bundle directory or .tar file."""


@bundle.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.json.")
def inspect_command(path: Path, as_json: bool) -> None:
    """Print a bundle's manifest in readable form (verifies it first)."""
    with tempfile.TemporaryDirectory(prefix="edgeopt-inspect-") as scratch:
        try:
            _, manifest = open_bundle(path, extract_root=Path(scratch))
        except BundleError as exc:
            raise InputError(str(exc)) from None
        click.echo(json.dumps(manifest.raw, indent=2) if as_json else format_manifest(manifest))


@bundle.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
def verify_command(path: Path) -> None:
    """Check every file of a bundle against the sha256 in its manifest."""
    with tempfile.TemporaryDirectory(prefix="edgeopt-verify-") as scratch:
        try:
            _, manifest = open_bundle(path, extract_root=Path(scratch))
        except BundleError as exc:
            raise click.ClickException(f"verification failed for {path}: {exc}") from None
    click.echo(f"OK {path}: {len(manifest.raw['files'])} files match their sha256")
