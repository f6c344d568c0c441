"""gRPC transport: the KServe v2 servicer, health checking, reflection and shutdown.

The servicer only translates between RPCs and the data plane; validation, queueing and
metrics live in ``edgeopt.agent.dataplane``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from edgeopt import __version__
from edgeopt.agent.dataplane import DataPlane
from edgeopt.agent.errors import grpc_status
from edgeopt.agent.protos import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
DEFAULT_LISTEN = "127.0.0.1:8001"
# Protocol extensions this server implements, as named in ServerMetadata by Triton.
EXTENSIONS = ("model_repository",)
LISTEN_FORM = "HOST:PORT with a port from 0 to 65535, such as 127.0.0.1:8001, 0.0.0.0:8001 or [::1]:8001"


class ListenError(OSError):
    """The listen address cannot be bound; the message names the address and the fix."""


@dataclass(frozen=True)
class ListenAddress:
    """A parsed ``HOST:PORT`` listen address; ``host`` has no IPv6 brackets."""

    host: str
    port: int

    def with_port(self, port: int) -> str:
        """Format the host with ``port`` the way gRPC expects, bracketing an IPv6 host."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{port}"

    def __str__(self) -> str:
        return self.with_port(self.port)


def parse_listen(value: str) -> ListenAddress:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT``, raising ValueError that names the value and the expected form.

    Parsing is strict because gRPC reads a bare host as port 443 and would serve there silently.
    """
    text = value.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"invalid --listen value {value!r}: an IPv6 host in brackets must be followed by :PORT; expected {LISTEN_FORM}")
        port_text = rest[1:]
        if ":" not in host:
            raise ValueError(f"invalid --listen value {value!r}: {host!r} in brackets is not an IPv6 address; expected {LISTEN_FORM}")
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"invalid --listen value {value!r}: the port is missing; expected {LISTEN_FORM}")
        if ":" in host:
            raise ValueError(f"invalid --listen value {value!r}: put an IPv6 host in brackets; expected {LISTEN_FORM}")

    if not host:
        raise ValueError(f"invalid --listen value {value!r}: the host is missing (use 0.0.0.0 for every interface); expected {LISTEN_FORM}")
    if not port_text:
        raise ValueError(f"invalid --listen value {value!r}: the port is missing; expected {LISTEN_FORM}")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"invalid --listen value {value!r}: port {port_text!r} is not a number; expected {LISTEN_FORM}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"invalid --listen value {value!r}: port {port} is above 65535; expected {LISTEN_FORM}")
    return ListenAddress(host, port)


def check_bindable(address: ListenAddress) -> None:
    """Bind and close a test socket on every address ``address.host`` resolves to.

    gRPC reports a failed bind with a C-core log line and a generic RuntimeError, so the
    agent checks first and raises ListenError with the cause and the fix. A host that
    resolves to several addresses (``localhost``) passes if one of them binds and none is in use.
    A port taken between this check and gRPC's own bind still fails in ``AgentServer.start``,
    after gRPC has logged its own line.
    """
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {address}: host {address.host!r} not found ({exc.strerror}); pass a local address such as 127.0.0.1 or 0.0.0.0 with --listen") from None

    failures: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # gRPC sets SO_REUSEADDR too, so connections in TIME_WAIT do not count as in use.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # gRPC listens dual-stack on "::", so an IPv4 listener on the port conflicts too.
                with contextlib.suppress(OSError):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                failures.append(exc)

    in_use = [f for f in failures if f.errno == errno.EADDRINUSE]
    if not in_use and len(failures) < len(infos):
        return

    error = in_use[0] if in_use else failures[0]
    if error.errno == errno.EADDRINUSE:
        reason = "address already in use; choose a free port with --listen"
    elif error.errno == errno.EACCES:
        reason = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE); choose a port of 1024 or above with --listen"
    elif error.errno == errno.EADDRNOTAVAIL:
        reason = f"{address.host} is not an address of this machine; pass a local address such as 127.0.0.1 or 0.0.0.0 with --listen"
    else:
        reason = f"{error.strerror or error}; choose another address with --listen"
    raise ListenError(f"cannot listen on {address}: {reason}")


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe v2 ``inference.GRPCInferenceService`` backed by a DataPlane."""

    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane

    @grpc_status
    def ServerLive(self, request, context):
        return inference_pb2.ServerLiveResponse(live=True)

    @grpc_status
    def ServerReady(self, request, context):
        return inference_pb2.ServerReadyResponse(ready=self.dataplane.is_ready())

    @grpc_status
    def ServerMetadata(self, request, context):
        return inference_pb2.ServerMetadataResponse(name="edgeopt", version=__version__, extensions=EXTENSIONS)

    @grpc_status
    def ModelReady(self, request, context):
        return inference_pb2.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    @grpc_status
    def ModelMetadata(self, request, context):
        model = self.dataplane.get(request.name, request.version)
        response = inference_pb2.ModelMetadataResponse(name=model.name, versions=[model.version], platform=model.backend.runtime)
        for spec in model.inputs.values():
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in model.outputs.values():
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    @grpc_status
    def ModelInfer(self, request, context):
        return self.dataplane.infer(request)

    @grpc_status
    def RepositoryIndex(self, request, context):
        response = inference_pb2.RepositoryIndexResponse()
        for entry in self.dataplane.index(ready_only=request.ready):
            response.models.add(**entry)
        return response

    @grpc_status
    def RepositoryModelLoad(self, request, context):
        self.dataplane.load_by_name(request.model_name)
        return inference_pb2.RepositoryModelLoadResponse()

    @grpc_status
    def RepositoryModelUnload(self, request, context):
        self.dataplane.unload(request.model_name)
        return inference_pb2.RepositoryModelUnloadResponse()


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """Build the pool that server reflection serves: inference, health and reflection files.

    The inference messages live in a private pool (see protos/generate.py), so reflection
    cannot use protobuf's default pool.
    """
    pool = descriptor_pool.DescriptorPool()
    for module in (inference_pb2, health_pb2, reflection_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


@dataclass
class ServerConfig:
    """Transport settings."""

    listen: str = DEFAULT_LISTEN
    max_message_bytes: int = 64 * 1024 * 1024
    grace_s: float = 30.0
    # Control RPCs (health, metadata) beyond the data plane's request capacity.
    control_threads: int = 4


class AgentServer:
    """A gRPC server with the inference, health and reflection services."""

    def __init__(self, dataplane: DataPlane, config: ServerConfig | None = None):
        self.dataplane = dataplane
        self.config = config or ServerConfig()
        self.port: int | None = None
        self._stopped = threading.Event()

        # Every request admitted by the data plane needs a thread; gRPC rejects RPCs beyond
        # maximum_concurrent_rpcs with RESOURCE_EXHAUSTED instead of queueing them unseen.
        dp = dataplane.config
        threads = dp.max_concurrency + dp.max_queue + self.config.control_threads
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="agent-rpc"),
            options=options,
            maximum_concurrent_rpcs=threads,
        )

        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server, pool=_reflection_pool()
        )

    def start(self) -> int:
        """Bind the listen address, start serving and return the bound port.

        Raises ValueError for a malformed address and ListenError when it cannot be bound.
        """
        address = parse_listen(self.config.listen)
        check_bindable(address)
        try:
            port = self.server.add_insecure_port(str(address))
        except RuntimeError:
            # The port was taken after check_bindable; gRPC's own text only suggests GRPC_VERBOSITY.
            port = 0
        if port == 0:
            raise ListenError(f"cannot listen on {address}: gRPC failed to bind it (the port may have been taken just now); choose a free port with --listen")
        self.port = port
        self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving KServe v2 gRPC on %s (max message %d bytes)", address.with_port(port), self.config.max_message_bytes)
        return port

    def stop(self, grace: float | None = None) -> threading.Event:
        """Reject new RPCs, let in-flight ones finish within ``grace`` seconds, then stop."""
        grace = self.config.grace_s if grace is None else grace
        log.info("stopping: in-flight requests get up to %.0f s to finish", grace)
        self.dataplane.shutting_down = True
        self.health.enter_graceful_shutdown()
        done = self.server.stop(grace)

        def finish() -> None:
            done.wait()
            self.dataplane.close()
            log.info("stopped")
            self._stopped.set()

        threading.Thread(target=finish, name="agent-shutdown", daemon=True).start()
        return self._stopped

    def install_signal_handlers(self) -> None:
        """Stop gracefully on SIGTERM and SIGINT; call from the main thread."""

        def handle(signum, frame) -> None:
            log.info("received %s", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ``stop`` has finished; return False on timeout."""
        return self._stopped.wait(timeout)
