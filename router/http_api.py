"""The HTTP door: OpenAI-compatible API, Prometheus `/metrics` and `/health`, in the gateway's own event loop.

FastAPI on uvicorn (the ecosystem's usual pair; vLLM's own server uses them), started as a task of the gateway's
asyncio loop beside grpc.aio, so both doors share one pipeline, one routing table, one log writer and one set of
tokens. Handlers take the raw request and parse JSON themselves: OpenAI's body is validated by
`openai_compat.generate_request` into the same `router.v1` request gRPC receives, so every rule, limit and error
message is the gRPC one.

Routes:
- `POST /v1/chat/completions` (scope `generate`): streaming (SSE) and not; `model` picks the route.
- `GET /v1/models` (scope `generate`): auto, base, the tasks and the loaded specialists.
- `POST /v1/feedback` (scope `generate`): `{"request_id", "rating" 1..5, "correction", "comment"}`.
- `GET /metrics`, `GET /health`: open, like gRPC health (no prompt data in either).

Errors are OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`) with the HTTP status that
matches the gRPC status (`HTTP_STATUS`). A client that disconnects cancels its request, which aborts it in vLLM.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import FailedPrecondition, InvalidArgument, RouterError
from router import openai_compat as oa
from router.auth import Authenticator
from router.grpc_errors import REQUEST_ID
from router.metrics import CONTENT_TYPE
from router.pipeline import Chunk, Finished, Pipeline, Started, new_request_id
from router.service import submit_feedback
from router.v1 import router_pb2 as pb

log = logging.getLogger("router.http")

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499,
}
_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable", 504: "timeout"}


def error_body(status: int, message: str, code: str) -> dict:
    return {"error": {"message": message, "type": _TYPE.get(status, "server_error"), "param": None, "code": code}}


def error_response(exc: BaseException, headers: dict | None = None) -> JSONResponse:
    if isinstance(exc, RouterError):
        status = HTTP_STATUS.get(exc.code, 400)
        code = "model_not_found" if "GET /v1/models" in str(exc) else exc.code.name.lower()
        return JSONResponse(error_body(status, str(exc), code), status_code=status, headers=headers)
    rid = REQUEST_ID.get()
    log.error("HTTP request %s failed", rid or "(no id)", exc_info=exc)
    where = f" (request id {rid})" if rid else ""
    return JSONResponse(error_body(500, f"internal error in the gateway{where}; see the gateway log", "internal"),
                        status_code=500, headers=headers)


class HttpApi:
    """The FastAPI app over one gateway's parts."""

    def __init__(self, pipeline: Pipeline, *, writer, auth: Authenticator | None, metrics, health,
                 max_body_bytes: int):
        self.pipeline = pipeline
        self.writer = writer
        self.auth = auth
        self.metrics = metrics
        self.health = health
        self.max_body_bytes = max_body_bytes
        self.app = self._build()

    # ------------------------------------------------------------------------------------ helpers
    def _authorize(self, request: Request, what: str) -> None:
        if self.auth is not None:
            self.auth.check(request.headers.get("authorization", ""), "generate", what)

    async def _json(self, request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            raise _TooLarge(int(size), self.max_body_bytes)
        chunks, n = [], 0
        async for part in request.stream():
            n += len(part)
            if n > self.max_body_bytes:
                raise _TooLarge(n, self.max_body_bytes)
            chunks.append(part)
        try:
            body = json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"the request body is not valid JSON ({exc}): send a JSON object") from None
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        return body

    def _route_names(self) -> dict:
        t = self.pipeline.table
        return dict(served_model=self.pipeline.served_model, loaded=t.loaded, routes=t.routes,
                    tasks=list(self.pipeline.classifier.tasks or []))

    # ---------------------------------------------------------------------------------- endpoints
    async def chat_completions(self, request: Request) -> Response:
        rid = new_request_id()
        REQUEST_ID.set(rid)
        try:
            self._authorize(request, "POST /v1/chat/completions")
            body = await self._json(request)
            adapter, task = oa.resolve_model(body.get("model"), **self._route_names())
            req = oa.generate_request(body, adapter=adapter, task=task)
            stream = body.get("stream") is True
            so = body.get("stream_options")
            include_usage = stream and isinstance(so, dict) and so.get("include_usage") is True
        except _TooLarge as exc:
            return JSONResponse(error_body(413, str(exc), "request_too_large"), status_code=413,
                                headers={"x-request-id": rid})
        except Exception as exc:  # noqa: BLE001 - mapped in one place
            return error_response(exc, {"x-request-id": rid})
        if stream:
            return await self._stream(request, req, rid, include_usage)
        return await self._unary(request, req, rid)

    async def _unary(self, request: Request, req, rid: str) -> Response:
        async def consume() -> Finished:
            async for ev in self.pipeline.run(req, stream=False, time_remaining=None, request_id=rid, api="http"):
                if isinstance(ev, Finished):
                    return ev
            raise AssertionError("the pipeline ends with Finished or raises")

        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():  # the client went away (or we are cancelled): abort the request in vLLM
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
            gone.cancel()
        if work.cancelled():
            return Response(status_code=499)
        exc = work.exception()
        if exc is not None:
            return error_response(exc, {"x-request-id": rid})
        f = work.result()
        model = f.decision.adapter or self.pipeline.served_model
        return JSONResponse(oa.completion(f, model, int(time.time())), headers=oa.route_headers(rid, f.decision))

    async def _stream(self, request: Request, req, rid: str, include_usage: bool) -> Response:
        events = self.pipeline.run(req, stream=True, time_remaining=None, request_id=rid, api="http")
        try:
            started = await events.__anext__()  # routing done: its headers go out before the first byte
        except Exception as exc:  # noqa: BLE001
            await events.aclose()
            return error_response(exc, {"x-request-id": rid})
        assert isinstance(started, Started)
        d = started.decision
        sse = oa.ChunkWriter(rid, d.adapter or self.pipeline.served_model, include_usage)

        async def body():
            try:
                yield sse.first(d)
                async for ev in events:
                    if isinstance(ev, Chunk):
                        yield sse.delta(ev.delta, ev.reasoning_delta)
                    elif isinstance(ev, Finished):
                        yield sse.last(ev)
            except RouterError as exc:  # after the first byte: the error goes in the stream, as OpenAI does
                status = HTTP_STATUS.get(exc.code, 500)
                yield sse.error(error_body(status, str(exc), exc.code.name.lower()))
            except Exception as exc:  # noqa: BLE001 - a bug: logged with the id, the client gets the id
                log.error("HTTP stream %s failed", rid, exc_info=exc)
                yield sse.error(error_body(500, f"internal error in the gateway (request id {rid}); see the "
                                                "gateway log", "internal"))
            finally:
                await events.aclose()

        headers = {**oa.route_headers(rid, d), "cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request, "GET /v1/models")
        except RouterError as exc:
            return error_response(exc)
        return JSONResponse(oa.models_list(**self._route_names()))

    async def feedback(self, request: Request) -> Response:
        try:
            self._authorize(request, "POST /v1/feedback")
            body = await self._json(request)
            rating = body.get("rating")
            if not isinstance(rating, int) or isinstance(rating, bool):
                raise InvalidArgument("rating must be an integer from 1 (bad) to 5 (excellent)")
            fields = {}
            for key in ("request_id", "correction", "comment"):
                v = body.get(key) or ""
                if not isinstance(v, str):
                    raise InvalidArgument(f"{key} must be a string")
                fields[key] = v
            fields["request_id"] = fields["request_id"].removeprefix("chatcmpl-")
            if not -(2**31) <= rating < 2**31:
                raise InvalidArgument(f"rating is {rating}: use 1 (bad) to 5 (excellent)")
            fb, created = await submit_feedback(self.pipeline, self.writer, pb.SubmitFeedbackRequest(
                rating=rating, **fields))
        except _TooLarge as exc:
            return JSONResponse(error_body(413, str(exc), "request_too_large"), status_code=413)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)
        return JSONResponse({"feedback_id": fb.feedback_id, "created": created})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    async def health_endpoint(self, request: Request) -> Response:
        ok = self.health.backend_up and not self.health.draining
        return JSONResponse({"status": "serving" if ok else "not_serving", "backend_up": self.health.backend_up,
                             "draining": self.health.draining}, status_code=200 if ok else 503)

    def _build(self) -> FastAPI:
        app = FastAPI(title="specialist-router", docs_url=None, redoc_url=None, openapi_url=None)
        # plain Starlette routes: the handlers take the raw request, so FastAPI's per-request dependency and
        # validation machinery would only add latency (measured in docs/benchmarks.md, section 8)
        app.add_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_route("/v1/models", self.models, methods=["GET"])
        app.add_route("/v1/feedback", self.feedback, methods=["POST"])
        app.add_route("/health", self.health_endpoint, methods=["GET"])
        if self.metrics.enabled:
            app.add_route("/metrics", self.metrics_endpoint, methods=["GET"])

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request, exc):  # unknown path, wrong method: OpenAI's error shape too
            return JSONResponse(error_body(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                           str(exc.status_code)), status_code=exc.status_code)
        return app


