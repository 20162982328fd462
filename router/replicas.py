"""Several vLLM replicas behind one gateway, with adapter affinity. Long module: the placement policy, the slot
bookkeeping and the fail-over loop share one replica state and are easier to check side by side.

`ReplicaSet` has the backend client's interface (`chat_stream`, `load_lora`, `unload_lora`, `health`, `stats`), so
the pipeline, the loader and the deployer drive one replica or many the same way (the embedded default is a set of
one managed replica).

- **What is loaded where.** The gateway's routing table says which adapters it serves (`known` here: name -> folder);
  each `Replica` holds a subset (`held`). An adapter is loaded onto a replica when a request needs it there, and a
  replica holds at most `backend.adapter_slots` adapters (0: no limit; vLLM's --max-cpu-loras cache pages them).
- **Affinity** (`backend.balance: affinity`): a request for an adapter goes to the least loaded replica (requests in
  flight) that holds it; when none does, the least loaded replica with a free slot loads it (ties: fewer adapters
  held, then a hash of the adapter's name, so gateways sharing replicas tend to agree); with no free slot anywhere the
  least recently used idle adapter of the least loaded replica is evicted. When every holder is `affinity_spill`
  requests busier than a replica that could take it, the adapter is loaded there too (a hot specialist spreads).
  `round_robin` (for comparison, `bench/replica_bench.py`) sends request i to replica i mod n and loads what is missing.
- **Faults.** A replica whose connection fails, or whose /health stops answering, is taken out at once; a request
  that had not received its first token goes to another replica (UNAVAILABLE only when none can serve); a replica
  that lost an adapter (404 from vLLM: restarted behind the gateway's back, or unloaded by another gateway) gets it
  loaded again and the request is retried. A replica that comes back gets its adapters loaded again before it takes
  requests (`restore`).
- **Deploys** load a new version onto every replica that holds the version it replaces (one replica when none does),
  smoke-test it on each, and unload the old version from every replica (`load_lora(..., like=old)`, `smoke`).
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections import Counter
from typing import AsyncIterator

import aiohttp

from core.errors import FailedPrecondition, NotFound, ResourceExhausted, RouterError, Unavailable, quoted
from router.backend import BackendStats, StreamEvent, VLLMBackend
from router.metrics import NO_METRICS

log = logging.getLogger("router.replicas")

BALANCE = ("affinity", "round_robin")
HEALTH_FAILURES = 2  # consecutive failed /health polls that take a replica out (a refused connection does at once)


class Replica:
    """One vLLM server: its client, its managed process (or None), what it holds and how busy it is."""

    def __init__(self, index: int, backend: VLLMBackend, managed=None):
        self.index = index
        self.name = f"r{index}"
        self.backend = backend
        self.managed = managed
        self.up = False  # answers /health and holds its adapters
        self.restoring = False
        self.held: dict[str, float] = {}  # adapter -> last use (monotonic)
        self.adopted: set[str] = set()  # held when the gateway started (loaded by someone else): no slot, never evicted
        self.loading: dict[str, asyncio.Task] = {}
        self.evicting: set[str] = set()
        self.in_flight = 0
        self.by_adapter: Counter[str] = Counter()
        self.loads = 0
        self.unloads = 0
        self.failovers = 0  # requests moved away from this replica before their first token
        self.health_failures = 0  # consecutive failed /health polls
        self.last_error = ""

    @property
    def url(self) -> str:
        return self.backend.url

    def serving(self) -> bool:
        m = self.managed
        return self.up and not self.restoring and not (m is not None and (m.restarting or not m.alive()))

    def holds(self, name: str) -> bool:
        return name in self.held and name not in self.evicting

    def used_slots(self) -> int:
        return len(self.held) + len(self.loading) - len(self.adopted & self.held.keys())

    def victim(self) -> str | None:
        """The least recently used adapter this gateway loaded with no request on this replica (evictable), or None."""
        idle = [(t, n) for n, t in self.held.items()
                if self.by_adapter[n] == 0 and n not in self.evicting and n not in self.adopted]
        return min(idle)[1] if idle else None

    def describe(self) -> dict:
        return dict(name=self.name, url=self.url, up=self.serving(), in_flight=self.in_flight,
                    adapters=sorted(self.held), loads=self.loads, unloads=self.unloads, failovers=self.failovers,
                    restarts=self.managed.restarts if self.managed is not None else 0, last_error=self.last_error)


def _connection_failure(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError))


def _rank(name: str, replica: Replica) -> int:
    """Rendezvous hash: the same adapter prefers the same replica on every gateway."""
    return int.from_bytes(hashlib.blake2b(f"{name}|{replica.url}".encode(), digest_size=4).digest(), "big")


class ReplicaSet:
    def __init__(self, replicas: list[Replica], *, slots: int = 0, balance: str = "affinity", spill: int = 8,
                 slot_wait_s: float = 30.0, priority: bool = False):
        if not replicas:
            raise ValueError("a ReplicaSet needs at least one replica")
        self.replicas = replicas
        self.slots = slots
        self.balance = balance
        self.spill = spill
        self.slot_wait_s = slot_wait_s
        self.priority = priority  # the replicas run --scheduling-policy priority: smoke tests go first
        self.known: dict[str, str] = {}  # adapters this gateway serves: name -> folder
        self.metrics = NO_METRICS
        self._rr = itertools.count()
        self._wake = asyncio.Event()

    # ---------------------------------------------------------------- the backend client's interface
    @property
    def url(self) -> str:
        return self.replicas[0].url

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def managed(self):
        """The first managed replica's process (the embedded default has exactly one)."""
        return self.replicas[0].managed

    @property
    def stats(self) -> BackendStats:
        s = BackendStats()
        for r in self.replicas:
            s.requests += r.backend.stats.requests
            s.errors += r.backend.stats.errors
            s.last_error = r.backend.stats.last_error or s.last_error
        return s

    def serving(self) -> list[Replica]:
        return [r for r in self.replicas if r.serving()]

    async def health(self) -> bool:
        """True while at least one replica can serve."""
        return bool(self.serving())

    async def close(self) -> None:
        for r in self.replicas:
            for t in r.loading.values():
                t.cancel()
            await r.backend.close()

    def holders(self, name: str) -> list[str]:
        return [r.name for r in self.replicas if name in r.held]

    # -------------------------------------------------------------------------------- health
    def mark_down(self, r: Replica, why: str) -> None:
        if r.up:
            log.error("vLLM replica %s (%s) is DOWN: %s", r.name, r.url, why)
        r.up = False
        r.last_error = why[:300]

    async def check(self, r: Replica) -> None:
        """Poll one replica; one that came back gets its adapters again before it takes requests."""
        m = r.managed
        if m is not None and m.restarting:
            return  # its supervisor restarts it and restores its adapters (the gateway's on_restart)
        if m is not None and not m.alive():
            self.mark_down(r, "the managed vLLM process exited")
            return
        ok = await r.backend.health()
        r.health_failures = 0 if ok else r.health_failures + 1
        if ok and not r.up and not r.restoring:
            await self.restore(r)
        elif r.up and r.health_failures >= HEALTH_FAILURES:  # one slow answer on a busy host is not a dead replica
            self.mark_down(r, f"/health did not answer {r.health_failures} times in a row")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def restore(self, r: Replica) -> None:
        """Load again every adapter the replica held (it restarted, or was unreachable), then take requests."""
        r.restoring = True
        try:
            for name in [n for n in r.held if n not in self.known]:
                r.held.pop(name, None)  # unloaded while the replica was away
            for name in list(r.held):
                try:
                    await self._load_into(r, name, self.known[name])
                except RouterError as exc:
                    r.held.pop(name, None)
                    log.error("replica %s: could not load %s again: %s", r.name, name, exc)
                    if isinstance(exc, Unavailable):
                        return  # down again: the next check retries
            if not r.up:
                log.info("vLLM replica %s (%s) is up with %d adapter(s)", r.name, r.url, len(r.held))
            r.up = True
            self._notify()
        finally:
            r.restoring = False

    def adopt(self, r: Replica, listed: list[dict]) -> None:
        """Adapters an external replica already holds at gateway start (from its /v1/models)."""
        for m in listed:
            if m.get("parent"):
                r.held[m["id"]] = time.monotonic()
                r.adopted.add(m["id"])
                self.known.setdefault(m["id"], str(m.get("root", "")))

    # ------------------------------------------------------------------------------ placement
    def _load(self, r: Replica) -> tuple:
        return (r.in_flight, r.used_slots())

    def _free(self, r: Replica) -> bool:
        return self.slots <= 0 or r.used_slots() < self.slots

    def _can_take(self, r: Replica) -> bool:
        return self._free(r) or r.victim() is not None

    def _choose(self, name: str, cands: list[Replica]) -> Replica | None:
        """The replica for a request for adapter `name` (None: every slot is busy; wait for one)."""
        if self.balance == "round_robin":
            r = cands[next(self._rr) % len(cands)]
            if r.holds(name) or name in r.loading or self._can_take(r):
                return r
        holders = [r for r in cands if r.holds(name)]
        if holders:
            best = min(holders, key=self._load)
            if self.spill > 0:
                others = [r for r in cands if not r.holds(name) and name not in r.loading and self._free(r)]
                if others:
                    o = min(others, key=self._load)
                    if best.in_flight - o.in_flight >= self.spill:
                        return o
            return best
        loading = [r for r in cands if name in r.loading]
        if loading:
            return min(loading, key=self._load)
        free = [r for r in cands if self._free(r)]
        if free:
            return min(free, key=lambda r: (r.in_flight, r.used_slots(), -_rank(name, r)))
        takers = [r for r in cands if r.victim() is not None]
        return min(takers, key=self._load) if takers else None

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    async def _acquire(self, name: str, exclude: list[Replica], deadline: float | None) -> Replica:
        """A serving replica that holds `name` ("" = the base model), counted busy; loads the adapter if needed."""
        wait_until = time.monotonic() + self.slot_wait_s
        if deadline is not None:
            wait_until = min(wait_until, deadline)
        while True:
            cands = [r for r in self.serving() if r not in exclude]
            if not cands:
                raise self.unavailable(exclude)
            if not name:
                if self.balance == "round_robin":
                    r = cands[next(self._rr) % len(cands)]
                else:
                    r = min(cands, key=self._load)
                r.in_flight += 1
                return r
            if name not in self.known:
                raise NotFound(f"adapter {quoted(name)} is not loaded (it was unloaded while the request waited)")
            r = self._choose(name, cands)
            if r is not None and r.holds(name):
                r.in_flight += 1
                r.by_adapter[name] += 1
                r.held[name] = time.monotonic()
                return r
            if r is not None:
                try:
                    await self._ensure(r, name)
                except Unavailable as exc:
                    self.mark_down(r, str(exc))
                    exclude.append(r)
                continue
            # every slot on every replica holds an adapter with requests on it: wait for one to finish
            left = wait_until - time.monotonic()
            if left <= 0:
                raise ResourceExhausted(f"adapter {quoted(name)} needs a free slot and all {self.slots} adapter "
                                        f"slot(s) on each of {len(cands)} replica(s) are busy: retry with backoff, "
                                        "or raise backend.adapter_slots")
            wake = self._wake
            try:
                await asyncio.wait_for(wake.wait(), left)
            except asyncio.TimeoutError:
                pass

    def unavailable(self, tried: list[Replica] | None = None) -> Unavailable:
        n, tried = len(self.replicas), tried or []
        if n == 1:
            return Unavailable("the vLLM backend is down or restarting: retry shortly")
        return Unavailable(f"no vLLM replica can serve the request ({n - len(self.serving())} of {n} down"
                           f"{', ' + str(len(tried)) + ' failed it' if tried else ''}): retry shortly")

    async def _ensure(self, r: Replica, name: str) -> None:
        """Load `name` onto `r` (one load per replica and adapter at a time; others wait for it)."""
        task = r.loading.get(name)
        if task is None:
            victim = None if self._free(r) else r.victim()
            if victim is None and not self._free(r):
                return  # the slot went meanwhile: the caller chooses again
            task = asyncio.get_running_loop().create_task(self._place(r, name, victim))
            r.loading[name] = task
            task.add_done_callback(lambda _t, r=r, n=name: r.loading.pop(n, None))
        await asyncio.shield(task)  # a waiting request that is cancelled does not cancel the load

    async def _place(self, r: Replica, name: str, victim: str | None) -> None:
        if victim is not None:
            r.evicting.add(victim)
            try:
                await self._unload_from(r, victim)
            finally:
                r.evicting.discard(victim)
            log.info("replica %s: evicted %s (least recently used) to load %s", r.name, victim, name)
        await self._load_into(r, name, self.known[name])

    async def _load_into(self, r: Replica, name: str, path: str) -> None:
        try:
            await r.backend.load_lora(name, path)
        except FailedPrecondition as exc:
            if "already" not in str(exc):  # "already loaded": another gateway sharing the replica loaded it
                self.metrics.adapter_loaded("error")
                raise
        except RouterError:
            self.metrics.adapter_loaded("error")
            raise
        r.loads += 1
        self.metrics.adapter_loaded("ok")
        r.held[name] = time.monotonic()

    async def _unload_from(self, r: Replica, name: str) -> None:
        try:
            await r.backend.unload_lora(name)
        except NotFound:
            pass  # not there (restarted): the goal is reached
        except RouterError:
            self.metrics.adapter_unloaded("error")
            raise
        else:
            r.unloads += 1
            self.metrics.adapter_unloaded("ok")
        finally:
            r.held.pop(name, None)
            r.adopted.discard(name)
            self._notify()

    def _release(self, r: Replica, name: str) -> None:
        r.in_flight = max(0, r.in_flight - 1)
        if name:
            r.by_adapter[name] = max(0, r.by_adapter[name] - 1)
            if r.by_adapter[name] == 0:
                self._notify()

    # ------------------------------------------------------------------------------ generation
    async def chat_stream(self, payload: dict, *, timeout_s: float | None = None, adapter: str = "",
                          replica: Replica | None = None) -> AsyncIterator[StreamEvent]:
        """Stream from a replica chosen for `adapter` ("" = base model). Before the first event, a replica that
        fails is taken out and the request goes to another; after it, the error reaches the caller."""
        deadline = time.monotonic() + timeout_s if timeout_s else None
        tried: list[Replica] = []
        reloaded = False
        while True:
            if replica is not None:  # a smoke test of one replica: no choice, no fail-over
                r = replica
                r.in_flight += 1
                if adapter:
                    r.by_adapter[adapter] += 1
            else:
                r = await self._acquire(adapter, tried, deadline)
            started = False
            left = None if deadline is None else max(0.1, deadline - time.monotonic())
            try:
                async for ev in r.backend.chat_stream(payload, timeout_s=left):
                    started = True
                    yield ev
                return
            except NotFound as exc:
                if started or not adapter or reloaded or replica is not None:
                    raise
                # the replica lost the adapter (restarted behind our back, or another gateway unloaded it)
                log.warning("replica %s no longer holds %s (%s): loading it again", r.name, adapter, exc)
                r.held.pop(adapter, None)
                reloaded = True
            except Unavailable as exc:
                if started or replica is not None:
                    raise
                if _connection_failure(exc):
                    self.mark_down(r, str(exc))
                r.failovers += 1
                tried.append(r)
                log.warning("replica %s failed a request before its first token (%s): trying another", r.name, exc)
            finally:
                self._release(r, adapter)

    async def smoke(self, name: str, timeout_s: float) -> None:
        """One greedy token from `name` on every serving replica that holds it."""
        payload = {"model": name, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "temperature": 0}
        if self.priority:
            payload["priority"] = -100  # ahead of queued user requests (0), so a deploy does not wait behind them
        for r in self.serving():
            if name in r.held:
                async for _ in self.chat_stream(payload, timeout_s=timeout_s, adapter=name, replica=r):
                    pass

    # ------------------------------------------------------------------------------ adapters
    async def load_lora(self, name: str, path: str, *, like: str = "") -> None:
        """Serve `name` from `path`: loaded onto every serving replica that holds `like` (a deploy replaces that
        version), else onto one replica chosen as for a request. A refusal by vLLM is FAILED_PRECONDITION."""
        new = name not in self.known
        self.known[name] = path
        try:
            cands = self.serving()
            if not cands:
                raise self.unavailable([])
            targets = [r for r in cands if like and r.holds(like)]
            if not targets:
                if any(r.holds(name) for r in cands):
                    return
                r = self._choose(name, cands) or min(cands, key=self._load)
                targets = [r]
            for r in targets:
                if not r.holds(name):
                    await self._ensure(r, name)
                    if not r.holds(name):  # its slot went to another adapter meanwhile: evict for this one
                        await self._place(r, name, r.victim())
        except BaseException:
            if new:
                self.known.pop(name, None)
            raise

    async def unload_lora(self, name: str) -> None:
        """Unload `name` from every replica (a replica that is down just forgets it)."""
        errors = []
        for r in self.replicas:
            t = r.loading.get(name)
            if t is not None:
                await asyncio.gather(t, return_exceptions=True)
            if name not in r.held:
                continue
            if not r.serving():
                r.held.pop(name, None)
                continue
            try:
                await self._unload_from(r, name)
            except RouterError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        self.known.pop(name, None)
