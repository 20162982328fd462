"""The gateway process: grpc.aio server for RouterService and AdminService over a vLLM backend.

Request path (Generate and GenerateStream share it): validate -> route (explicit adapter, task override,
or the classifier off the event loop) -> stream from vLLM (deadline passed down; cancel closes the HTTP
stream, which aborts the request inside vLLM) -> durable log record -> final message. Errors become gRPC
statuses with a message that says what to fix; an unexpected error is logged with the request id and
returned as INTERNAL without a trace.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router.auth import AuthInterceptor, load_tokens
from router.backend import StreamEvent, VLLMBackend, now_ms
from router.config import GatewayConfig
from router.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable, UserError
from router.routing import Decision, LoadedAdapter, RoutingTable, decide, explicit_adapter
from router.v1 import router_pb2 as pb
from router.v1 import router_pb2_grpc as pbg
from router.validation import check_request

log = logging.getLogger("router.gateway")

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_CANCELLED,
          "cancelled": pb.FINISH_REASON_CANCELLED, "error": pb.FINISH_REASON_ERROR}
ADAPTER_NAME = __import__("re").compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
# health service name that reports the conversation log: NOT_SERVING while writes fail (the gateway keeps serving)
LOG_HEALTH_SERVICE = "router.v1.ConversationLog"
SERVICES = ("router.v1.RouterService", "router.v1.AdminService")


def _torch_threads(n: int) -> None:
    """Classify-pool thread initializer: torch's intra-op thread count (classifier.threads; 0 keeps the default).
    Set in each worker, because OpenMP keeps the setting per calling thread."""
    if n:
        import torch

        torch.set_num_threads(n)


def last_user_text(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m["role"] == "user" and m["content"].strip():
            return m["content"]
    return ""


class Gateway:
    """Owns the backend, the routing table, the classifier, the log writer and the deployer."""

    def __init__(self, cfg: GatewayConfig, backend: VLLMBackend, *, served_model: str, model_dir: str | None,
                 managed=None, classifier=None, log_writer=None):
        self.cfg = cfg
        self.backend = backend
        self.served_model = served_model
        self.model_dir = model_dir
        self.managed = managed
        self.classifier = classifier
        self.log_writer = log_writer
        self.table = RoutingTable(cfg.task_adapters)
        self.health = health.aio.HealthServicer()
        self.deployer = None  # router.deploy.Deployer, set by build()
        self.draining = False
        self.backend_up = False
        self.in_flight = 0
        self.log_failures = 0
        self._bg: set[asyncio.Task] = set()
        self._cls_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="classify", initializer=_torch_threads, initargs=(cfg.classifier.threads,))
        self._lora_lock = asyncio.Lock()

    # --------------------------------------------------------------------------- health
    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving and not self.draining else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def monitor_backend(self, interval_s: float = 1.0) -> None:
        logs_ok = True
        while True:
            m = self.managed
            # a managed backend counts as up only once it runs again *with its adapters reloaded*
            up = await self.backend.health() and not (m is not None and (m.restarting or not m.alive()))
            if up != self.backend_up:
                log.info("backend %s is %s", self.backend.url, "up" if up else "DOWN")
            self.backend_up = up
            await self.set_serving(up)
            if self.log_writer is not None:
                ok = bool(getattr(self.log_writer, "healthy", True)) and self.log_failures == 0
                if ok != logs_ok:
                    if not ok:
                        log.error("CONVERSATION LOG IS FAILING (%d failed writes, last error: %s); requests are still "
                                  "served but are not being logged", self.log_failures,
                                  getattr(self.log_writer, "last_error", ""))
                    logs_ok = ok
                await self.health.set(LOG_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING if ok
                                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            await asyncio.sleep(interval_s)

    def spawn(self, coro) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)
        return t

    # -------------------------------------------------------------------------- adapters
    async def load_adapter(self, name: str, path: str, *, task: str = "", version: str = "") -> LoadedAdapter:
        async with self._lora_lock:
            if name in self.table.loaded:
                return self.table.loaded[name]
            if not Path(path).is_dir():
                raise InvalidArgument(f"adapter path {path} is not a folder on the gateway host: pass a PEFT folder")
            try:
                await self.backend.load_lora(name, str(Path(path).resolve()))
            except FailedPrecondition as exc:
                # another gateway replica sharing this backend loaded the same versioned name: same adapter
                if "already" not in str(exc):
                    raise
            a = LoadedAdapter(name=name, path=str(Path(path).resolve()), task=task, version=version)
            self.table.loaded = {**self.table.loaded, name: a}
            return a

    async def unload_adapter(self, name: str) -> None:
        async with self._lora_lock:
            if name not in self.table.loaded:
                raise_not_loaded(name, self.table)
            if name in self.table.routes.values():
                tasks = [t for t, a in self.table.routes.items() if a == name]
                raise FailedPrecondition(f"adapter {name!r} is routed for task(s) {tasks}: retire or redeploy first")
            await self.backend.unload_lora(name)
            loaded = dict(self.table.loaded)
            loaded.pop(name, None)
            self.table.loaded = loaded

    async def reload_adapters_into_backend(self) -> None:
        """After a managed vLLM restart: every adapter the gateway had loaded is loaded again."""
        for a in list(self.table.loaded.values()):
            try:
                await self.backend.load_lora(a.name, a.path)
            except UserError as exc:
                log.error("could not reload adapter %s after backend restart: %s", a.name, exc)
        log.info("re-loaded %d adapter(s) into the restarted backend", len(self.table.loaded))

    # -------------------------------------------------------------------------- routing
    async def classify(self, text: str):
        clf = self.classifier
        if clf is None:
            return None
        loop = asyncio.get_running_loop()
        preds = await loop.run_in_executor(self._cls_pool, clf.predict_detailed, [text])
        return preds[0]

    def threshold(self) -> float:
        if self.classifier is None:
            return 0.0
        t = self.cfg.classifier.threshold
        return t if t >= 0 else float(self.classifier.threshold)

    async def route(self, req, messages: list[dict]) -> tuple[Decision, float]:
        t0 = now_ms()
        if req.adapter:
            return explicit_adapter(self.table, req.adapter), 0.0
        known = list(self.classifier.tasks) if self.classifier is not None else None
        if req.task:
            return decide(self.table, task_override=req.task, known_tasks=known), 0.0
        pred = await self.classify(last_user_text(messages)) if self.classifier is not None else None
        d = decide(self.table, task_override="", known_tasks=known, prediction=pred, threshold=self.threshold())
        return d, (now_ms() - t0) if pred is not None else 0.0

    # ------------------------------------------------------------------------ generation
    async def run(self, req, context, *, stream: bool) -> AsyncIterator[tuple[str, object]]:
        """Yields ("start", Decision) once, then ("event", StreamEvent)...; the caller shapes the messages."""
        from router.logs.schema import LogRecord

        t0 = now_ms()
        rid = uuid.uuid4().hex
        rec = LogRecord(request_id=rid, created_at=time.time(), messages=[], client_id=req.client_id,
                        model=self.served_model, stream=stream)
        decision: Decision | None = None
        text_parts: list[str] = []
        reasoning_parts: list[str] = []
        acquired = ""
        status, error = "ok", ""
        self.in_flight += 1
        context.set_trailing_metadata((("x-request-id", rid),))
        try:
            if self.draining:
                raise Unavailable("the gateway is shutting down: retry on another replica")
            if self.in_flight > self.cfg.max_concurrent_streams:
                raise ResourceExhausted(f"more than {self.cfg.max_concurrent_streams} requests in flight: retry with backoff")
            checked = check_request(req, default_max_tokens=self.cfg.default_max_tokens,
                                    max_model_len=self.cfg.backend.max_model_len, max_chars=self.cfg.logs.max_message_chars)
            rec.messages = checked.messages
            rec.sampling = checked.sampling
            decision, classify_ms = await self.route(req, checked.messages)
            rec.task, rec.confidence, rec.route_reason = decision.task, decision.confidence, decision.reason_name
            rec.classify_ms = classify_ms
            if decision.adapter:
                a = self.table.loaded.get(decision.adapter)
                rec.adapter = decision.adapter
                rec.adapter_task, rec.adapter_version = (a.task, a.version) if a else ("", "")
                self.table.acquire(decision.adapter)
                acquired = decision.adapter
            m = self.managed
            if m is not None and (m.restarting or not m.alive()):
                raise Unavailable("the vLLM backend is down and being restarted: retry shortly")
            yield "start", (rid, decision, classify_ms)
            payload = {"model": decision.adapter or self.served_model, "messages": checked.messages, **checked.sampling}
            if checked.reasoning_effort:
                payload["reasoning_effort"] = checked.reasoning_effort
            remaining = context.time_remaining()
            b0 = now_ms()
            async for ev in self.backend.chat_stream(payload, timeout_s=remaining):
                if ev.final:
                    rec.finish_reason = ev.finish_reason
                    rec.prompt_tokens, rec.completion_tokens = ev.prompt_tokens, ev.completion_tokens
                    rec.backend_ms = now_ms() - b0
                    rec.total_ms = now_ms() - t0
                    rec.response_text = "".join(text_parts)
                    rec.reasoning_text = "".join(reasoning_parts)
                    await self.write_log(rec)  # durable before the final message is sent
                    yield "final", ev
                    return
                if not rec.ttft_ms:
                    rec.ttft_ms = now_ms() - t0
                if ev.delta:
                    text_parts.append(ev.delta)
                if ev.reasoning_delta:
                    reasoning_parts.append(ev.reasoning_delta)
                yield "event", ev
            raise Unavailable("the vLLM backend ended the stream without a final message: retry the request")
        except UserError as exc:
            if isinstance(exc, DeadlineExceeded):
                # the backend's own timer (deadline + 1 s) fired before gRPC cancelled this handler, which happens
                # on a loaded machine: the same event as a cancelled deadline, so it is logged the same way
                status, error = "cancelled", f"{exc.code.name}: {exc}"
                rec.finish_reason = "cancelled"
            else:
                status, error = "error", f"{exc.code.name}: {exc}"
                rec.finish_reason = "error"
            await context.abort(exc.code, str(exc))
        except (asyncio.CancelledError, GeneratorExit):
            status, error = "cancelled", "client cancelled or deadline exceeded"
            rec.finish_reason = "cancelled"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # a bug: log it with the request id, never send a trace
            log.exception("request %s failed", rid)
            status, error = "error", f"INTERNAL: {type(exc).__name__}: {exc}"
            rec.finish_reason = "error"
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in the gateway (request id {rid}); "
                                                          "see the gateway log")
        finally:
            self.in_flight -= 1
            if acquired:
                self.table.release(acquired)
            if status != "ok":
                rec.status, rec.error = status, error
                rec.response_text = "".join(text_parts)
                rec.total_ms = now_ms() - t0
                # the RPC is already over; write in the background (flushed on shutdown)
                self.spawn(self.write_log(rec, quiet=True))

    async def write_log(self, rec, quiet: bool = False) -> None:
        if self.log_writer is None:
            return
        try:
            await self.log_writer.write(rec)
        except Exception as exc:  # the client still gets its answer; the failure is loud in logs and health
            self.log_failures += 1
            log.error("log write failed for request %s: %s", rec.request_id, exc)


def raise_not_loaded(name: str, table: RoutingTable):
    from router.errors import NotFound

    raise NotFound(f"adapter {name!r} is not loaded; loaded: {sorted(table.loaded) or 'none'}")


def _route_pb(d: Decision | None) -> pb.Route | None:
    if d is None:
        return None
    return pb.Route(task=d.task, confidence=d.confidence, reason=d.reason)


def _timings(t0: float, ttft: float, classify_ms: float, backend_ms: float) -> pb.Timings:
    return pb.Timings(classify_ms=classify_ms, ttft_ms=ttft, total_ms=now_ms() - t0, backend_ms=backend_ms)


class RouterServicer(pbg.RouterServiceServicer):
    def __init__(self, gw: Gateway):
        self.gw = gw

    async def Generate(self, request, context):
        t0 = now_ms()
        parts, reasoning = [], []
        decision, rid, ttft, classify_ms = None, "", 0.0, 0.0
        final: StreamEvent | None = None
        b0 = 0.0
        async for kind, item in self.gw.run(request, context, stream=False):
            if kind == "start":
                rid, decision, classify_ms = item
                b0 = now_ms()
            elif kind == "event":
                if not ttft:
                    ttft = now_ms() - t0
                parts.append(item.delta)
                reasoning.append(item.reasoning_delta)
            else:
                final = item
        assert final is not None and decision is not None
        return pb.GenerateResponse(
            request_id=rid, text="".join(parts), reasoning_text="".join(reasoning), adapter=decision.adapter,
            finish_reason=FINISH.get(final.finish_reason, pb.FINISH_REASON_STOP),
            usage=pb.Usage(prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens,
                           total_tokens=final.prompt_tokens + final.completion_tokens),
            timings=_timings(t0, ttft, classify_ms, now_ms() - b0), route=_route_pb(decision), model=self.gw.served_model)

    async def GenerateStream(self, request, context):
        t0 = now_ms()
        decision, rid, ttft, first, b0, classify_ms = None, "", 0.0, True, 0.0, 0.0
        async for kind, item in self.gw.run(request, context, stream=True):
            if kind == "start":
                rid, decision, classify_ms = item
                b0 = now_ms()
                continue
            if kind == "event":
                if not ttft:
                    ttft = now_ms() - t0
                msg = pb.GenerateStreamResponse(request_id=rid, delta=item.delta, reasoning_delta=item.reasoning_delta)
                if first:
                    msg.adapter = decision.adapter
                    msg.route.CopyFrom(_route_pb(decision))
                    msg.model = self.gw.served_model
                    first = False
                yield msg
            else:
                yield pb.GenerateStreamResponse(
                    request_id=rid, finished=True, adapter=decision.adapter, route=_route_pb(decision),
                    model=self.gw.served_model, finish_reason=FINISH.get(item.finish_reason, pb.FINISH_REASON_STOP),
                    usage=pb.Usage(prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens,
                                   total_tokens=item.prompt_tokens + item.completion_tokens),
                    timings=_timings(t0, ttft, classify_ms, now_ms() - b0))

    async def Classify(self, request, context):
        try:
            if request.text:
                text = request.text
            else:
                from router.validation import check_messages

                text = last_user_text(check_messages(request.messages, max_chars=self.gw.cfg.logs.max_message_chars))
            if not text.strip():
                raise InvalidArgument("text is empty: send the prompt to classify in `text` or `messages`")
            if self.gw.classifier is None:
                raise FailedPrecondition("no classifier is configured on this gateway (classifier.enabled=false)")
            pred = await self.gw.classify(text)
            d = decide(self.gw.table, task_override="", known_tasks=list(self.gw.classifier.tasks), prediction=pred,
                       threshold=self.gw.threshold())
            return pb.ClassifyResponse(route=_route_pb(d), adapter=d.adapter, threshold=self.gw.threshold(),
                                       truncated=d.truncated,
                                       scores=[pb.TaskScore(task=t, probability=p) for t, p in
                                               sorted(d.scores.items(), key=lambda kv: -kv[1])])
        except UserError as exc:
            await context.abort(exc.code, str(exc))

    async def SubmitFeedback(self, request, context):
        try:
            if not request.request_id:
                raise InvalidArgument("request_id is empty: pass the request_id returned by Generate")
            if not 1 <= request.rating <= 5:
                raise InvalidArgument(f"rating is {request.rating}: use 1 (bad) to 5 (excellent)")
            w = self.gw.log_writer
            if w is None:
                raise FailedPrecondition("logging is disabled on this gateway (logs.enabled=false): feedback has nowhere to go")
            loop = asyncio.get_running_loop()
            fb, created = await w.add_feedback(request.request_id, request.rating, request.correction, request.comment) \
                if hasattr(w, "add_feedback") else await loop.run_in_executor(
                    None, w.store.add_feedback, request.request_id, request.rating, request.correction, request.comment)
            return pb.SubmitFeedbackResponse(feedback_id=fb.feedback_id, created=created)
        except UserError as exc:
            await context.abort(exc.code, str(exc))


def _info(a: LoadedAdapter, table: RoutingTable) -> pb.AdapterInfo:
    return pb.AdapterInfo(name=a.name, path=a.path, task=a.task, version=a.version,
                          routed=a.name in table.routes.values(), in_flight=a.in_flight)


class AdminServicer(pbg.AdminServiceServicer):
    def __init__(self, gw: Gateway):
        self.gw = gw

    async def _call(self, context, fn):
        try:
            return await fn()
        except UserError as exc:
            await context.abort(exc.code, str(exc))

    async def ListAdapters(self, request, context):
        t = self.gw.table
        return pb.ListAdaptersResponse(adapters=[_info(a, t) for a in t.loaded.values()],
                                       routes=[pb.RouteEntry(task=k, adapter=v) for k, v in sorted(t.routes.items())])

    async def LoadAdapter(self, request, context):
        async def go():
            if not request.name or not request.path:
                raise InvalidArgument("name and path are required: LoadAdapter(name='code@1', path='/abs/peft/folder')")
            if not ADAPTER_NAME.match(request.name) or request.name == "base":
                raise InvalidArgument(f"adapter name {request.name!r} is not allowed: use letters, digits, '_', '-', "
                                      "'.', '@' (max 100 characters), not 'base'")
            a = await self.gw.load_adapter(request.name, request.path)
            return pb.LoadAdapterResponse(adapter=_info(a, self.gw.table))
        return await self._call(context, go)

    async def UnloadAdapter(self, request, context):
        async def go():
            await self.gw.unload_adapter(request.name)
            return pb.UnloadAdapterResponse()
        return await self._call(context, go)

    def _deployer(self):
        if self.gw.deployer is None:
            raise FailedPrecondition("this gateway has no adapter registry configured")
        return self.gw.deployer

    async def DeployAdapter(self, request, context):
        async def go():
            r = await self._deployer().deploy(request.task, request.version or None)
            return pb.DeployAdapterResponse(**r)
        return await self._call(context, go)

    async def RollbackAdapter(self, request, context):
        async def go():
            r = await self._deployer().rollback(request.task)
            return pb.RollbackAdapterResponse(**r)
        return await self._call(context, go)

    async def RetireAdapter(self, request, context):
        async def go():
            r = await self._deployer().retire(request.task)
            return pb.RetireAdapterResponse(**r)
        return await self._call(context, go)

    async def ReloadClassifier(self, request, context):
        async def go():
            import classifier as clf_pkg
            from classifier.embed import retain

            path = request.path or self.gw.cfg.classifier.path or None

            def load_warm():
                clf = clf_pkg.load(path)
                return clf, clf.warm_up()  # its encoder loads now, not in the next user request

            # requests keep classifying with the current model until the new one is loaded and warm
            clf, embedders = await asyncio.get_running_loop().run_in_executor(None, load_warm)
            self.gw.classifier = clf
            dropped = retain(*embedders)
            log.info("classifier %s loaded from %s (%s); %d unused encoder(s) released", clf.version, clf.path,
                     clf.kind, dropped)
            return pb.ReloadClassifierResponse(version=str(clf.version), tasks=list(clf.tasks))
        return await self._call(context, go)


class _Undecodable:
    """Stands in for a request whose bytes are not valid protobuf (e.g. strings that are not UTF-8)."""

    def __init__(self, error: str):
        self.error = error


def _safe_deserializer(cls):
    from google.protobuf.message import DecodeError

    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))
    return deserialize


_UNDECODABLE = ("the request could not be decoded: every string field must be valid UTF-8 and the message must "
                "match router.v1 ({})")


def add_servicer(server, service: str, servicer) -> None:
    """Like the generated add_*_to_server, but an undecodable request is INVALID_ARGUMENT, not INTERNAL."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name[service].methods:
        fn = getattr(servicer, m.name)
        req_cls, resp_cls = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        kw = dict(request_deserializer=_safe_deserializer(req_cls), response_serializer=resp_cls.SerializeToString)
        if m.server_streaming:
            async def stream(request, context, fn=fn):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _UNDECODABLE.format(request.error))
                async for item in fn(request, context):
                    yield item
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(stream, **kw)
        else:
            async def unary(request, context, fn=fn):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _UNDECODABLE.format(request.error))
                return await fn(request, context)
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(unary, **kw)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(f"router.v1.{service}", handlers),))


