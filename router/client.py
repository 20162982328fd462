"""Python SDK for specialist-router: sync (`Client`) and asyncio (`AsyncClient`).

    from router.client import Client
    with Client("127.0.0.1:50051") as c:
        r = c.generate([{"role": "user", "content": "Write a haiku about SQL"}], max_tokens=64)
        print(r.text, r.adapter, r.route.task)
        for chunk in c.stream("Explain LoRA in one line"):
            print(chunk.delta, end="")

Deadlines: `timeout=` seconds per call (DEADLINE_EXCEEDED when passed; the request is aborted in the
backend). Retries: only UNAVAILABLE, with exponential backoff and jitter, and for streams only before the
first chunk arrived (never a duplicated partial answer). Errors raise `RouterError` with the gRPC code and
the server's message. Auth: `token=` (or env SPECIALIST_ROUTER_TOKEN) sent as `authorization: Bearer`.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Sequence

import grpc

from router.v1 import router_pb2 as pb
from router.v1 import router_pb2_grpc as pbg

Messages = str | Sequence[dict]
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_CANCELLED: "cancelled",
           pb.FINISH_REASON_ERROR: "error", pb.FINISH_REASON_UNSPECIFIED: ""}
_EFFORT = {None: 0, "": 0, "low": 1, "medium": 2, "high": 3}


class RouterError(Exception):
    """A gRPC error from the gateway: `.code` (grpc.StatusCode) and `.message` (what to fix)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Route:
    task: str
    confidence: float
    reason: str  # specialist | low_confidence | general_task | no_adapter | adapter_override | task_override | classifier_disabled

    @classmethod
    def of(cls, r: pb.Route) -> "Route":
        return cls(r.task, r.confidence, pb.RouteReason.Name(r.reason).removeprefix("ROUTE_REASON_").lower())


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Timings:
    classify_ms: float
    ttft_ms: float
    total_ms: float
    backend_ms: float


@dataclass(frozen=True)
class Result:
    request_id: str
    text: str
    reasoning_text: str
    adapter: str  # "" = base model
    finish_reason: str
    usage: Usage
    timings: Timings
    route: Route
    model: str


@dataclass(frozen=True)
class Chunk:
    request_id: str
    delta: str
    reasoning_delta: str = ""
    finished: bool = False
    adapter: str = ""
    route: Route | None = None
    finish_reason: str = ""
    usage: Usage | None = None
    timings: Timings | None = None


@dataclass(frozen=True)
class Classification:
    task: str
    confidence: float
    reason: str
    adapter: str
    threshold: float
    scores: dict = field(default_factory=dict)


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


def _result(r: pb.GenerateResponse) -> Result:
    return Result(r.request_id, r.text, r.reasoning_text, r.adapter, _FINISH.get(r.finish_reason, ""),
                  Usage(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens),
                  Timings(r.timings.classify_ms, r.timings.ttft_ms, r.timings.total_ms, r.timings.backend_ms),
                  Route.of(r.route), r.model)


def _chunk(m: pb.GenerateStreamResponse) -> Chunk:
    return Chunk(m.request_id, m.delta, m.reasoning_delta, m.finished, m.adapter,
                 Route.of(m.route) if m.HasField("route") else None, _FINISH.get(m.finish_reason, ""),
                 Usage(m.usage.prompt_tokens, m.usage.completion_tokens, m.usage.total_tokens) if m.finished else None,
                 Timings(m.timings.classify_ms, m.timings.ttft_ms, m.timings.total_ms, m.timings.backend_ms)
                 if m.finished else None)


def _classification(r: pb.ClassifyResponse) -> Classification:
    route = Route.of(r.route)
    return Classification(route.task, route.confidence, route.reason, r.adapter, r.threshold,
                          {s.task: s.probability for s in r.scores})


@dataclass
class RetryPolicy:
    """Retries on UNAVAILABLE only: attempts in all, backoff base/max seconds, full jitter."""

    attempts: int = 4
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * (2 ** attempt)))


def _metadata(token: str | None) -> tuple:
    tok = token if token is not None else os.environ.get("SPECIALIST_ROUTER_TOKEN", "")
    return (("authorization", f"Bearer {tok}"),) if tok else ()


_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.enable_retries", 0)]


