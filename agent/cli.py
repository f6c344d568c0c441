"""``edgeopt agent``: serve bundles over KServe v2 gRPC (``run``) and report runtimes (``probe``)."""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import click

from edgeopt.agent.dataplane import DataPlane, DataPlaneConfig
from edgeopt.agent.errors import LoadError
from edgeopt.agent.server import DEFAULT_LISTEN, AgentServer, ListenError, ServerConfig, check_bindable, parse_listen
from edgeopt.cli import InputError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/edgeopt"


def build_agent(
    bundles: list[Path], dataplane_config: DataPlaneConfig, server_config: ServerConfig
) -> tuple[AgentServer, DataPlane]:
    """Load every bundle and start the gRPC server; return both without blocking.

    A bundle that fails to load raises LoadError before anything listens.
    """
    dataplane = DataPlane(dataplane_config)
    try:
        for path in bundles:
            dataplane.load(path)
        server = AgentServer(dataplane, server_config)
        server.start()
    except BaseException:
        dataplane.close()
        raise
    return server, dataplane


def _positive(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"{value} is not a positive integer", ctx=ctx, param=param)
    return value


@click.group()
def agent() -> None:
    """Serve bundles on this device and inspect its runtimes."""


@agent.command()
@click.option("--bundle", "bundles", multiple=True, type=click.Path(path_type=Path), help="Bundle directory or .tar to serve; repeat for several.")
@click.option("--repository", type=click.Path(file_okay=False, path_type=Path), help="Directory of bundles that RepositoryModelLoad can load by model name.")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT to serve gRPC on, with an IPv6 host in brackets ([::1]:8001); port 0 picks a free port.")
@click.option("--force", is_flag=True, help="Load bundles built for another device profile, with a warning.")
@click.option("--cache-dir", default=DEFAULT_CACHE_DIR, show_default=True, type=click.Path(file_okay=False), help="Directory for extracted bundles and TensorRT/CoreML engine caches.")
@click.option("--max-concurrency", type=int, callback=_positive, help="Concurrent runs per model [default: sized from the CPU count].")
@click.option("--intra-op-threads", type=int, callback=_positive, help="ONNX Runtime threads per run, and LiteRT threads where the profile sets no num_threads [default: sized from the CPU count].")
@click.option("--max-queue", type=int, default=32, show_default=True, callback=_positive, help="Requests per model that may wait for a run before RESOURCE_EXHAUSTED.")
@click.option("--max-message-mb", type=int, default=64, show_default=True, callback=_positive, help="Largest gRPC message, in MiB. It bounds both requests and responses: the client gets RESOURCE_EXHAUSTED \"Received message larger than max\" for a larger request and \"Sent message larger than max\" for a larger response.")
@click.option("--grace", type=float, default=30.0, show_default=True, help="Seconds in-flight requests get to finish after SIGTERM.")
# MQTT telemetry options (agent/telemetry.py).
@click.option("--broker", help="Report telemetry to this MQTT broker: mqtt://[user:pass@]host:port or mqtts://host:port.")
@click.option("--fleet", default="default", show_default=True, help="Fleet name, the topic level above the device id.")
@click.option("--device-id", help="Device id in topics and payloads [default: hostname plus a hash of /etc/machine-id].")
@click.option("--metrics-interval", type=float, default=5.0, show_default=True, help="Seconds between metrics messages.")
@click.option("--ca", type=click.Path(dir_okay=False, path_type=Path), help="CA certificate (PEM) for an mqtts:// broker.")
@click.option("--cert", type=click.Path(dir_okay=False, path_type=Path), help="Client certificate (PEM) for an mqtts:// broker.")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), help="Client private key (PEM) for an mqtts:// broker.")
def run(bundles, repository, listen, force, cache_dir, max_concurrency, intra_op_threads, max_queue, max_message_mb, grace, broker, fleet, device_id, metrics_interval, ca, cert, key) -> None:
    """Verify bundles, select a runtime for each and serve KServe v2 gRPC until SIGTERM."""
    try:
        address = parse_listen(listen)
        # Checked again by AgentServer.start; checking now saves loading bundles for nothing.
        check_bindable(address)
    except (ValueError, ListenError) as exc:
        raise InputError(str(exc)) from None
    if not bundles and repository is None:
        raise InputError("no bundle to serve: pass --bundle PATH (repeatable) or --repository DIR")
    for path in bundles:
        if not path.exists():
            raise InputError(f"bundle {path} not found: pass a bundle directory or .tar file")
    if repository is not None and not repository.is_dir():
        raise InputError(f"repository {repository} is not a directory")

    telemetry_config = None
    if broker:
        from edgeopt.agent.telemetry import config_from_options

        try:
            telemetry_config = config_from_options(broker, fleet, device_id, metrics_interval, ca, cert, key)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    started = time.perf_counter()
    dataplane_config = DataPlaneConfig(
        cache_dir=Path(cache_dir).expanduser(),
        force=force,
        max_concurrency=max_concurrency,
        intra_op_threads=intra_op_threads,
        max_queue=max_queue,
        repository=repository,
    )
    server_config = ServerConfig(listen=listen, max_message_bytes=max_message_mb * 1024 * 1024, grace_s=grace)
    try:
        server, dataplane = build_agent(list(bundles), dataplane_config, server_config)
    except (LoadError, OSError) as exc:
        raise InputError(str(exc)) from None

    server.install_signal_handlers()
    for model in dataplane.models():
        click.echo(f"serving {model['name']} version {model['version']} on {model['runtime']} ({model['artifact']}, {model['precision']})")
    click.echo(
        f"edgeopt agent listening on {address.with_port(server.port)} "
        f"(max message {max_message_mb} MiB, ready in {time.perf_counter() - started:.2f} s)"
    )
    sys.stdout.flush()

    reporter = None
    if telemetry_config is not None:
        from edgeopt.agent.telemetry import start_agent_telemetry

        reporter = start_agent_telemetry(telemetry_config, dataplane)
        click.echo(f"reporting to {telemetry_config.broker} as {telemetry_config.fleet}/{telemetry_config.device_id}")
        sys.stdout.flush()

    # A timed wait keeps the main thread responsive to SIGTERM and SIGINT.
    try:
        while not server.wait(timeout=0.5):
            pass
    finally:
        if reporter is not None:
            reporter.stop()


