"""Errors a caller can fix, each bound to the gRPC status it maps to.

Every package raises these (or subclasses) for bad input; the gateway turns them into
`context.abort(code, message)` and the CLI into a one-line message with exit status 2.
Anything else is a bug: the gateway logs it with the request id and returns INTERNAL without a trace.
"""
from __future__ import annotations

import grpc


class UserError(Exception):
    """Base: a message that says what is wrong and how to fix it."""

    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


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


class Unavailable(UserError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(UserError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(UserError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(UserError):
    code = grpc.StatusCode.PERMISSION_DENIED


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, UserError)