class Client:
    """Blocking client. Thread-safe; reuse one per process."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, timeout: float | None = 120.0,
                 retry: RetryPolicy | None = None, channel: grpc.Channel | None = None):
        self.channel = channel or grpc.insecure_channel(target, options=_OPTIONS)
        self.stub = pbg.RouterServiceStub(self.channel)
        self.admin = pbg.AdminServiceStub(self.channel)
        self.metadata = _metadata(token)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, fn, request, timeout):
        t = self.timeout if timeout is None else timeout
        deadline = None if t is None else time.monotonic() + t
        for attempt in range(self.retry.attempts):
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                return fn(request, timeout=left, metadata=self.metadata)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retry.attempts - 1:
                    raise RouterError(e.code(), e.details() or "") from None
                d = self.retry.delay(attempt)
                if deadline is not None and time.monotonic() + d >= deadline:
                    raise RouterError(e.code(), e.details() or "") from None
                time.sleep(d)

    def generate(self, messages: Messages, *, timeout: float | None = None, **kw) -> Result:
        return _result(self._call(self.stub.Generate, build_request(pb.GenerateRequest, messages, **kw), timeout))

    def stream(self, messages: Messages, *, timeout: float | None = None, **kw) -> Iterator[Chunk]:
        req = build_request(pb.GenerateStreamRequest, messages, **kw)
        t = self.timeout if timeout is None else timeout
        deadline = None if t is None else time.monotonic() + t
        for attempt in range(self.retry.attempts):
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            call = self.stub.GenerateStream(req, timeout=left, metadata=self.metadata)
            got_any = False
            try:
                for m in call:
                    got_any = True
                    yield _chunk(m)
                return
            except grpc.RpcError as e:
                if got_any or e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retry.attempts - 1:
                    raise RouterError(e.code(), e.details() or "") from None
                time.sleep(self.retry.delay(attempt))
            finally:
                call.cancel()  # a consumer that stops early aborts the request in the backend

    def classify(self, text: str, *, timeout: float | None = None) -> Classification:
        return _classification(self._call(self.stub.Classify, pb.ClassifyRequest(text=text), timeout))

    def feedback(self, request_id: str, rating: int, *, correction: str = "", comment: str = "",
                 timeout: float | None = None) -> pb.SubmitFeedbackResponse:
        return self._call(self.stub.SubmitFeedback, pb.SubmitFeedbackRequest(
            request_id=request_id, rating=rating, correction=correction, comment=comment), timeout)


class AsyncClient:
    """asyncio client (grpc.aio)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, timeout: float | None = 120.0,
                 retry: RetryPolicy | None = None):
        self.channel = grpc.aio.insecure_channel(target, options=_OPTIONS)
        self.stub = pbg.RouterServiceStub(self.channel)
        self.admin = pbg.AdminServiceStub(self.channel)
        self.metadata = _metadata(token)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, fn, request, timeout):
        t = self.timeout if timeout is None else timeout
        deadline = None if t is None else time.monotonic() + t
        for attempt in range(self.retry.attempts):
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                return await fn(request, timeout=left, metadata=self.metadata)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retry.attempts - 1:
                    raise RouterError(e.code(), e.details() or "") from None
                d = self.retry.delay(attempt)
                if deadline is not None and time.monotonic() + d >= deadline:
                    raise RouterError(e.code(), e.details() or "") from None
                await asyncio.sleep(d)

    async def generate(self, messages: Messages, *, timeout: float | None = None, **kw) -> Result:
        return _result(await self._call(self.stub.Generate, build_request(pb.GenerateRequest, messages, **kw), timeout))

    async def stream(self, messages: Messages, *, timeout: float | None = None, **kw) -> AsyncIterator[Chunk]:
        req = build_request(pb.GenerateStreamRequest, messages, **kw)
        t = self.timeout if timeout is None else timeout
        deadline = None if t is None else time.monotonic() + t
        for attempt in range(self.retry.attempts):
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            call = self.stub.GenerateStream(req, timeout=left, metadata=self.metadata)
            got_any = False
            try:
                async for m in call:
                    got_any = True
                    yield _chunk(m)
                return
            except grpc.aio.AioRpcError as e:
                if got_any or e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retry.attempts - 1:
                    raise RouterError(e.code(), e.details() or "") from None
                await asyncio.sleep(self.retry.delay(attempt))
            finally:
                call.cancel()

    async def classify(self, text: str, *, timeout: float | None = None) -> Classification:
        return _classification(await self._call(self.stub.Classify, pb.ClassifyRequest(text=text), timeout))

    async def feedback(self, request_id: str, rating: int, *, correction: str = "", comment: str = "",
                       timeout: float | None = None) -> pb.SubmitFeedbackResponse:
        return await self._call(self.stub.SubmitFeedback, pb.SubmitFeedbackRequest(
            request_id=request_id, rating=rating, correction=correction, comment=comment), timeout)