class _TooLarge(Exception):
    def __init__(self, n: int, limit: int):
        super().__init__(f"the request body has {n} bytes, above the limit of {limit}: shorten the messages (or raise "
                         "limits.max_request_chars)")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (after the body was read, receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Uvicorn(uvicorn.Server):
    """uvicorn inside the gateway's loop: the gateway owns the process's signals, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        return None


class HttpServer:
    """uvicorn serving `app` on a socket bound here (so port 0 reports the real port before any request)."""

    def __init__(self, app, host: str, port: int, *, tls=None, grace_s: float = 10.0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise FailedPrecondition(f"cannot listen for HTTP on {host}:{port} ({exc.strerror}): pick another port "
                                     "with --http-port, or turn HTTP off with --no-http") from None
        self.sock.setblocking(False)
        self.host, self.port = host, self.sock.getsockname()[1]
        kw = {}
        if tls is not None and tls.enabled:
            kw = dict(ssl_certfile=tls.cert_file, ssl_keyfile=tls.key_file)
            if tls.client_ca_file:
                kw.update(ssl_ca_certs=tls.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, loop="none",
                                timeout_graceful_shutdown=grace_s, timeout_keep_alive=30, **kw)
        self.server = _Uvicorn(config)
        self.task: asyncio.Task | None = None
        self.scheme = "https" if kw else "http"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="http-server")
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped during startup")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(BaseException):
            await self.task
        self.sock.close()
