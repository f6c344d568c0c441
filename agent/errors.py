"""Domain errors of the agent and the one decorator that maps them to gRPC status codes.

The data plane raises these errors without knowing about gRPC; ``grpc_status`` on a
servicer method turns each into the status code the KServe v2 protocol expects.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import grpc

log = logging.getLogger(__name__)


class AgentError(Exception):
    """Base class of errors that a request can cause; the message goes to the client."""

    status = grpc.StatusCode.INTERNAL


class ModelNotFoundError(AgentError):
    """No loaded or known model has the requested name or version."""

    status = grpc.StatusCode.NOT_FOUND


class InvalidInputError(AgentError):
    """A request's tensors do not match the model signature or are malformed."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class OverloadedError(AgentError):
    """The request queue is full; the client should retry later."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(AgentError):
    """The model is unloading or the server is shutting down."""

    status = grpc.StatusCode.UNAVAILABLE


class LoadError(AgentError):
    """A bundle failed verification, the device check or every runtime candidate."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class InferenceError(AgentError):
    """The runtime failed while running a valid request."""

    status = grpc.StatusCode.INTERNAL


# Client mistakes are routine for a server, so they log at INFO; the rest need attention.
_CLIENT_STATUSES = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}


def grpc_status(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a unary servicer method so that errors end the RPC with a status code.

    An ``AgentError`` ends the call with its ``status`` and message. Any other exception is
    logged with its traceback and ends the call with INTERNAL, so one bad request never
    takes the server down.
    """

    @functools.wraps(method)
    def wrapper(self, request, context: grpc.ServicerContext):
        try:
            return method(self, request, context)
        except AgentError as exc:
            level = logging.INFO if exc.status in _CLIENT_STATUSES else logging.WARNING
            log.log(level, "%s from %s failed with %s: %s", method.__name__, context.peer(), exc.status.name, exc)
            context.abort(exc.status, str(exc))
        except Exception as exc:  # noqa: BLE001 - the server must answer every request
            log.exception("%s from %s failed with an unexpected error", method.__name__, context.peer())
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}: {type(exc).__name__}: {exc}")

    return wrapper
