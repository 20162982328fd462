"""Prometheus metrics of one gateway process (`prometheus_client`), served on the HTTP port's `/metrics`.

One `CollectorRegistry` per gateway (not the library's global one), so several gateways in one process (tests,
benchmarks) keep separate series. Request series are recorded once per request, by the pipeline, whatever the
front door (`api` label: grpc | http). Counters that parts keep themselves (the backend client's `BackendStats`,
the log writer's `stats()`, the managed vLLM's restart count) are read at scrape time by `_PartsCollector`, so
they are exported, not copied.

Names and units follow Prometheus conventions: `specialist_router_` prefix, `_seconds`, `_total`.
`NO_METRICS` is the do-nothing recorder used when `metrics.enabled` is false.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "specialist_router"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# latency buckets: a CPU SmolLM2 answers in 50 ms..30 s, a GPU GPT-OSS first token in 20 ms..2 s
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_DEPLOY = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class NoMetrics:
    """The recorder interface, doing nothing (metrics off)."""

    enabled = False

    def request_started(self, api: str) -> None: ...

    def request_finished(self, api: str, *, task: str, adapter: str, reason: str, status: str, classify_s: float,
                         ttft_s: float, total_s: float, prompt_tokens: int, completion_tokens: int) -> None: ...

    def adapter_loaded(self, result: str) -> None: ...

    def adapter_unloaded(self, result: str) -> None: ...

    def deploy_done(self, action: str, task: str, result: str, seconds: float) -> None: ...

    def log_write(self, seconds: float, ok: bool) -> None: ...

    def exposition(self) -> bytes:
        return b""


NO_METRICS = NoMetrics()


class GatewayMetrics(NoMetrics):
    enabled = True

    def __init__(self, parts: "Parts | None" = None):
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = PREFIX
        self.requests = Counter(f"{p}_requests", "Generation requests by front door, task, adapter ('' = base model), "
                                "route reason and final status (a gRPC status name, OK when answered).",
                                ["api", "task", "adapter", "route_reason", "status"], registry=r)
        self.in_flight = Gauge(f"{p}_requests_in_flight", "Generation requests being served now.", ["api"], registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Gateway-measured time from request arrival to "
                              "the first generated text.", ["api", "task", "adapter"], buckets=_LATENCY, registry=r)
        self.e2e = Histogram(f"{p}_request_duration_seconds", "End-to-end time of a generation request, from arrival "
                             "to its final message (answered requests).", ["api", "task", "adapter"],
                             buckets=_LATENCY, registry=r)
        self.classify = Histogram(f"{p}_classifier_duration_seconds", "Time to classify one prompt (routed requests).",
                                  buckets=_FAST, registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens of answered requests.", ["task", "adapter"],
                                     registry=r)
        self.completion_tokens = Counter(f"{p}_completion_tokens", "Generated tokens of answered requests.",
                                         ["task", "adapter"], registry=r)
        self.adapter_loads = Counter(f"{p}_adapter_loads", "Adapter loads into the backend by result.", ["result"],
                                     registry=r)
        self.adapter_unloads = Counter(f"{p}_adapter_unloads", "Adapter unloads from the backend by result.",
                                       ["result"], registry=r)
        self.deploys = Histogram(f"{p}_deploy_duration_seconds", "Duration of deploy / rollback / retire operations "
                                 "(load, validate, smoke test, switch) by result.", ["action", "task", "result"],
                                 buckets=_DEPLOY, registry=r)
        self.log_write_s = Histogram(f"{p}_log_write_seconds", "Time a request waits for its log record to be "
                                     "durable (group commit included).", buckets=_FAST, registry=r)
        self.log_write_failures = Counter(f"{p}_log_write_failures", "Log records the gateway could not write.",
                                          registry=r)
        if parts is not None:
            r.register(_PartsCollector(parts))

    def request_started(self, api: str) -> None:
        self.in_flight.labels(api).inc()

    def request_finished(self, api: str, *, task: str, adapter: str, reason: str, status: str, classify_s: float,
                         ttft_s: float, total_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.in_flight.labels(api).dec()
        self.requests.labels(api, task, adapter, reason, status).inc()
        if classify_s > 0:
            self.classify.observe(classify_s)
        if status != "OK":
            return
        if ttft_s > 0:
            self.ttft.labels(api, task, adapter).observe(ttft_s)
        self.e2e.labels(api, task, adapter).observe(total_s)
        self.prompt_tokens.labels(task, adapter).inc(prompt_tokens)
        self.completion_tokens.labels(task, adapter).inc(completion_tokens)

    def adapter_loaded(self, result: str) -> None:
        self.adapter_loads.labels(result).inc()

    def adapter_unloaded(self, result: str) -> None:
        self.adapter_unloads.labels(result).inc()

    def deploy_done(self, action: str, task: str, result: str, seconds: float) -> None:
        self.deploys.labels(action, task, result).observe(seconds)

    def log_write(self, seconds: float, ok: bool) -> None:
        self.log_write_s.observe(seconds)
        if not ok:
            self.log_write_failures.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Parts:
    """What `_PartsCollector` reads at scrape time; any of them may be None."""

    def __init__(self, *, backend=None, writer=None, health=None, table=None):
        self.backend, self.writer, self.health, self.table = backend, writer, health, table


class _PartsCollector:
    """Exports the counters the gateway's parts keep (read when Prometheus scrapes, never copied)."""

    def __init__(self, parts: Parts):
        self.parts = parts

    def describe(self):
        return []  # unchecked collector: its families are built per scrape

    def collect(self):
        p, pre = self.parts, PREFIX

        def one(family, name: str, help_text: str, value: float):
            m = family(f"{pre}_{name}", help_text)
            m.add_metric([], value)
            return m

        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        if p.health is not None:
            yield one(gauge, "backend_up", "1 while the vLLM backend answers /health, else 0.",
                      1.0 if p.health.backend_up else 0.0)
            yield one(gauge, "serving", "1 while the gateway reports SERVING (backend up, not draining), else 0.",
                      1.0 if p.health.backend_up and not p.health.draining else 0.0)
        if p.backend is not None:
            s = p.backend.stats
            yield one(counter, "backend_requests", "Generation requests sent to vLLM.", s.requests)
            yield one(counter, "backend_errors", "vLLM requests that failed to connect or lost their stream.", s.errors)
        replicas = list(getattr(p.backend, "replicas", []))
        yield one(counter, "backend_restarts", "Restarts of managed vLLM replicas after they died (always 0 for external "
                  "ones, which their own supervisor restarts).",
                  sum(r.managed.restarts for r in replicas if r.managed is not None))
        if replicas:
            fams = {k: (gauge if k != "failovers" else counter)(f"{pre}_replica_{k}", h, labels=["replica"])
                    for k, h in (("up", "1 while the vLLM replica takes requests (answers /health, adapters loaded)."),
                                 ("in_flight", "Requests the gateway has in flight on the replica."),
                                 ("adapters", "Adapters the replica holds for this gateway."),
                                 ("failovers", "Requests moved to another replica before their first token because "
                                               "this one failed."))}
            for r in replicas:
                fams["up"].add_metric([r.name], 1.0 if r.serving() else 0.0)
                fams["in_flight"].add_metric([r.name], r.in_flight)
                fams["adapters"].add_metric([r.name], len(r.held))
                fams["failovers"].add_metric([r.name], r.failovers)
            yield from fams.values()
        if p.table is not None:
            yield one(gauge, "adapters_loaded", "Adapters the backend holds for this gateway.", len(p.table.loaded))
        if p.writer is not None:
            s = p.writer.stats()
            yield one(gauge, "log_queue_depth", "Log records waiting for the writer thread.", s["pending"])
            yield one(counter, "log_records_written", "Log records committed to the store.", s["written"])
            yield one(counter, "log_commits", "Log store transactions (one per group commit).", s["commits"])
            yield one(counter, "log_writer_failures", "Records the log writer thread failed to commit.", s["failures"])