@agent.command()
@click.option("--bundle", type=click.Path(path_type=Path), help="Also report which runtime and artifact this bundle would use, and why.")
@click.option("--force", is_flag=True, help="Walk the bundle's runtime chain even if its device profile does not match this board.")
@click.option("--cache-dir", default=DEFAULT_CACHE_DIR, show_default=True, type=click.Path(file_okay=False), help="Directory for extracted bundles and engine caches.")
def probe(bundle, force, cache_dir) -> None:
    """Print this board's profile matches, runtimes and execution providers."""
    from edgeopt.agent.bundle import BundleError, open_bundle
    from edgeopt.agent.selection import check_device, describe_runtimes, provider_choice, recorded_chain_mismatch, select_runtime
    from edgeopt.devices.probe import match_profiles, probe_host

    facts = probe_host()
    matches = [p.id for p in match_profiles(facts)]
    click.echo(f"board      {facts.describe()}")
    click.echo(f"profiles   {', '.join(matches) or 'none match'}")
    for line in describe_runtimes():
        click.echo(f"runtime    {line}")
    if bundle is None:
        return

    cache = Path(cache_dir).expanduser()
    try:
        with tempfile.TemporaryDirectory(prefix="edgeopt-probe-") as scratch:
            bundle_dir, manifest = open_bundle(bundle, Path(scratch))
            click.echo(f"bundle     {manifest.name} version {manifest.version} for {manifest.device}")
            profile = check_device(manifest, facts, force)
            selection = select_runtime(bundle_dir, manifest, profile, cache)
            selection.backend.close()
    except BundleError as exc:
        raise InputError(f"bundle {bundle}: {exc}") from None
    except LoadError as exc:
        raise InputError(str(exc)) from None

    click.echo(f"chain      {' -> '.join(rt.label for rt in profile.runtimes)} ({profile.id})")
    for runtime in profile.runtimes:
        options = provider_choice(runtime, cache).options if runtime.kind == "onnxruntime" else runtime.options
        if options:
            click.echo(f"options    {runtime.label}: {', '.join(f'{key}={value}' for key, value in options.items())}")
    mismatch = recorded_chain_mismatch(manifest, profile)
    if mismatch:
        click.echo(f"note       {mismatch}")
    for attempt in selection.attempts:
        click.echo(f"  {attempt.describe()}")
    click.echo(f"would use  {selection.backend.runtime} with {selection.artifact.path} ({selection.artifact.precision})")
