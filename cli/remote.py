"""Commands that talk to a running gateway: one SDK client, its errors turned into one-line CLI errors."""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

import grpc

from core import envs, errors
from router.client import Client, GatewayError

DEFAULT_GATEWAY = "127.0.0.1:50051"
TOKEN_ENV = "SPECIALIST_ROUTER_TOKEN"
_BY_CODE = {c.code: c for c in (errors.InvalidArgument, errors.NotFound, errors.AlreadyExists,
                                errors.FailedPrecondition, errors.ResourceExhausted, errors.Unauthenticated,
                                errors.PermissionDenied, errors.Unavailable, errors.DeadlineExceeded)}


def add_gateway_flags(p: argparse.ArgumentParser, *, timeout_s: float = 300.0) -> None:
    p.add_argument("--gateway", default=DEFAULT_GATEWAY, help=f"gateway address (default {DEFAULT_GATEWAY})")
    p.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=timeout_s, help=f"seconds to wait for the gateway "
                                                                    f"(default {timeout_s:.0f})")


def translate(exc: GatewayError, gateway: str) -> errors.RouterError:
    """The gateway's status as the CLI's error, with what to do about the common ones."""
    code, details = exc.code, exc.message
    if code == grpc.StatusCode.UNAVAILABLE:
        return errors.Unavailable(f"cannot reach the gateway at {gateway} ({details}); start it with "
                                  "`specialist-router serve` or pass --gateway HOST:PORT")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.DeadlineExceeded(f"the gateway at {gateway} did not answer in time ({details}); raise "
                                       "--timeout or check its logs")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return errors.Unauthenticated(f"{details or 'unauthenticated'}; pass --token or set {TOKEN_ENV}")
    cls = _BY_CODE.get(code)
    if cls is None:
        return errors.ServiceError(f"the gateway at {gateway} failed: {code.name}: {details}")
    return cls(details)


@contextlib.contextmanager
def gateway_client(gateway: str, token: str | None = None, timeout: float | None = 300.0) -> Iterator[Client]:
    """An SDK client for `gateway`; a GatewayError inside the block leaves as a core.errors error."""
    tok = token if token is not None else envs.get("SPECIALIST_ROUTER_TOKEN")
    with Client(gateway, token=tok, timeout=timeout) as client:
        try:
            yield client
        except GatewayError as exc:
            raise translate(exc, gateway) from None


def client_from(args) -> contextlib.AbstractContextManager[Client]:
    return gateway_client(args.gateway, args.token, args.timeout)