class Server:
    """A started gateway: `.port`, `.gateway`, `await .stop()`."""

    def __init__(self, grpc_server, gateway: Gateway, port: int, tasks: list[asyncio.Task]):
        self.grpc = grpc_server
        self.gateway = gateway
        self.port = port
        self._tasks = tasks

    @property
    def target(self) -> str:
        return f"{self.gateway.cfg.host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        gw = self.gateway
        gw.draining = True
        await gw.set_serving(False)
        await self.grpc.stop(gw.cfg.grace_s if grace_s is None else grace_s)
        for t in self._tasks:
            t.cancel()
        if gw.deployer is not None:
            gw.deployer.stop()
        if gw._bg:
            await asyncio.gather(*list(gw._bg), return_exceptions=True)
        if gw.log_writer is not None:
            with contextlib.suppress(Exception):
                await gw.log_writer.close()
        await gw.backend.close()
        if gw.managed is not None:
            await gw.managed.stop()
        gw._cls_pool.shutdown(wait=False)

    async def wait(self) -> None:
        await self.grpc.wait_for_termination()


async def build(cfg: GatewayConfig, *, backend_url: str | None = None, progress=print) -> Server:
    """Start everything (managed vLLM or external, classifier, logs, registry) and the gRPC server."""
    from router import model as model_mod

    interceptors = []
    tokens = load_tokens(cfg.auth)
    if cfg.auth.enabled:
        interceptors.append(AuthInterceptor(tokens))
    else:
        log.warning("AUTH IS OFF (auth.enabled=false): anyone who can reach %s:%s can generate and administer "
                    "adapters. Enable it for anything but local use.", cfg.host, cfg.port)

    # classifier first: a missing or corrupt artifact is a clear error before anything else starts
    clf = None
    if cfg.classifier.enabled:
        import classifier as clf_pkg

        path = cfg.classifier.path or str(clf_pkg.ensure_default())
        clf = clf_pkg.load(path)
        clf.warm_up()  # load weights now, not on the first user request

    log_writer = None
    if cfg.logs.enabled:
        from router.logs.pii import PiiPolicy
        from router.logs.store import open_store
        from router.logs.writer import AsyncLogWriter

        store = open_store(cfg.logs.path or None)
        log_writer = AsyncLogWriter(store, pii_policy=PiiPolicy(mode=cfg.logs.pii, extra_patterns=cfg.logs.pii_patterns))

    managed = None
    model_dir = None
    b = cfg.backend
    if b.mode == "managed" and backend_url is None:
        from router.managed import ManagedVLLM

        model = model_mod.resolve(b.model)
        model_dir = model if Path(model).is_dir() else None
        served = model
        managed = ManagedVLLM(b, model)
        progress(f"[gateway] starting managed vLLM for {model} on {managed.url} (first start ~1 min)")
        await managed.start()
        url = managed.url
    else:
        url = backend_url or b.url
        served = ""
    backend = VLLMBackend(url, api_key=b.api_key, request_timeout_s=b.request_timeout_s)
    listed: list[dict] = []
    if not served:
        if b.model and Path(b.model).is_dir():
            model_dir = b.model
        try:
            listed = await backend.models()
        except UserError as exc:  # external backend down: start anyway, NOT_SERVING until it answers
            log.error("external backend %s is not reachable at startup (%s); serving UNAVAILABLE until it is", url, exc)
        bases = [m["id"] for m in listed if not m.get("parent")]
        served = bases[0] if bases else b.model
        if not served:
            raise Unavailable(f"cannot tell which model the backend at {url} serves: it is unreachable and "
                              "backend.model is not set")
    gw = Gateway(cfg, backend, served_model=served, model_dir=model_dir, managed=managed, classifier=clf,
                 log_writer=log_writer)
    # adapters already loaded in an external backend are usable by name
    for m in listed:
        if m.get("parent") and m["id"] not in gw.table.loaded:
            gw.table.loaded[m["id"]] = LoadedAdapter(name=m["id"], path=str(m.get("root", "")))

    from router.deploy import Deployer

    gw.deployer = Deployer(gw, registry_root=cfg.registry or None)
    await gw.deployer.restore()

    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.so_reuseport", 0)])
    add_servicer(server, "RouterService", RouterServicer(gw))
    add_servicer(server, "AdminService", AdminServicer(gw))
    health_pb2_grpc.add_HealthServicer_to_server(gw.health, server)
    names = [pb.DESCRIPTOR.services_by_name[s.split(".")[-1]].full_name for s in SERVICES]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if port == 0:
        raise FailedPrecondition(f"cannot listen on {cfg.host}:{cfg.port}: the port is in use; pick another with --port")
    gw.backend_up = await backend.health()
    await gw.set_serving(gw.backend_up)
    await server.start()
    tasks = [asyncio.create_task(gw.monitor_backend(), name="backend-monitor"), gw.deployer.start_polling()]
    if managed is not None:
        async def on_restart():
            await gw.reload_adapters_into_backend()
            gw.backend_up = True
            await gw.set_serving(True)

        def on_down():
            gw.backend_up = False
            gw.spawn(gw.set_serving(False))

        tasks.append(managed.watch(on_restart=on_restart, on_down=on_down))
    progress(f"[gateway] serving router.v1 on {cfg.host}:{port} (backend {url}, model {served})")
    return Server(server, gw, port, tasks)
