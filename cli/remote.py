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
    p.add_argument("--tls", action="store_true", help="connect over TLS with the system's root certificates")
    p.add_argument("--ca-cert", default=None, help="PEM file of the CA that signed the gateway's certificate "
                                                   "(implies --tls)")
    p.add_argument("--client-cert", default=None, help="PEM client certificate, for a gateway that requires mutual TLS")
    p.add_argument("--client-key", default=None, help="PEM key of --client-cert")


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
def gateway_client(gateway: str, token: str | None = None, timeout: float | None = 300.0, *, tls: bool = False,
                   ca_cert: str | None = None, client_cert: str | None = None,
                   client_key: str | None = None) -> Iterator[Client]:
    """An SDK client for `gateway`; a GatewayError inside the block leaves as a core.errors error."""
    tok = token if token is not None else envs.get("SPECIALIST_ROUTER_TOKEN")
    if (client_cert is None) != (client_key is None):
        raise errors.InvalidArgument("mutual TLS needs both --client-cert and --client-key")
    with Client(gateway, token=tok, timeout=timeout, tls=tls, root_certificates=ca_cert, client_cert=client_cert,
                client_key=client_key) as client:
        try:
            yield client
        except GatewayError as exc:
            raise translate(exc, gateway) from None


def client_from(args) -> contextlib.AbstractContextManager[Client]:
    return gateway_client(args.gateway, args.token, args.timeout, tls=args.tls, ca_cert=args.ca_cert,
                          client_cert=args.client_cert, client_key=args.client_key)
