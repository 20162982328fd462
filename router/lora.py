"""Which LoRA adapters the backend holds: load and unload them one at a time, and put them back after a restart.

The routing table's `loaded` map is the gateway's view of the backend; it is replaced as a whole, so a request
sees the old or the new map, never a half-updated one.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from core.errors import FailedPrecondition, InvalidArgument, NotFound, RouterError
from router.backend import VLLMBackend
from router.routing import LoadedAdapter, RoutingTable

log = logging.getLogger("router.gateway")


class AdapterLoader:
    def __init__(self, backend: VLLMBackend, table: RoutingTable):
        self.backend = backend
        self.table = table
        self._lock = asyncio.Lock()

    async def load(self, name: str, path: str, *, task: str = "", version: str = "") -> LoadedAdapter:
        """Load `path` into the backend as `name` (a no-op when that name is loaded already)."""
        async with self._lock:
            if not Path(path).is_dir():
                raise InvalidArgument(f"adapter path {path} is not a folder on the gateway host: pass a PEFT folder")
            resolved = str(Path(path).resolve())
            have = self.table.loaded.get(name)
            if have is not None:
                if have.path and Path(have.path).resolve() != Path(resolved):
                    raise FailedPrecondition(f"adapter name {name!r} is already loaded from another folder: unload it "
                                             "first, or load this folder under another name")
                if (task, version) != (have.task, have.version) and (task or version):
                    # found in the backend at start (external mode) without its registry identity: record it now
                    have = LoadedAdapter(name=name, path=resolved, task=task, version=version,
                                         in_flight=have.in_flight, idle=have.idle)
                    self.table.loaded = {**self.table.loaded, name: have}
                return have
            try:
                await self.backend.load_lora(name, resolved)
            except FailedPrecondition as exc:
                # another gateway replica sharing this backend loaded the same versioned name: same adapter
                if "already" not in str(exc):
                    raise
            a = LoadedAdapter(name=name, path=resolved, task=task, version=version)
            self.table.loaded = {**self.table.loaded, name: a}
            return a

    async def load_registered(self, name: str, path: str, *, task: str, version: str) -> LoadedAdapter:
        """Load a registry version. A same-named adapter the backend holds from another folder (loaded by hand,
        by another registry, or squatted) is not this version: unless requests are routed to it, it is unloaded
        first, so the name serves the registry's files."""
        have = self.table.loaded.get(name)
        if have is not None and have.path and Path(have.path).resolve() != Path(path).resolve():
            log.warning("adapter %s is loaded from %s, not the registry's %s: replacing it", name, have.path, path)
            await self.unload(name)
        return await self.load(name, path, task=task, version=version)

    async def unload(self, name: str) -> None:
        async with self._lock:
            if name not in self.table.loaded:
                raise self.not_loaded(name)
            if name in self.table.routes.values():
                tasks = [t for t, a in self.table.routes.items() if a == name]
                raise FailedPrecondition(f"adapter {name!r} is routed for task(s) {tasks}: retire or redeploy first")
            await self.backend.unload_lora(name)
            loaded = dict(self.table.loaded)
            loaded.pop(name, None)
            self.table.loaded = loaded

    async def reload_all(self) -> None:
        """After a managed vLLM restart: every adapter the gateway had loaded is loaded again."""
        for a in list(self.table.loaded.values()):
            try:
                await self.backend.load_lora(a.name, a.path)
            except RouterError as exc:
                log.error("could not reload adapter %s after backend restart: %s", a.name, exc)
        log.info("re-loaded %d adapter(s) into the restarted backend", len(self.table.loaded))

    def not_loaded(self, name: str) -> NotFound:
        return NotFound(f"adapter {name!r} is not loaded; loaded: {sorted(self.table.loaded) or 'none'}")
