"""The request pipeline shared by Generate, GenerateStream (and any other front door):
validate -> route -> stream from the backend -> durable log record -> one typed result.

`Pipeline.run` yields `Started` once, then `Chunk`s, then one `Finished` that carries usage and timings
computed here, once; the servicers only shape these into their messages. Errors propagate as exceptions
(`core.errors.RouterError` for expected ones) after the pipeline has recorded them: every request that got
this far leaves exactly one log record, whatever its outcome.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from convlog.schema import LogRecord
from core.errors import DeadlineExceeded, ResourceExhausted, RouterError, Unavailable
from router.backend import now_ms
from router.classify import TaskClassifier
from router.config import GatewayConfig
from router.grpc_errors import REQUEST_ID
from router.health import Health
from router.metrics import NO_METRICS
from router.replicas import ReplicaSet
from router.request_checks import check_request
from router.routing import Decision, RoutingTable, decide, explicit_adapter, split_point

log = logging.getLogger("router.gateway")


def new_request_id() -> str:
    return uuid.uuid4().hex


def last_user_text(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m["role"] == "user" and m["content"].strip():
            return m["content"]
    return ""


@dataclass
class Started:
    request_id: str
    decision: Decision


@dataclass
class Chunk:
    delta: str
    reasoning_delta: str


@dataclass
class Timings:
    classify_ms: float = 0.0
    ttft_ms: float = 0.0
    backend_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class Finished:
    request_id: str
    decision: Decision
    text: str
    reasoning_text: str
    finish_reason: str  # stop | length | ...
    prompt_tokens: int
    completion_tokens: int
    timings: Timings


Event = Started | Chunk | Finished


class LogSink:
    """Writes log records; a failure is counted and loud, never the client's problem."""

    def __init__(self, writer=None, metrics=NO_METRICS):
        self.writer = writer
        self.metrics = metrics
        self.failures = 0
        self._bg: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    @property
    def healthy(self) -> bool:
        return self.writer is None or (bool(getattr(self.writer, "healthy", True)) and self.failures == 0)

    @property
    def last_error(self) -> str:
        return getattr(self.writer, "last_error", "")

    async def write(self, rec: LogRecord) -> None:
        if self.writer is None:
            return
        t0 = time.perf_counter()
        try:
            await self.writer.write(rec)
        except Exception as exc:  # noqa: BLE001 - the client still gets its answer; health and the log say it
            self.failures += 1
            self.metrics.log_write(time.perf_counter() - t0, False)
            log.error("log write failed for request %s: %s", rec.request_id, exc)
        else:
            self.metrics.log_write(time.perf_counter() - t0, True)

    def write_later(self, rec: LogRecord) -> None:
        """For a request whose RPC is already over: written in the background, flushed by `close()`."""
        t = asyncio.get_running_loop().create_task(self.write(rec))
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def close(self) -> None:
        if self._bg:
            await asyncio.gather(*list(self._bg), return_exceptions=True)
        if self.writer is not None:
            try:
                await self.writer.close()
            except Exception as exc:  # noqa: BLE001 - shutting down: report, do not raise
                log.error("closing the log writer failed: %s", exc)


