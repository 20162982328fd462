"""The routing table and policy: which adapter (or the base model) serves a request, and why.

The table maps task -> adapter name; it is replaced as a whole (one reference assignment) so a request
sees either the old or the new table, never a mix. A task may also have a canary (registry canary state): a
share of the task's routed traffic goes to the canary version, chosen by a hash of the request (`split_point`),
so every gateway replica sends the same request to the same version, and a retried request (same content, same
client) lands where the first attempt did. Each loaded adapter counts its in-flight requests so
a deploy can drain the old version before unloading it.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field

from core.errors import InvalidArgument, NotFound, quoted
from router.v1 import router_pb2 as pb

BASE = "base"
GENERAL = "general"


@dataclass
class LoadedAdapter:
    name: str
    path: str
    task: str = ""
    version: str = ""
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    last_used: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.idle.set()


@dataclass
class Decision:
    adapter: str  # "" = base model
    task: str
    confidence: float
    reason: int  # pb.RouteReason
    truncated: bool = False
    scores: dict = field(default_factory=dict)

    @property
    def reason_name(self) -> str:
        return pb.RouteReason.Name(self.reason).removeprefix("ROUTE_REASON_").lower()


@dataclass(frozen=True)
class Canary:
    adapter: str  # the canary version's loaded name, e.g. code@4
    share: float  # of the task's routed traffic, (0, 1]


def split_point(messages: list[dict], client_id: str) -> float:
    """A request's position in [0, 1): the same on every replica and for a retry of the same request."""
    h = hashlib.blake2b(json.dumps([client_id, messages], ensure_ascii=False, separators=(",", ":")).encode(),
                        digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


class RoutingTable:
    def __init__(self, static_routes: dict[str, str] | None = None):
        self.routes: dict[str, str] = dict(static_routes or {})
        self.loaded: dict[str, LoadedAdapter] = {}
        self.canaries: dict[str, Canary] = {}

    def set_canary(self, task: str, canary: Canary | None) -> None:
        new = dict(self.canaries)
        if canary is not None:
            new[task] = canary
        else:
            new.pop(task, None)
        self.canaries = new  # atomic swap

    def in_use(self, name: str) -> list[str]:
        """Tasks that route `name` (production or canary): it must stay loaded."""
        return sorted({t for t, a in self.routes.items() if a == name} |
                      {t for t, c in self.canaries.items() if c.adapter == name})

    def set_route(self, task: str, adapter: str | None) -> None:
        new = dict(self.routes)
        if adapter:
            new[task] = adapter
        else:
            new.pop(task, None)
        self.routes = new  # atomic swap

    def route_for(self, task: str) -> str:
        name = self.routes.get(task, "")
        return name if name in self.loaded else ""

    def acquire(self, name: str) -> None:
        a = self.loaded.get(name)
        if a is not None:
            a.in_flight += 1
            a.last_used = time.monotonic()
            a.idle.clear()

    def release(self, name: str) -> None:
        a = self.loaded.get(name)
        if a is not None:
            a.in_flight = max(0, a.in_flight - 1)
            if a.in_flight == 0:
                a.idle.set()

    async def drain(self, name: str, timeout_s: float) -> bool:
        a = self.loaded.get(name)
        if a is None:
            return True
        try:
            await asyncio.wait_for(a.idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


def explicit_adapter(table: RoutingTable, name: str) -> Decision:
    """A request that names an adapter: a loaded adapter name, a task (its routed adapter), or "base"."""
    if name == BASE:
        return Decision("", "", 1.0, pb.ROUTE_REASON_ADAPTER_OVERRIDE)
    if name in table.loaded:
        a = table.loaded[name]
        return Decision(name, a.task, 1.0, pb.ROUTE_REASON_ADAPTER_OVERRIDE)
    routed = table.route_for(name)
    if routed:
        return Decision(routed, name, 1.0, pb.ROUTE_REASON_ADAPTER_OVERRIDE)
    known = sorted(set(table.loaded) | set(table.routes))
    raise NotFound(f"adapter {quoted(name)} is not loaded: use one of {known or 'none loaded'}, a task name with a "
                   f"deployed specialist, or 'base' (list them with `specialist-router adapters list`)")


def _canary(table: RoutingTable, d: Decision, point: float | None) -> Decision:
    """The canary's share of a task's routed traffic goes to the canary version (when it is loaded)."""
    c = table.canaries.get(d.task)
    if c is None or point is None or point >= c.share or c.adapter not in table.loaded:
        return d
    return Decision(c.adapter, d.task, d.confidence, pb.ROUTE_REASON_CANARY, d.truncated, d.scores)


def decide(table: RoutingTable, *, task_override: str, known_tasks: list[str] | None,
           prediction=None, threshold: float = 0.0, point: float | None = None) -> Decision:
    """Policy for requests without an explicit adapter. `prediction` is the classifier's Prediction or None;
    `point`: the request's `split_point` (None: no canary split, e.g. Classify)."""
    if task_override:
        if known_tasks is not None and task_override not in known_tasks and task_override not in table.routes:
            raise InvalidArgument(f"task {quoted(task_override)} is not a known task: use one of {sorted(known_tasks)}")
        return _canary(table, Decision(table.route_for(task_override), task_override, 1.0,
                                       pb.ROUTE_REASON_TASK_OVERRIDE), point)
    if prediction is None:
        return Decision("", "", 0.0, pb.ROUTE_REASON_CLASSIFIER_DISABLED)
    task, conf = prediction.task, float(prediction.confidence)
    extra = dict(truncated=bool(getattr(prediction, "truncated", False)), scores=dict(getattr(prediction, "scores", {}) or {}))
    if conf < threshold:
        return Decision("", task, conf, pb.ROUTE_REASON_LOW_CONFIDENCE, **extra)
    if task == GENERAL:
        return Decision("", task, conf, pb.ROUTE_REASON_GENERAL_TASK, **extra)
    adapter = table.route_for(task)
    if not adapter:
        return _canary(table, Decision("", task, conf, pb.ROUTE_REASON_NO_ADAPTER, **extra), point)
    return _canary(table, Decision(adapter, task, conf, pb.ROUTE_REASON_SPECIALIST, **extra), point)
