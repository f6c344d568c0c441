"""``edgeopt devices``: list and show device profiles."""

from __future__ import annotations

import json

import click

from edgeopt.cli import InputError
from edgeopt.devices.probe import match_profiles, probe_host
from edgeopt.devices.profiles import DeviceProfile, ProfileError, list_profiles, load_profile


def _format_profile(profile: DeviceProfile) -> str:
    lines = [
        f"{profile.id}: {profile.name}",
        f"  arch          {profile.arch}, {profile.cpu}",
        f"  cores         {profile.cores}",
        f"  memory        {profile.memory_mb} MiB",
        f"  accelerator   {profile.accelerator}",
        f"  power sensor  {profile.power.sensor} (estimate range {profile.power.idle_w}-{profile.power.max_w} W: {profile.power.source})",
        f"  formats       {', '.join(profile.formats)}",
        f"  precisions    {' > '.join(profile.precision_preference)} (preference order)",
        "  runtime chain (first that loads and passes the self-test wins):",
    ]
    for index, runtime in enumerate(profile.runtimes, 1):
        options = ", ".join(f"{k}={v}" for k, v in runtime.options.items()) or "no options"
        lines.append(f"    {index}. {runtime.label} [{'/'.join(runtime.formats)}; {'/'.join(runtime.precisions)}] {options}")
    lines.append("  candidates built and evaluated:")
    for candidate in profile.candidates:
        if candidate.method == "static":
            detail = (
                f"static {candidate.quant_format}, activations {candidate.activation_type}"
                f"{' symmetric' if candidate.activation_symmetric else ''}, weights {candidate.weight_type}"
                f"{' symmetric' if candidate.weight_symmetric else ''}, "
                f"{'per-channel' if candidate.per_channel else 'per-tensor'}"
                f"{', reduce_range' if candidate.reduce_range else ''}, {candidate.calibration} calibration"
            )
        else:
            detail = {"none": "unquantized", "fp16": "FP16 conversion", "dynamic": "dynamic quantization"}[candidate.method]
        lines.append(f"    - {candidate.id} ({candidate.precision}, {candidate.format}): {detail}")
        if candidate.note:
            lines.append(f"      {candidate.note}")
    recognition = profile.recognition
    facts = []
    if recognition.device_tree_model:
        facts.append(f"device-tree model contains {' or '.join(map(repr, recognition.device_tree_model))}")
    if recognition.nv_tegra_release:
        facts.append(f"/etc/nv_tegra_release names {' or '.join(recognition.nv_tegra_release)}")
    if recognition.cpu_flags:
        facts.append(f"CPU flags {' '.join(recognition.cpu_flags)}")
    if recognition.system:
        facts.append(f"platform.system() == {recognition.system!r}")
    if recognition.machine:
        facts.append(f"machine in {', '.join(recognition.machine)}")
    lines.append(f"  recognised by {'; '.join(facts)}")
    for note in profile.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


@click.group(invoke_without_command=True)
@click.pass_context
def devices(ctx: click.Context) -> None:
    """List device profiles; `devices show NAME` prints one."""
    if ctx.invoked_subcommand is not None:
        return
    matches = {p.id for p in match_profiles(probe_host())}
    for profile in list_profiles():
        marker = "*" if profile.id in matches else " "
        click.echo(f"{marker} {profile.id:<16} {profile.name:<46} {profile.arch:<8} {profile.accelerator}")
    click.echo("(* matches this machine)")


@devices.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def show(name: str, as_json: bool) -> None:
    """Print one device profile."""
    try:
        profile = load_profile(name)
    except ProfileError as exc:
        raise InputError(str(exc)) from None
    if as_json:
        from dataclasses import asdict

        data = asdict(profile)
        data["path"] = str(profile.path)
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(_format_profile(profile))
