"""The SDK's typed results: what `router.client` returns instead of protobuf messages."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from router.v1 import router_pb2 as pb

FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_CANCELLED: "cancelled",
          pb.FINISH_REASON_ERROR: "error", pb.FINISH_REASON_UNSPECIFIED: ""}


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


@dataclass(frozen=True)
class AdapterInfo:
    name: str  # what vLLM knows it as, e.g. code@3
    path: str
    task: str
    version: str
    routed: bool  # some task's requests go to it
    in_flight: int
    replicas: list[str] = field(default_factory=list)  # the vLLM replicas holding it now ("r0", ...)


@dataclass(frozen=True)
class ReplicaInfo:
    name: str  # r0, r1, ... in the order of backend.urls (or of the managed replicas)
    url: str
    up: bool  # answers /health and holds its adapters: takes requests
    in_flight: int
    adapters: list[str]
    loads: int
    unloads: int
    failovers: int  # requests moved away before their first token
    restarts: int
    last_error: str


@dataclass(frozen=True)
class Adapters:
    loaded: list[AdapterInfo]
    routes: dict[str, str]  # task -> adapter name
    replicas: list[ReplicaInfo] = field(default_factory=list)


@dataclass(frozen=True)
class DeployResult:
    task: str
    version: str
    adapter: str
    previous_version: str = ""
    swap_ms: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClassifierInfo:
    version: str
    tasks: list[str]


def adapter(a: pb.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(a.name, a.path, a.task, a.version, a.routed, a.in_flight, list(a.replicas))


def replica(r: pb.ReplicaInfo) -> ReplicaInfo:
    return ReplicaInfo(r.name, r.url, r.up, r.in_flight, list(r.adapters), r.loads, r.unloads, r.failovers, r.restarts,
                       r.last_error)


def result(r: pb.GenerateResponse) -> Result:
    return Result(r.request_id, r.text, r.reasoning_text, r.adapter, FINISH.get(r.finish_reason, ""),
                  Usage(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens),
                  Timings(r.timings.classify_ms, r.timings.ttft_ms, r.timings.total_ms, r.timings.backend_ms),
                  Route.of(r.route), r.model)


def chunk(m: pb.GenerateStreamResponse) -> Chunk:
    return Chunk(m.request_id, m.delta, m.reasoning_delta, m.finished, m.adapter,
                 Route.of(m.route) if m.HasField("route") else None, FINISH.get(m.finish_reason, ""),
                 Usage(m.usage.prompt_tokens, m.usage.completion_tokens, m.usage.total_tokens) if m.finished else None,
                 Timings(m.timings.classify_ms, m.timings.ttft_ms, m.timings.total_ms, m.timings.backend_ms)
                 if m.finished else None)


def classification(r: pb.ClassifyResponse) -> Classification:
    route = Route.of(r.route)
    return Classification(route.task, route.confidence, route.reason, r.adapter, r.threshold,
                          {s.task: s.probability for s in r.scores})