class Pipeline:
    def __init__(self, cfg: GatewayConfig, backend: ReplicaSet, table: RoutingTable, classifier: TaskClassifier,
                 logs: LogSink, health: Health, *, served_model: str, metrics=NO_METRICS):
        self.cfg = cfg
        self.backend = backend
        self.table = table
        self.classifier = classifier
        self.logs = logs
        self.health = health
        self.served_model = served_model
        self.metrics = metrics
        self.load_pinned = None  # async (name) -> None: the deployer's on-demand load of a pinned registry version
        self.in_flight = 0

    async def route(self, req, messages: list[dict]) -> tuple[Decision, float]:
        """(decision, classify_ms): an explicit adapter, a task override, or the classifier's call."""
        if req.adapter:
            if req.adapter not in self.table.loaded and "@" in req.adapter and self.load_pinned is not None:
                await self.load_pinned(req.adapter)  # a registered version, loaded on demand
            return explicit_adapter(self.table, req.adapter), 0.0
        known = self.classifier.tasks
        point = split_point(messages, req.client_id) if self.table.canaries else None
        if req.task:
            return decide(self.table, task_override=req.task, known_tasks=known, point=point), 0.0
        if not self.classifier.enabled:
            return decide(self.table, task_override="", known_tasks=None), 0.0
        t0 = now_ms()
        pred = await self.classifier.predict(last_user_text(messages))
        d = decide(self.table, task_override="", known_tasks=known, prediction=pred,
                   threshold=self.classifier.threshold(), point=point)
        return d, now_ms() - t0

    def _record(self, api: str, rec: LogRecord, code: str, total_ms: float) -> None:
        self.metrics.request_finished(
            api, task=rec.task, adapter=rec.adapter, reason=rec.route_reason, status=code,
            classify_s=rec.classify_ms / 1000, ttft_s=rec.ttft_ms / 1000, total_s=total_ms / 1000,
            prompt_tokens=rec.prompt_tokens, completion_tokens=rec.completion_tokens)

    async def run(self, req, *, stream: bool, time_remaining: float | None, request_id: str = "",
                  api: str = "grpc") -> AsyncIterator[Event]:
        """One request end to end. `time_remaining`: the caller's deadline in seconds (None: none); `api`: the front
        door (grpc | http), a metrics label."""
        t0 = now_ms()
        rid = request_id or new_request_id()
        REQUEST_ID.set(rid)
        rec = LogRecord(request_id=rid, created_at=time.time(), messages=[], client_id=req.client_id,
                        model=self.served_model, stream=stream)
        text: list[str] = []
        reasoning: list[str] = []
        acquired = ""
        status, error, code = "ok", "", "OK"
        self.in_flight += 1
        self.metrics.request_started(api)
        try:
            if self.health.draining:
                raise Unavailable("the gateway is shutting down: retry on another replica")
            limit = self.cfg.limits.max_concurrent_streams
            if self.in_flight > limit:
                raise ResourceExhausted(f"more than {limit} requests in flight: retry with backoff")
            checked = check_request(req, default_max_tokens=self.cfg.default_max_tokens,
                                    max_model_len=self.cfg.backend.max_model_len,
                                    limits=self.cfg.limits)
            rec.messages, rec.sampling = checked.messages, checked.sampling
            decision, rec.classify_ms = await self.route(req, checked.messages)
            rec.task, rec.confidence, rec.route_reason = decision.task, decision.confidence, decision.reason_name
            if decision.adapter:
                a = self.table.loaded.get(decision.adapter)
                rec.adapter = decision.adapter
                rec.adapter_task, rec.adapter_version = (a.task, a.version) if a else ("", "")
                self.table.acquire(decision.adapter)
                acquired = decision.adapter
            if not self.backend.serving():
                raise self.backend.unavailable()
            yield Started(rid, decision)
            payload = {"model": decision.adapter or self.served_model, "messages": checked.messages, **checked.sampling}
            if checked.reasoning_effort:
                payload["reasoning_effort"] = checked.reasoning_effort
            b0 = now_ms()
            async for ev in self.backend.chat_stream(payload, timeout_s=time_remaining, adapter=decision.adapter):
                if ev.final:
                    rec.finish_reason = ev.finish_reason
                    rec.prompt_tokens, rec.completion_tokens = ev.prompt_tokens, ev.completion_tokens
                    rec.backend_ms = now_ms() - b0
                    rec.total_ms = now_ms() - t0
                    rec.response_text, rec.reasoning_text = "".join(text), "".join(reasoning)
                    await self.logs.write(rec)  # durable before the final message is sent
                    self._record(api, rec, code, rec.total_ms)  # counted before the client can see the answer
                    try:
                        yield Finished(rid, decision, rec.response_text, rec.reasoning_text, ev.finish_reason,
                                       ev.prompt_tokens, ev.completion_tokens,
                                       Timings(rec.classify_ms, rec.ttft_ms, rec.backend_ms, rec.total_ms))
                    except GeneratorExit:
                        pass  # answered and logged: a consumer that closes us now cancels nothing
                    return
                if not rec.ttft_ms:
                    rec.ttft_ms = now_ms() - t0
                text.append(ev.delta)
                reasoning.append(ev.reasoning_delta)
                yield Chunk(ev.delta, ev.reasoning_delta)
            raise Unavailable("the vLLM backend ended the stream without a final message: retry the request")
        except DeadlineExceeded as exc:
            # the backend's own timer (deadline + 1 s) fired before gRPC cancelled the handler, which happens on a
            # loaded machine: the same event as a cancelled deadline, so it is logged the same way
            status, error, code = "cancelled", f"{exc.code.name}: {exc}", exc.code.name
            raise
        except RouterError as exc:
            status, error, code = "error", f"{exc.code.name}: {exc}", exc.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status, error, code = "cancelled", "client cancelled or deadline exceeded", "CANCELLED"
            raise
        except Exception as exc:  # a bug: grpc_errors logs it with the request id and answers INTERNAL
            status, error, code = "error", f"INTERNAL: {type(exc).__name__}: {exc}", "INTERNAL"
            raise
        finally:
            self.in_flight -= 1
            if code != "OK":
                self._record(api, rec, code, now_ms() - t0)
            if acquired:
                self.table.release(acquired)
            if status != "ok":
                rec.status, rec.error = status, error
                rec.finish_reason = "cancelled" if status == "cancelled" else "error"
                rec.response_text = "".join(text)
                rec.total_ms = now_ms() - t0
                self.logs.write_later(rec)  # the RPC is already over
