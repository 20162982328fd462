"""The gateway process, assembled: `build(cfg)` starts every part and the grpc.aio server; `Server.stop()` drains.

Parts, each in its own module: the backend client (`backend`) or managed vLLM (`managed`), the classifier
(`classify`), the conversation log (`pipeline.LogSink` over `convlog`), the routing table (`routing`) and the
adapters the backend holds (`lora`), the deployer (`deploy`), the request pipeline (`pipeline`), the servicers
(`service`, `admin`), health (`health`) and auth (`auth`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import basemodel
import classifier as classifier_pkg
from adapters.registry import Registry
from convlog.pii import PiiPolicy
from convlog.store import is_store_url, open_store
from convlog.writer import AsyncLogWriter
from core import paths
from core.errors import ConfigError, FailedPrecondition, RouterError, Unavailable
from router import health as health_mod
from router.admin import AdminServicer
from router.auth import Authenticator, AuthInterceptor, load_tokens
from router.backend import VLLMBackend
from router.classify import TaskClassifier
from router.config import GatewayConfig
from router.deploy import Deployer
from router.grpc_errors import add_servicer
from router.health import SERVICES, Health
from router.http_api import HttpApi, HttpServer
from router.lora import AdapterLoader, AdapterPolicy
from router.managed import ManagedVLLM
from router.metrics import NO_METRICS, GatewayMetrics, Parts
from router.pipeline import LogSink, Pipeline
from router.replicas import Replica, ReplicaSet
from router.routing import LoadedAdapter, RoutingTable
from router.service import RouterServicer
from router.v1 import router_pb2 as pb

log = logging.getLogger("router.gateway")


class Server:
    """A started gateway: `.port`, `.target`, its parts, `await .stop()`."""

    def __init__(self, cfg: GatewayConfig, grpc_server, port: int, *, pipeline: Pipeline, loader: AdapterLoader,
                 deployer: Deployer, classifier: TaskClassifier, health: Health, tasks: list[asyncio.Task],
                 model_dir: str | None, http: HttpServer | None, metrics):
        self.cfg = cfg
        self.grpc = grpc_server
        self.port = port
        self.pipeline = pipeline
        self.loader = loader
        self.table = loader.table
        self.backend = loader.backend
        self.deployer = deployer
        self.classifier = classifier
        self.health = health
        self.replicas = loader.backend.replicas  # the vLLM replicas (`.backend`, `.managed`, `.held`, ...)
        self.managed = self.replicas[0].managed  # the first managed vLLM (None: external), the embedded default's one
        self.model_dir = model_dir  # the served base model's local folder (None: not on this host)
        self._tasks = tasks
        self.http = http  # the OpenAI-compatible HTTP door (None: http.enabled=false); `.url`, `.port`
        self.metrics = metrics

    @property
    def target(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        await self.health.drain()
        grace = self.cfg.grace_s if grace_s is None else grace_s
        if self.http is not None:
            self.http.server.config.timeout_graceful_shutdown = grace
        await asyncio.gather(self.grpc.stop(grace), *([self.http.stop()] if self.http is not None else []))
        for t in self._tasks:
            t.cancel()
        await self.deployer.stop()
        await self.pipeline.logs.close()
        await self.backend.close()
        await asyncio.gather(*(r.managed.stop() for r in self.replicas if r.managed is not None))
        self.classifier.close()

    async def wait(self) -> None:
        await self.grpc.wait_for_termination()


def _load_classifier(cfg: GatewayConfig):
    """The classifier first: a missing or corrupt artifact is a clear error before anything else starts."""
    if not cfg.classifier.enabled:
        return None
    clf = classifier_pkg.load(cfg.classifier.path or str(classifier_pkg.ensure_default()))
    clf.warm_up()  # load weights now, not on the first user request
    return clf


def _log_writer(cfg: GatewayConfig) -> AsyncLogWriter | None:
    if not cfg.logs.enabled:
        return None
    url = cfg.logs.url.strip()
    if url and not is_store_url(url):
        raise ConfigError(f"logs.url must be a postgresql:// URL (e.g. postgresql://router@db:5432/logs), got "
                          f"{url.split('://')[0] + '://...' if '://' in url else 'a value without a scheme'}")
    if url and cfg.logs.path:
        raise ConfigError("logs.url and logs.path are both set: the log store is either PostgreSQL (url) or a SQLite "
                          "file (path); unset one")
    store = open_store(url or cfg.logs.path or None)
    return AsyncLogWriter(store, pii_policy=PiiPolicy(mode=cfg.logs.pii, extra_patterns=cfg.logs.pii_patterns))


async def _backend(cfg: GatewayConfig, progress) -> tuple[ReplicaSet, str, str | None]:
    """(the replica set, served model, local model folder or None). Managed replicas are started in parallel; an
    external replica that is down at startup is taken in when it answers."""
    b = cfg.backend
    kw = dict(slots=b.adapter_slots, balance=b.balance, spill=b.affinity_spill, slot_wait_s=b.slot_wait_s,
              priority=b.use_priority)
    if not b.external:
        model = basemodel.resolve(b.model)
        procs = []
        for i in range(b.replicas):
            procs.append(ManagedVLLM(dataclasses.replace(b, port=b.port + i if b.port else 0), model))
        urls = ", ".join(m.url for m in procs)
        progress(f"[gateway] starting {len(procs)} managed vLLM replica(s) for {model} on {urls} (first start ~1 min)")
        try:
            await asyncio.gather(*(m.start() for m in procs))
        except BaseException:
            await asyncio.gather(*(m.stop() for m in procs), return_exceptions=True)
            raise
        replicas = ReplicaSet([Replica(i, VLLMBackend(m.url, api_key=m.api_key, request_timeout_s=b.request_timeout_s),
                                       managed=m) for i, m in enumerate(procs)], **kw)
        await replicas.check_all()
        return replicas, model, (model if Path(model).is_dir() else None)
    replicas = ReplicaSet([Replica(i, VLLMBackend(u, api_key=b.api_key, request_timeout_s=b.request_timeout_s))
                           for i, u in enumerate(b.backend_urls)], **kw)
    served = ""
    for r in replicas.replicas:
        try:
            listed = await r.backend.models()
        except RouterError as exc:  # down: start anyway, taken in when it answers (NOT_SERVING while none does)
            log.error("vLLM replica %s (%s) is not reachable at startup (%s); it takes requests once it answers",
                      r.name, r.url, exc)
            continue
        replicas.adopt(r, listed)  # adapters it already holds are usable by name
        bases = [m["id"] for m in listed if not m.get("parent")]
        if bases and not served:
            served = bases[0]
        elif bases and bases[0] != served:
            raise FailedPrecondition(f"the vLLM replicas serve different models ({served!r} at "
                                     f"{replicas.replicas[0].url}, {bases[0]!r} at {r.url}): every replica in "
                                     "backend.urls must serve the same base model")
    served = served or b.model
    if not served:
        raise Unavailable(f"cannot tell which model the backend at {b.backend_urls[0]} serves: it is unreachable and "
                          "backend.model is not set")
    await replicas.check_all()
    return replicas, served, (b.model if b.model and Path(b.model).is_dir() else None)


async def build(cfg: GatewayConfig, *, progress=print) -> Server:
    """Start everything (managed vLLM or external, classifier, logs, registry) and the gRPC server."""
    interceptors = []
    tokens = load_tokens(cfg.auth)
    auth = Authenticator(tokens) if cfg.auth.enabled else None
    if auth is not None:
        interceptors.append(AuthInterceptor(auth))
        if not cfg.tls.enabled:
            log.warning("auth is on without TLS: bearer tokens cross the network in plaintext. Set tls.cert_file and "
                        "tls.key_file (--tls-cert/--tls-key) for anything beyond loopback.")
    else:
        log.warning("AUTH IS OFF (auth.enabled=false): anyone who can reach %s:%s can generate and administer "
                    "adapters. Enable it for anything but local use.", cfg.host, cfg.port)
    task_classifier = TaskClassifier(_load_classifier(cfg), cfg.classifier)
    writer = _log_writer(cfg)
    backend, served, model_dir = await _backend(cfg, progress)

    table = RoutingTable(cfg.task_adapters)
    for name, path in backend.known.items():  # adapters already loaded in an external backend are usable by name
        table.loaded[name] = LoadedAdapter(name=name, path=path)
    loader = AdapterLoader(backend, table)
    registry = Registry(cfg.registry or None)
    policy = AdapterPolicy([registry.root, paths.local_adapters_dir(), *(Path(r) for r in cfg.adapter_roots)],
                           model_dir=model_dir, served_model=served, max_lora_rank=cfg.backend.max_lora_rank)
    health_ = Health()
    metrics = GatewayMetrics(Parts(backend=backend, writer=writer, health=health_, table=table)) \
        if cfg.metrics.enabled else NO_METRICS
    logs = LogSink(writer, metrics)
    pipeline = Pipeline(cfg, backend, table, task_classifier, logs, health_, served_model=served, metrics=metrics)
    deployer = Deployer(registry, loader, policy, cfg.deploy)
    backend.metrics = deployer.metrics = metrics
    pipeline.load_pinned = deployer.load_pinned
    await deployer.restore()

    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", cfg.limits.receive_bytes()), ("grpc.so_reuseport", 0)])
    add_servicer(server, "RouterService", RouterServicer(pipeline, writer))
    add_servicer(server, "AdminService", AdminServicer(loader, policy, deployer, task_classifier))
    health_pb2_grpc.add_HealthServicer_to_server(health_.servicer, server)
    names = [pb.DESCRIPTOR.services_by_name[s.split(".")[-1]].full_name for s in SERVICES]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    creds = _grpc_credentials(cfg)
    addr = f"{cfg.host}:{cfg.port}"
    port = server.add_secure_port(addr, creds) if creds is not None else server.add_insecure_port(addr)
    if port == 0:
        raise FailedPrecondition(f"cannot listen on {cfg.host}:{cfg.port}: the port is in use; pick another with --port")
    http = None
    if cfg.http.enabled:
        api = HttpApi(pipeline, writer=writer, auth=auth, metrics=metrics, health=health_,
                      max_body_bytes=cfg.limits.receive_bytes())
        http = HttpServer(api.app, cfg.http.host or cfg.host, cfg.http.port, tls=cfg.tls, grace_s=cfg.grace_s)
    await health_.set_backend(await backend.health())
    await server.start()
    if http is not None:
        await http.start()
    tasks = [asyncio.create_task(health_mod.watch(health_, backend, logs, cfg.backend.health_interval_s),
                                 name="backend-monitor"),
             deployer.start_polling()]
    for r in backend.replicas:
        if r.managed is not None:
            tasks.append(r.managed.watch(on_restart=_on_restart(backend, r, health_), on_down=_on_down(backend, r, health_)))
    tls = " over TLS" + (" (mutual)" if cfg.tls.client_ca_file else "") if creds is not None else ""
    progress(f"[gateway] serving router.v1 on {cfg.host}:{port}{tls} (vLLM {', '.join(backend.urls)}, model {served})")
    if http is not None:
        progress(f"[gateway] OpenAI-compatible API on {http.url}/v1" + (", metrics on /metrics" if metrics.enabled
                                                                        else ""))
    return Server(cfg, server, port, pipeline=pipeline, loader=loader, deployer=deployer, classifier=task_classifier,
                  health=health_, tasks=tasks, model_dir=model_dir, http=http, metrics=metrics)


def _on_restart(replicas: ReplicaSet, r: Replica, health_: Health):
    async def go() -> None:  # the restarted process gets its adapters back before it takes requests
        await replicas.restore(r)
        await health_.set_backend(await replicas.health())
    return go


def _on_down(replicas: ReplicaSet, r: Replica, health_: Health):
    async def go() -> None:
        replicas.mark_down(r, "the managed vLLM process exited")
        await health_.set_backend(await replicas.health())
    return go


def _grpc_credentials(cfg: GatewayConfig):
    """Server credentials when TLS is configured (client certificates required when a client CA is set)."""
    t = cfg.tls
    if not t.enabled:
        return None
    key, cert = Path(t.key_file).expanduser().read_bytes(), Path(t.cert_file).expanduser().read_bytes()
    ca = Path(t.client_ca_file).expanduser().read_bytes() if t.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
