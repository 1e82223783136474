"""Domain errors and the one place that maps them to gRPC status codes.

Code below the services raises these plain exceptions; only the server's
interceptor turns them into gRPC statuses, so no layer but the edge knows gRPC.
"""

from __future__ import annotations

import asyncio

import grpc


class CriError(Exception):
    """Base of every error the runtime reports to a CRI client on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(CriError):
    """The request is malformed; nothing was changed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CriError):
    """An id, name or image the request names does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CriError):
    """A name is already reserved by another object."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CriError):
    """The object is in the wrong state for the request (start a running container)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(CriError):
    """The RPC or option is not built yet: say so rather than fake a success."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(CriError):
    """A dependency (registry, plugin) could not be reached; the client may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(CriError):
    """A bounded resource (tokens, subscribers) is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Internal(CriError):
    """A failure of ours or of an external program; the message says which."""

    code = grpc.StatusCode.INTERNAL


def grpc_code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code a client sees for an exception raised by a handler."""
    if isinstance(exc, CriError):
        return type(exc).code  # the class's: an instance attribute `code` may mean something else
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL
