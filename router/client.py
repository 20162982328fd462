"""Python SDK for specialist-router: sync (`Client`) and asyncio (`AsyncClient`).

    from router.client import Client
    with Client("127.0.0.1:50051") as c:
        r = c.generate([{"role": "user", "content": "Write a haiku about SQL"}], max_tokens=64)
        print(r.text, r.adapter, r.route.task)
        for chunk in c.stream("Explain LoRA in one line"):
            print(chunk.delta, end="")

Admin (typed, sync and async alike): `list_adapters()`, `load_adapter(name, path)`, `unload_adapter(name)`,
`deploy(task, version)`, `rollback(task)`, `retire(task)`, `reload_classifier(path)`.

Deadlines: `timeout=` seconds per call, retries included (DEADLINE_EXCEEDED when passed; the request is aborted
in the backend). Retries: gRPC's own retry policy (the channel's service config), only on UNAVAILABLE, with
exponential backoff and jitter; a stream is never retried once its first message arrived (no duplicated partial
answer). Errors raise `GatewayError` with the gRPC code and the server's message. Auth: `token=` (or env
SPECIALIST_ROUTER_TOKEN) sent as `authorization: Bearer`. TLS: `tls=True` (system roots) or
`root_certificates=` (the gateway's CA, PEM bytes or a path); mutual TLS adds `client_cert=` and `client_key=`;
`server_name=` when the certificate names another host than `target`. Or pass `channel=`, a channel you built
(a load balancer, interceptors, your own credentials).

This module imports only grpc, protobuf and the generated stubs: an application needs nothing else to call
the gateway.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Sequence

import grpc

from router import client_types as types
from router.client_types import (
    AdapterInfo,
    Adapters,
    Chunk,
    Classification,
    ClassifierInfo,
    DeployResult,
    Result,
    Route,
    Timings,
    Usage,
)
from router.v1 import router_pb2 as pb
from router.v1 import router_pb2_grpc as pbg

__all__ = ["AdapterInfo", "Adapters", "AsyncClient", "Chunk", "Classification", "ClassifierInfo", "Client",
           "DeployResult", "GatewayError", "Result", "RetryPolicy", "Route", "Timings", "Usage"]

Messages = str | Sequence[dict]
_EFFORT = {None: 0, "": 0, "low": 1, "medium": 2, "high": 3}


class GatewayError(Exception):
    """A gRPC error from the gateway: `.code` (grpc.StatusCode) and `.message` (what to fix)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _messages(m: Messages) -> list[pb.ChatMessage]:
    if isinstance(m, str):
        return [pb.ChatMessage(role="user", content=m)]
    return [pb.ChatMessage(role=str(x["role"]), content=str(x["content"])) for x in m]


def build_request(cls, messages: Messages, *, max_tokens=None, temperature=None, top_p=None, seed=None, stop=None,
                  reasoning_effort=None, adapter="", task="", client_id=""):
    sp = pb.SamplingParams(stop=list(stop or []))
    if max_tokens is not None:
        sp.max_tokens = int(max_tokens)
    if temperature is not None:
        sp.temperature = float(temperature)
    if top_p is not None:
        sp.top_p = float(top_p)
    if seed is not None:
        sp.seed = int(seed)
    if reasoning_effort not in _EFFORT:
        raise ValueError("reasoning_effort must be None, 'low', 'medium' or 'high'")
    return cls(messages=_messages(messages), sampling=sp, reasoning_effort=_EFFORT[reasoning_effort],
               adapter=adapter, task=task, client_id=client_id)


@dataclass
class RetryPolicy:
    """Retries on UNAVAILABLE only (gRPC's retry policy): attempts in all (1 = no retry, at most 5), backoff
    base/max seconds."""

    attempts: int = 4
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0

    def service_config(self) -> str:
        if not 2 <= self.attempts <= 5:
            raise ValueError("RetryPolicy.attempts must be within 1..5 (gRPC's limit); 1 means no retry")
        policy = {"maxAttempts": self.attempts, "initialBackoff": f"{self.backoff_s}s",
                  "maxBackoff": f"{self.max_backoff_s}s", "backoffMultiplier": 2,
                  "retryableStatusCodes": ["UNAVAILABLE"]}
        names = [{"service": "router.v1.RouterService"}, {"service": "router.v1.AdminService"}]
        return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def _metadata(token: str | None) -> tuple:
    tok = token if token is not None else os.environ.get("SPECIALIST_ROUTER_TOKEN", "")
    return (("authorization", f"Bearer {tok}"),) if tok else ()


def channel_options(retry: RetryPolicy | None = None) -> list[tuple]:
    """Options for a channel to the gateway: message size and the retry policy."""
    retry = retry or RetryPolicy()
    if retry.attempts == 1:
        return [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.enable_retries", 0)]
    return [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.enable_retries", 1),
            ("grpc.service_config", retry.service_config())]


def _pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    """PEM bytes as given, or read from a file path."""
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def tls_credentials(root_certificates=None, client_cert=None, client_key=None) -> grpc.ChannelCredentials:
    """Channel credentials for a gateway that serves TLS. `root_certificates`: the CA that signed the gateway's
    certificate (PEM bytes or a file path; None: the system's roots). `client_cert` + `client_key`: this client's
    certificate for a gateway that requires mutual TLS."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("mutual TLS needs both client_cert and client_key")
    return grpc.ssl_channel_credentials(_pem(root_certificates), _pem(client_key), _pem(client_cert))


def _channel(aio: bool, target: str, retry: RetryPolicy | None, tls: bool, root_certificates, client_cert,
             client_key, server_name: str | None):
    mod = grpc.aio if aio else grpc
    options = channel_options(retry)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if tls or root_certificates is not None or client_cert is not None:
        return mod.secure_channel(target, tls_credentials(root_certificates, client_cert, client_key), options=options)
    return mod.insecure_channel(target, options=options)


class _Base:
    """What the sync and async clients share: requests in, typed results out."""

    def _setup(self, channel, token: str | None, timeout: float | None) -> None:
        self.channel = channel
        self.stub = pbg.RouterServiceStub(channel)
        self.admin = pbg.AdminServiceStub(channel)
        self.metadata = _metadata(token)
        self.timeout = timeout

    def _t(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    @staticmethod
    def _error(e: grpc.RpcError) -> GatewayError:
        return GatewayError(e.code(), e.details() or "")

    # one place per RPC: (stub method, request, shape of the answer)
    def _rpc(self, name: str, *args, **kw):
        if name == "generate":
            return self.stub.Generate, build_request(pb.GenerateRequest, *args, **kw), types.result
        if name == "classify":
            return self.stub.Classify, pb.ClassifyRequest(text=args[0]), types.classification
        if name == "feedback":
            return self.stub.SubmitFeedback, pb.SubmitFeedbackRequest(request_id=args[0], rating=args[1], **kw), \
                lambda r: r
        if name == "list_adapters":
            return self.admin.ListAdapters, pb.ListAdaptersRequest(), \
                lambda r: types.Adapters([types.adapter(a) for a in r.adapters], {e.task: e.adapter for e in r.routes},
                                         [types.replica(x) for x in r.replicas])
        if name == "load_adapter":
            return self.admin.LoadAdapter, pb.LoadAdapterRequest(name=args[0], path=args[1]), \
                lambda r: types.adapter(r.adapter)
        if name == "unload_adapter":
            return self.admin.UnloadAdapter, pb.UnloadAdapterRequest(name=args[0]), lambda r: None
        if name == "deploy":
            return self.admin.DeployAdapter, pb.DeployAdapterRequest(task=args[0], version=str(args[1] or "")), \
                lambda r: types.DeployResult(r.task, r.version, r.adapter, r.previous_version, r.swap_ms)
        if name == "rollback":
            return self.admin.RollbackAdapter, pb.RollbackAdapterRequest(task=args[0]), \
                lambda r: types.DeployResult(r.task, r.version, r.adapter)
        if name == "retire":
            return self.admin.RetireAdapter, pb.RetireAdapterRequest(task=args[0]), \
                lambda r: types.DeployResult(r.task, "", "", r.previous_version)
        if name == "reload_classifier":
            return self.admin.ReloadClassifier, pb.ReloadClassifierRequest(path=args[0] or ""), \
                lambda r: types.ClassifierInfo(r.version, list(r.tasks))
        raise AssertionError(name)


class Client(_Base):
    """Blocking client. Thread-safe; reuse one per process."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, timeout: float | None = 120.0,
                 retry: RetryPolicy | None = None, channel: grpc.Channel | None = None, tls: bool = False,
                 root_certificates: bytes | str | None = None, client_cert: bytes | str | None = None,
                 client_key: bytes | str | None = None, server_name: str | None = None):
        self._setup(channel or _channel(False, target, retry, tls, root_certificates, client_cert, client_key,
                                        server_name), token, timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, name: str, *args, timeout: float | None = None, **kw):
        fn, request, shape = self._rpc(name, *args, **kw)
        try:
            return shape(fn(request, timeout=self._t(timeout), metadata=self.metadata))
        except grpc.RpcError as e:
            raise self._error(e) from None

    def generate(self, messages: Messages, *, timeout: float | None = None, **kw) -> Result:
        return self._call("generate", messages, timeout=timeout, **kw)

    def stream(self, messages: Messages, *, timeout: float | None = None, **kw) -> Iterator[Chunk]:
        call = self.stub.GenerateStream(build_request(pb.GenerateStreamRequest, messages, **kw),
                                        timeout=self._t(timeout), metadata=self.metadata)
        try:
            for m in call:
                yield types.chunk(m)
        except grpc.RpcError as e:
            raise self._error(e) from None
        finally:
            call.cancel()  # a consumer that stops early aborts the request in the backend

    def classify(self, text: str, *, timeout: float | None = None) -> Classification:
        return self._call("classify", text, timeout=timeout)

    def feedback(self, request_id: str, rating: int, *, correction: str = "", comment: str = "",
                 timeout: float | None = None) -> pb.SubmitFeedbackResponse:
        return self._call("feedback", request_id, rating, correction=correction, comment=comment, timeout=timeout)

    # admin (token with the `admin` scope)
    def list_adapters(self, *, timeout: float | None = None) -> Adapters:
        return self._call("list_adapters", timeout=timeout)

    def load_adapter(self, name: str, path: str, *, timeout: float | None = None) -> AdapterInfo:
        return self._call("load_adapter", name, path, timeout=timeout)

    def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        return self._call("unload_adapter", name, timeout=timeout)

    def deploy(self, task: str, version: str | int | None = None, *, timeout: float | None = 600.0) -> DeployResult:
        return self._call("deploy", task, version, timeout=timeout)

    def rollback(self, task: str, *, timeout: float | None = 600.0) -> DeployResult:
        return self._call("rollback", task, timeout=timeout)

    def retire(self, task: str, *, timeout: float | None = 600.0) -> DeployResult:
        return self._call("retire", task, timeout=timeout)

    def reload_classifier(self, path: str | None = None, *, timeout: float | None = 600.0) -> ClassifierInfo:
        return self._call("reload_classifier", path, timeout=timeout)


class AsyncClient(_Base):
    """asyncio client (grpc.aio), the same methods as `Client`, awaited."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, timeout: float | None = 120.0,
                 retry: RetryPolicy | None = None, channel: grpc.aio.Channel | None = None, tls: bool = False,
                 root_certificates: bytes | str | None = None, client_cert: bytes | str | None = None,
                 client_key: bytes | str | None = None, server_name: str | None = None):
        self._setup(channel or _channel(True, target, retry, tls, root_certificates, client_cert, client_key,
                                        server_name), token, timeout)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, name: str, *args, timeout: float | None = None, **kw):
        fn, request, shape = self._rpc(name, *args, **kw)
        try:
            return shape(await fn(request, timeout=self._t(timeout), metadata=self.metadata))
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None

    async def generate(self, messages: Messages, *, timeout: float | None = None, **kw) -> Result:
        return await self._call("generate", messages, timeout=timeout, **kw)

    async def stream(self, messages: Messages, *, timeout: float | None = None, **kw) -> AsyncIterator[Chunk]:
        call = self.stub.GenerateStream(build_request(pb.GenerateStreamRequest, messages, **kw),
                                        timeout=self._t(timeout), metadata=self.metadata)
        try:
            async for m in call:
                yield types.chunk(m)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        finally:
            call.cancel()

    async def classify(self, text: str, *, timeout: float | None = None) -> Classification:
        return await self._call("classify", text, timeout=timeout)

    async def feedback(self, request_id: str, rating: int, *, correction: str = "", comment: str = "",
                       timeout: float | None = None) -> pb.SubmitFeedbackResponse:
        return await self._call("feedback", request_id, rating, correction=correction, comment=comment,
                                timeout=timeout)

    async def list_adapters(self, *, timeout: float | None = None) -> Adapters:
        return await self._call("list_adapters", timeout=timeout)

    async def load_adapter(self, name: str, path: str, *, timeout: float | None = None) -> AdapterInfo:
        return await self._call("load_adapter", name, path, timeout=timeout)

    async def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        return await self._call("unload_adapter", name, timeout=timeout)

    async def deploy(self, task: str, version: str | int | None = None, *,
                     timeout: float | None = 600.0) -> DeployResult:
        return await self._call("deploy", task, version, timeout=timeout)

    async def rollback(self, task: str, *, timeout: float | None = 600.0) -> DeployResult:
        return await self._call("rollback", task, timeout=timeout)

    async def retire(self, task: str, *, timeout: float | None = 600.0) -> DeployResult:
        return await self._call("retire", task, timeout=timeout)

    async def reload_classifier(self, path: str | None = None, *, timeout: float | None = 600.0) -> ClassifierInfo:
        return await self._call("reload_classifier", path, timeout=timeout)
