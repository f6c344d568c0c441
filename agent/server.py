"""gRPC transport: the KServe v2 servicer, health checking, reflection and shutdown.

The servicer only translates between RPCs and the data plane; validation, queueing and
metrics live in ``edgeopt.agent.dataplane``.
"""

from __future__ import annotations

import logging
import signal
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
        """Bind the listen address, start serving and return the bound port."""
        try:
            port = self.server.add_insecure_port(self.config.listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.config.listen}: {exc}; choose a free HOST:PORT with --listen") from None
        if port == 0:
            raise OSError(f"cannot listen on {self.config.listen}; choose a free HOST:PORT with --listen")
        self.port = port
        self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving KServe v2 gRPC on %s (port %d)", self.config.listen, port)
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
