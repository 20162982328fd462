"""Zero-downtime deployment of registered specialists into the running gateway.

deploy(task, version): validate the registry version (manifest hashes, base fingerprint, rank, target modules) ->
load it into vLLM under its versioned name (`code@3`), on every replica that holds the version it replaces -> a
one-token smoke generation on each -> switch the routing table atomically -> record the `production` alias ->
drain in-flight requests on the old name -> unload it from every replica. A failure at any step before the switch
unloads the new version and leaves the old one serving; a failure to record the alias switches the route back.
Deploys of one task are serialized (one asyncio.Lock per task, plus the registry's file lock across processes);
different tasks deploy concurrently. Rollback = deploy the previous production version. Retire = route the task
to the base model and unload its adapter. On start every production adapter is restored (a replica that restarts
gets its own adapters back in `router.replicas`); a registry generation counter is polled so an alias moved by
another gateway is picked up.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from pathlib import Path

from adapters.registry import Registry
from adapters.validation import validate_names
from core.errors import FailedPrecondition, NotFound, ResourceExhausted, RouterError, quoted
from router.config import DeployConfig
from router.lora import AdapterLoader, AdapterPolicy
from router.metrics import NO_METRICS
from router.routing import Canary

log = logging.getLogger("router.deploy")


class Deployer:
    """Deploys, rolls back and retires registry versions through `loader` (the backend and the routing table)."""

    def __init__(self, registry: Registry, loader: AdapterLoader, policy: AdapterPolicy, cfg: DeployConfig):
        self.registry = registry
        self.loader = loader
        self.policy = policy
        self.table = loader.table
        self.cfg = cfg
        self._bg: set[asyncio.Task] = set()
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._poll_task: asyncio.Task | None = None
        self._generation = -1
        self.metrics = NO_METRICS
        self._pinned: set[str] = set()  # versions loaded on demand for pinned requests
        self._canary_retry: set[str] = set()  # tasks whose canary could not be applied yet
        self._pin_lock = asyncio.Lock()

    @contextlib.contextmanager
    def _observed(self, action: str, task: str):
        """Duration and result of one operation, for `specialist_router_deploy_duration_seconds`."""
        t0, result = time.perf_counter(), "error"
        try:
            yield
            result = "ok"
        finally:
            self.metrics.deploy_done(action, task, result, time.perf_counter() - t0)

    # -------------------------------------------------------------------------- helpers
    async def _io(self, fn, *args, **kw):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: fn(*args, **kw))

    async def _validate(self, av) -> None:
        await self.policy.validate(str(av.path), manifest=av.manifest)

    async def _smoke(self, name: str) -> None:
        await self.loader.backend.smoke(name, self.cfg.smoke_timeout_s)  # on every replica that holds it

    def _drain_then_unload(self, name: str) -> None:
        async def go():
            ok = await self.table.drain(name, self.cfg.drain_timeout_s)
            if not ok:
                log.warning("adapter %s still has requests after %.0f s; unloading anyway", name, self.cfg.drain_timeout_s)
            if self.table.in_use(name):
                return  # routed again meanwhile (a quick rollback, a promoted canary): keep it
            try:
                await self.loader.unload(name)
            except RouterError as exc:
                log.warning("unload of %s failed: %s", name, exc)
        t = asyncio.get_running_loop().create_task(go())
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    # ----------------------------------------------------------------------- operations
    async def deploy(self, task: str, version: str | None = None, *, reason: str = "deploy") -> dict:
        validate_names(task, version)
        async with self._locks[task]:
            with self._observed(reason, task):
                return await self._deploy_locked(task, version, reason)

    async def _deploy_locked(self, task: str, version: str | None, reason: str) -> dict:
        t0 = time.perf_counter()
        if version:
            av = await self._io(self.registry.get, task, version)
        else:
            av = await self._io(self.registry.candidate, task)
            if av is None:
                raise FailedPrecondition(f"task {task!r} has no candidate version: pass a version, or promote one "
                                         f"with `specialist-router adapters promote {task} VERSION --alias candidate`")
        old = self.table.routes.get(task, "")
        prev = self.table.loaded.get(old)
        if old == av.name:
            return dict(task=task, version=av.version, adapter=av.name, previous_version=av.version, swap_ms=0.0)
        await self._validate(av)
        have = self.table.loaded.get(av.name)
        # loaded by this deploy (also when it replaced a same-named adapter from another folder)
        newly_loaded = have is None or Path(have.path).resolve() != Path(av.path).resolve()
        # onto every replica that holds the version it replaces, so the placement (and capacity) carries over
        await self.loader.load_registered(av.name, str(av.path), task=task, version=av.version, like=old)
        try:
            await self._smoke(av.name)
            self.table.set_route(task, av.name)  # the switch: new requests go to the new version
            try:
                await self._io(self.registry.set_alias, task, "production", av.version, reason=reason)
            except Exception:
                self.table.set_route(task, old or None)
                raise
        except BaseException:
            if newly_loaded:
                with contextlib.suppress(Exception):
                    await self.loader.unload(av.name)
            raise
        swap_ms = (time.perf_counter() - t0) * 1000
        self._generation = await self._io(self.registry.generation)
        if old:
            self._drain_then_unload(old)
        log.info("deployed %s (was %s) in %.0f ms", av.name, old or "base", swap_ms)
        return dict(task=task, version=av.version, adapter=av.name,
                    previous_version=prev.version if prev else "", swap_ms=swap_ms)

    async def rollback(self, task: str) -> dict:
        validate_names(task, None)
        prev = await self._io(self.registry.previous_production, task)
        if prev is None:
            raise FailedPrecondition(f"task {task!r} has no previous production version to roll back to")
        r = await self.deploy(task, prev.version, reason="rollback")
        return dict(task=task, version=r["version"], adapter=r["adapter"])

    async def retire(self, task: str) -> dict:
        validate_names(task, None)
        async with self._locks[task]:
            with self._observed("retire", task):
                return await self._retire_locked(task)

    async def _retire_locked(self, task: str) -> dict:
        old = self.table.routes.get(task, "")
        prod = await self._io(self.registry.production, task)
        if not old and prod is None:
            raise NotFound(f"task {task!r} has no deployed specialist to retire")
        self.table.set_route(task, None)
        if prod is not None:
            await self._io(self.registry.set_alias, task, "production", None, reason="retire")
        self._generation = await self._io(self.registry.generation)
        if old:
            self._drain_then_unload(old)
        return dict(task=task, previous_version=prod.version if prod else "")

    async def restore(self) -> None:
        """Load and route every task's production adapter (gateway start)."""
        tasks = await self._io(self.registry.tasks)
        for task in tasks:
            prod = await self._io(self.registry.production, task)
            if prod is None:
                continue
            try:
                await self._validate(prod)
                await self.loader.load_registered(prod.name, str(prod.path), task=task, version=prod.version)
                self.table.set_route(task, prod.name)
                log.info("restored %s", prod.name)
            except Exception as exc:
                log.error("could not restore production adapter %s: %s", prod.name, exc)
        for task in tasks:
            await self.sync_canary(task)
        self._generation = await self._io(self.registry.generation)

    async def sync_canary(self, task: str) -> None:
        """Apply the registry's canary state of `task`: load and smoke-test the canary version, then split; when the
        canary ended, stop splitting and unload its adapter (kept when it was promoted to production)."""
        try:
            state = await self._io(self.registry.canary, task)
            have = self.table.canaries.get(task)
            if state is None:
                if have is not None:
                    self.table.set_canary(task, None)
                    log.info("canary %s of %s ended", have.adapter, task)
                    self._drain_then_unload(have.adapter)
                return
            av = await self._io(self.registry.get, task, state["version"])
            want = Canary(av.name, float(state["share"]))
            if have == want:
                return
            if have is None or have.adapter != av.name:
                await self._validate(av)
                await self.loader.load_registered(av.name, str(av.path), task=task, version=av.version)
                await self._smoke(av.name)
            self.table.set_canary(task, want)
            log.info("canary %s takes %.0f%% of %s's routed traffic", av.name, 100 * want.share, task)
            if have is not None and have.adapter != av.name:
                self._drain_then_unload(have.adapter)
        except Exception as exc:  # noqa: BLE001 - a canary that cannot start leaves production serving everything
            self._canary_retry.add(task)  # tried again at the next registry poll
            log.error("canary of task %s could not be applied (retrying at the next poll): %s", task, exc)
        else:
            self._canary_retry.discard(task)

    async def reconcile(self) -> None:
        """Follow alias moves made by another process/replica."""
        for task in await self._io(self.registry.tasks):
            prod = await self._io(self.registry.production, task)
            routed = self.table.routes.get(task, "")
            want = prod.name if prod else ""
            if want == routed:
                continue
            try:
                if prod is None:
                    await self.retire(task)
                else:
                    await self.deploy(task, prod.version, reason="sync")
            except Exception as exc:
                log.error("sync of task %s to %s failed: %s", task, want or "base", exc)
        for task in await self._io(self.registry.tasks):
            await self.sync_canary(task)

    def start_polling(self) -> asyncio.Task:
        interval_s = self.cfg.registry_poll_s

        async def loop():
            while True:
                await asyncio.sleep(interval_s)
                try:
                    g = await self._io(self.registry.generation)
                    if g != self._generation:
                        self._generation = g
                        await self.reconcile()
                    for task in list(self._canary_retry):
                        await self.sync_canary(task)
                    await self.unload_idle_pinned()
                except Exception as exc:
                    log.error("registry poll failed: %s", exc)

        self._poll_task = asyncio.create_task(loop(), name="registry-poll")
        return self._poll_task

    # ----------------------------------------------------------------------- pinned versions
    async def load_pinned(self, name: str) -> None:
        """A request pinned to `task@version` that is not loaded: load that registry version on demand (validated
        like a deploy), within `deploy.pinned_max_loaded`; an unknown version stays NOT_FOUND."""
        task, _, version = name.rpartition("@")
        if not task or not version.isdigit():
            return  # not a registry name: explicit_adapter reports NOT_FOUND with the loaded names
        try:
            validate_names(task, version)
        except RouterError:
            return
        if self.cfg.pinned_max_loaded == 0:
            raise FailedPrecondition(f"{name} is not loaded and this gateway loads no pinned versions on demand "
                                     "(deploy.pinned_max_loaded=0): deploy it, or load it with `adapters load`")
        async with self._pin_lock:
            if name in self.table.loaded:
                return
            try:
                av = await self._io(self.registry.get, task, version)
            except NotFound as exc:
                raise NotFound(f"adapter {quoted(name)} is not loaded, and the registry has no such version to load "
                               f"on demand ({exc}); `specialist-router adapters list` shows the registered "
                               "versions") from None
            mine = [n for n in self._pinned if n in self.table.loaded and not self.table.in_use(n)]
            if len(mine) >= self.cfg.pinned_max_loaded:
                idle = sorted((self.table.loaded[n] for n in mine if self.table.loaded[n].in_flight == 0),
                              key=lambda a: a.last_used)
                if not idle:
                    raise ResourceExhausted(f"{name} is not loaded and all {self.cfg.pinned_max_loaded} slots for "
                                            "pinned versions are busy: retry shortly, or pin the task's production "
                                            "version")
                await self.loader.unload(idle[0].name)
                self._pinned.discard(idle[0].name)
            await self._validate(av)
            await self.loader.load_registered(av.name, str(av.path), task=task, version=av.version)
            self._pinned.add(av.name)
            log.info("loaded pinned version %s on demand", av.name)

    async def unload_idle_pinned(self) -> None:
        """Unload versions loaded on demand that nobody used for `deploy.pinned_idle_s`."""
        now = time.monotonic()
        for name in list(self._pinned):
            a = self.table.loaded.get(name)
            if a is None:
                self._pinned.discard(name)
            elif self.table.in_use(name):
                self._pinned.discard(name)  # deployed or canaried meanwhile: no longer on demand
            elif a.in_flight == 0 and now - a.last_used >= self.cfg.pinned_idle_s:
                async with self._pin_lock:
                    try:
                        await self.loader.unload(name)
                        self._pinned.discard(name)
                        log.info("unloaded pinned version %s (idle %.0f s)", name, now - a.last_used)
                    except RouterError as exc:
                        log.warning("unload of idle pinned version %s failed: %s", name, exc)

    async def stop(self) -> None:
        """Stop following the registry; wait for pending drain-then-unload tasks."""
        if self._poll_task is not None:
            self._poll_task.cancel()
        if self._bg:
            await asyncio.gather(*list(self._bg), return_exceptions=True)
