"""Errors the service reports on purpose, each bound to the gRPC status it maps to.

Two families under `RouterError`:
- `UserError`: the caller can fix it (bad input, missing thing, wrong state, quota, credentials). The message
  says what is wrong and how to fix it. The CLI prints it as one line and exits with status 2.
- `ServiceError`: not the caller's fault and usually transient (`Unavailable`, `DeadlineExceeded`): retrying
  later may succeed. The CLI prints it as one line and exits with status 1.

The gateway turns both into `context.abort(code, message)` in one place (`router.grpc_errors`). Anything else
is a bug: logged with the request id and returned as INTERNAL without a trace.
"""
from __future__ import annotations

import grpc


class RouterError(Exception):
    """Base of every error reported on purpose; `code` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class UserError(RouterError):
    """The caller can fix this; the message says how."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidArgument(UserError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(UserError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(UserError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(UserError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(UserError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(UserError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(UserError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ServiceError(RouterError):
    """Not the caller's fault and usually transient: the same call may succeed later."""

    code = grpc.StatusCode.UNAVAILABLE


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ConfigError(InvalidArgument):
    """A configuration value is wrong; the message names the key and how to fix it."""


def quoted(value: object, limit: int = 64) -> str:
    """`repr` of a caller-supplied value for an error message, cut to `limit` characters: a message never echoes
    an arbitrarily large input back."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
