"""Which LoRA adapters the backend holds, and what may be loaded into it.

`AdapterPolicy`: adapters are loaded only from folders the gateway owns (the registry and the configured
`adapter_roots`, symlinks resolved before the check) and only after the same validation a deploy runs: PEFT
LoRA, base fingerprint (registry versions), rank, servable modules and every factor's shape against the
served base model's weights. `AdapterLoader`: loads and unloads one at a time and refuses a name already loaded
from another folder. The routing table's `loaded` map is the
gateway's view of what it serves; it is replaced as a whole, so a request sees the old or the new map, never a
half-updated one. Which replica holds which adapter is the replica set's business (`router.replicas`).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from adapters.validation import base_weight_shapes, validate_adapter
from basemodel import fingerprint
from core.errors import FailedPrecondition, InvalidArgument, NotFound, RouterError, quoted
from core.files import is_inside
from router.replicas import ReplicaSet
from router.routing import LoadedAdapter, RoutingTable

log = logging.getLogger("router.gateway")


class AdapterPolicy:
    def __init__(self, roots: list[Path], *, model_dir: str | None, served_model: str, max_lora_rank: int):
        self.roots = roots
        self.model_dir = model_dir
        self.served_model = served_model
        self.max_lora_rank = max_lora_rank
        self._base: tuple[str | None, dict | None] | None = None

    def check_path(self, path: str) -> None:
        """Refuse a folder outside the allowed roots, before looking at it (the same answer whether it exists)."""
        if not any(is_inside(path, r) for r in self.roots):
            raise FailedPrecondition(f"adapter path {quoted(path)} is outside the folders this gateway loads "
                                     f"adapters from ({', '.join(str(r) for r in self.roots)}): register it "
                                     "(`specialist-router adapters register`) or copy it into one of them")

    def _base_info(self) -> tuple[str | None, dict | None]:
        """(weights fingerprint, weight shapes) of the served base, when its folder is on this host."""
        if self._base is None:
            fp = shapes = None
            if self.model_dir:
                try:
                    fp, shapes = fingerprint(Path(self.model_dir)), base_weight_shapes(self.model_dir)
                except RouterError as exc:
                    log.warning("cannot read the base model at %s (%s): adapters are checked without it",
                                self.model_dir, exc)
            self._base = (fp, shapes)
        return self._base

    async def validate(self, path: str, manifest: dict | None = None) -> dict:
        """The deploy checks, off the event loop; FAILED_PRECONDITION with the reason when the adapter cannot be
        served."""
        def run() -> dict:
            fp, shapes = self._base_info()
            return validate_adapter(path, base_fingerprint=fp, base_model_id=self.served_model,
                                    max_lora_rank=self.max_lora_rank, manifest=manifest, base_shapes=shapes)
        return await asyncio.get_running_loop().run_in_executor(None, run)


class AdapterLoader:
    """The gateway's adapters: the routing table's `loaded` map (what it serves) over the replica set (which replica
    holds what, `router.replicas`)."""

    def __init__(self, backend: ReplicaSet, table: RoutingTable):
        self.backend = backend
        self.table = table
        self._lock = asyncio.Lock()

    async def load(self, name: str, path: str, *, task: str = "", version: str = "", like: str = "") -> LoadedAdapter:
        """Serve `path` as `name` (a no-op when that name is served already). `like`: the adapter it replaces in a
        deploy; the new one is loaded onto every replica holding that one."""
        async with self._lock:
            if not Path(path).is_dir():
                raise InvalidArgument(f"adapter path {path} is not a folder on the gateway host: pass a PEFT folder")
            resolved = str(Path(path).resolve())
            have = self.table.loaded.get(name)
            if have is not None:
                if have.path and Path(have.path).resolve() != Path(resolved):
                    raise FailedPrecondition(f"adapter name {quoted(name)} is already loaded from another folder: unload it "
                                             "first, or load this folder under another name")
                if (task, version) != (have.task, have.version) and (task or version):
                    # found in the backend at start (external mode) without its registry identity: record it now
                    have = LoadedAdapter(name=name, path=resolved, task=task, version=version,
                                         in_flight=have.in_flight, idle=have.idle)
                    self.table.loaded = {**self.table.loaded, name: have}
                if like:
                    await self.backend.load_lora(name, resolved, like=like)
                return have
            await self.backend.load_lora(name, resolved, like=like)
            a = LoadedAdapter(name=name, path=resolved, task=task, version=version)
            self.table.loaded = {**self.table.loaded, name: a}
            return a

    async def load_registered(self, name: str, path: str, *, task: str, version: str, like: str = "") -> LoadedAdapter:
        """Load a registry version. A same-named adapter the backend holds from another folder (loaded by hand,
        by another registry, or squatted) is not this version: unless requests are routed to it, it is unloaded
        first, so the name serves the registry's files."""
        have = self.table.loaded.get(name)
        if have is not None and have.path and Path(have.path).resolve() != Path(path).resolve():
            log.warning("adapter %s is loaded from %s, not the registry's %s: replacing it", name, have.path, path)
            await self.unload(name)
        return await self.load(name, path, task=task, version=version, like=like)

    async def unload(self, name: str) -> None:
        async with self._lock:
            if name not in self.table.loaded:
                raise self.not_loaded(name)
            tasks = self.table.in_use(name)
            if tasks:
                raise FailedPrecondition(f"adapter {name!r} is routed for task(s) {tasks} (production or canary): "
                                         "retire, redeploy or end the canary first")
            await self.backend.unload_lora(name)
            loaded = dict(self.table.loaded)
            loaded.pop(name, None)
            self.table.loaded = loaded

    def not_loaded(self, name: str) -> NotFound:
        return NotFound(f"adapter {quoted(name)} is not loaded; loaded: {sorted(self.table.loaded) or 'none'}")
