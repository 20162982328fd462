"""gRPC health: SERVING only while a vLLM replica answers and the gateway is not draining.

Names: "" and each router.v1 service follow the backend; `router.v1.ConversationLog` reports the log store
(NOT_SERVING while writes fail; requests are still served, but not logged, and the gateway says so loudly).
"""
from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

log = logging.getLogger("router.gateway")

LOG_HEALTH_SERVICE = "router.v1.ConversationLog"
SERVICES = ("router.v1.RouterService", "router.v1.AdminService")
_SERVING, _NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    def __init__(self):
        self.servicer = health.aio.HealthServicer()
        self.draining = False
        self.backend_up = False

    async def set_backend(self, up: bool) -> None:
        self.backend_up = up
        status = _SERVING if up and not self.draining else _NOT_SERVING
        for name in ("", *SERVICES):
            await self.servicer.set(name, status)

    async def drain(self) -> None:
        self.draining = True
        await self.set_backend(False)

    async def set_logs(self, ok: bool) -> None:
        await self.servicer.set(LOG_HEALTH_SERVICE, _SERVING if ok else _NOT_SERVING)


async def watch(health_: Health, replicas, log_sink, interval_s: float) -> None:
    """Forever: poll every vLLM replica (one that comes back takes requests only once its adapters are loaded
    again, `ReplicaSet.check`) and the log writer, and report both. The gateway is SERVING while one replica is."""
    logs_ok = True
    while True:
        await replicas.check_all()
        up = await replicas.health()
        if up != health_.backend_up:
            log.info("backend %s", "up" if up else "DOWN: no vLLM replica can serve")
        await health_.set_backend(up)
        if log_sink.enabled:
            ok = log_sink.healthy
            if ok != logs_ok:
                if not ok:
                    log.error("CONVERSATION LOG IS FAILING (%d failed writes, last error: %s); requests are still "
                              "served but are not being logged", log_sink.failures, log_sink.last_error)
                logs_ok = ok
            await health_.set_logs(ok)
        await asyncio.sleep(interval_s)
