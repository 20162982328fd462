"""The adapter registry: immutable, numbered versions of each task's LoRA specialist, plus aliases.

Layout on disk (the contract; other processes read it directly):

    <root>/GENERATION                 integer bumped on every alias change (cheap to poll)
    <root>/.lock                      flock for GENERATION
    <root>/<task>/.lock               flock: register and alias moves of one task serialize
    <root>/<task>/aliases.json        {"production": "2", "candidate": "3"}
    <root>/<task>/canary.json         the live canary, if any: {"version", "share", "production", "started_at",
                                      "reason"}; every gateway replica reads it and applies the same split
    <root>/<task>/history.jsonl       one JSON line per alias move (time, alias, from, to, actor, reason) and per
                                      canary start/end (alias "canary", with the outcome and its evidence)
    <root>/<task>/<version>/          PEFT folder files + manifest.json (sha256 of every file)

Crash safety: a version is copied into `<root>/<task>/.tmp-*` and renamed into place, so a half-written
version is never visible; aliases.json and GENERATION are written to a temporary file, fsynced and
`os.replace`d, so a crash mid-switch leaves the old alias. Readers take no lock. What a crashed writer left
in a task folder (`.tmp-*`, `.*.tmp`) is removed by the next register or alias move of that task.

Long module: the registry's whole on-disk contract (versions, aliases, canary, history, generation)
is written in this one module, under one lock discipline.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapters.validation import (
    CONFIG_FILE,
    MANIFEST_FILE,
    check_task_name,
    check_version,
    default_servable_modules,
    safe_join,
    validate_adapter,
)
from core import paths
from core.errors import FailedPrecondition, InvalidArgument, NotFound
from core.files import atomic_write_text, file_lock, is_leftover_tmp, publish_dir, sha256_file

ALIASES = ("production", "candidate")
ALIASES_FILE = "aliases.json"
HISTORY_FILE = "history.jsonl"
CANARY_FILE = "canary.json"
CANARY_OUTCOMES = ("promoted", "rolled_back", "cancelled")
GENERATION_FILE = "GENERATION"
LOCK_FILE = ".lock"
MANIFEST_SCHEMA = 1


@dataclass(frozen=True)
class AdapterVersion:
    """One registered version. `name` (`task@version`) is what vLLM and the router call it."""

    task: str
    version: str
    path: Path
    manifest: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.task}@{self.version}"

    @property
    def rank(self) -> int:
        return int(self.manifest.get("rank") or 0)

    @property
    def target_modules(self) -> list[str]:
        tm = self.manifest.get("target_modules") or []
        return [tm] if isinstance(tm, str) else list(tm)

    @property
    def base_fingerprint(self) -> str:
        return self.manifest.get("base_fingerprint", "")

    def validate(self, **kwargs) -> dict:
        """Re-check this version's files against its manifest (and the server's limits in kwargs)."""
        return validate_adapter(self.path, manifest=self.manifest, **kwargs)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _sweep_leftovers(task_dir: Path) -> None:
    """Remove what a process that crashed mid-write left in a task folder: `.tmp-*` version copies and
    `.<file>.*.tmp` files of atomic_write_text. Call only under the task's lock: every writer of these holds it,
    so any that exist belong to a dead process."""
    if not task_dir.is_dir():
        return
    for p in task_dir.iterdir():
        if p.name.startswith(".tmp-") and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif is_leftover_tmp(p.name) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()


class Registry:
    """Adapter registry rooted at `root` (default `core.paths.registry_dir()`). Safe across processes."""

    def __init__(self, root: str | os.PathLike | None = None):
        if root is None:
            root = paths.registry_dir()
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ------------------------------------------------------------------------------------------ paths
    def _task_dir(self, task: str) -> Path:
        return safe_join(self.root, check_task_name(task))

    def _version_dir(self, task: str, version: str | int) -> Path:
        return safe_join(self.root, check_task_name(task), check_version(version))

    def lock(self, task: str):
        """Exclusive cross-process lock on one task (register and alias moves take it)."""
        return file_lock(self._task_dir(task) / LOCK_FILE)

    # ------------------------------------------------------------------------------------------ reads
    def tasks(self) -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and not p.is_symlink():
                try:
                    check_task_name(p.name)
                except InvalidArgument:
                    continue
                if (p / ALIASES_FILE).exists() or any(self._version_names(p)):
                    out.append(p.name)
        return out

    @staticmethod
    def _version_names(task_dir: Path) -> list[str]:
        if not task_dir.is_dir():
            return []
        names = [p.name for p in task_dir.iterdir()
                 if p.is_dir() and p.name.isdigit() and not p.name.startswith("0") and (p / MANIFEST_FILE).is_file()]
        return sorted(names, key=int)

    def get(self, task: str, version: str | int) -> AdapterVersion:
        vdir = self._version_dir(task, version)
        mpath = vdir / MANIFEST_FILE
        if not mpath.is_file():
            known = self._version_names(self._task_dir(task))
            hint = f"known versions: {', '.join(known)}" if known else \
                f"task {task!r} has no versions; register one with `specialist-router adapters register {task} DIR`"
            raise NotFound(f"adapter {task}@{check_version(version)} is not in the registry {self.root} ({hint})")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise FailedPrecondition(f"{mpath} is corrupt ({exc}); register the adapter again") from exc
        return AdapterVersion(task=task, version=check_version(version), path=vdir, manifest=manifest)

    def versions(self, task: str) -> list[AdapterVersion]:
        return [self.get(task, v) for v in self._version_names(self._task_dir(task))]

    def aliases(self, task: str) -> dict[str, str | None]:
        """{"production": version|None, "candidate": version|None}."""
        p = self._task_dir(task) / ALIASES_FILE
        data = {}
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError as exc:
                raise FailedPrecondition(f"{p} is corrupt ({exc}); restore it from {HISTORY_FILE}") from exc
        return {a: (str(data[a]) if data.get(a) is not None else None) for a in ALIASES}

    def alias(self, task: str, alias: str) -> AdapterVersion | None:
        self._check_alias(alias)
        v = self.aliases(task)[alias]
        return self.get(task, v) if v is not None else None

    def production(self, task: str) -> AdapterVersion | None:
        return self.alias(task, "production")

    def candidate(self, task: str) -> AdapterVersion | None:
        return self.alias(task, "candidate")

    def history(self, task: str) -> list[dict]:
        p = self._task_dir(task) / HISTORY_FILE
        if not p.is_file():
            return []
        out = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if line:
                with contextlib.suppress(json.JSONDecodeError):  # a torn last line after a crash
                    out.append(json.loads(line))
        return out

    def generation(self) -> int:
        """Counter bumped on every alias change in any task; poll it to notice deploys from other processes."""
        try:
            return int((self.root / GENERATION_FILE).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def previous_production(self, task: str) -> AdapterVersion | None:
        """The version a rollback returns to, or None.

        Production moves are replayed as a stack: a move back to the version just below the top pops
        (that was a rollback), any other move pushes. So v1 -> v2 -> v3, rollback -> v2, rollback -> v1;
        after a retire (production -> none) the rollback target is the retired version.
        """
        stack: list[str | None] = []
        for entry in self.history(task):
            if entry.get("alias") != "production":
                continue
            to = entry.get("to")
            if not stack and entry.get("from") is not None:
                stack.append(entry["from"])
            if len(stack) >= 2 and stack[-2] == to:
                stack.pop()
            else:
                stack.append(to)
        current = self.aliases(task)["production"]
        if not stack or stack[-1] != current:
            stack.append(current)  # history and aliases disagree (edited by hand): trust aliases
        for v in reversed(stack[:-1]):
            if v is not None and v != current:
                with contextlib.suppress(NotFound):
                    return self.get(task, v)
                return None
        return None

    # ----------------------------------------------------------------------------------------- writes
    def register(self, task: str, peft_dir, *, base_model_id: str, base_fingerprint: str,
                 data_fingerprint: str = "", metrics: dict | None = None, parent: str | int | None = None,
                 max_lora_rank: int | None = None, servable_modules=None, extra: dict | None = None,
                 base_shapes: dict | None = None) -> AdapterVersion:
        """Validate `peft_dir` and copy it in as the task's next version; return it.

        base_model_id / base_fingerprint: the base model the adapter was trained on
        (`basemodel.fingerprint(model_dir)`); deploys refuse the version on any other base weights.
        parent: the version this one was trained from or is meant to replace (recorded only).
        max_lora_rank / servable_modules: optional early checks against the serving engine's limits.
        base_shapes: the base's weight shapes (`adapters.validation.base_weight_shapes`): every LoRA factor must
            fit them, so an adapter for another base is refused at register, not at deploy.
        extra: more manifest fields (e.g. training run id); cannot override the ones above.
        """
        check_task_name(task)
        if not base_fingerprint or not str(base_fingerprint).startswith("sha256:"):
            raise InvalidArgument(f"base_fingerprint {base_fingerprint!r} is not a 'sha256:...' fingerprint; "
                                  "compute it with basemodel.fingerprint(base_model_dir)")
        if metrics is not None and not isinstance(metrics, dict):
            raise InvalidArgument(f"metrics must be a JSON object (dict), got {type(metrics).__name__}")
        src = Path(peft_dir)
        if servable_modules is None:
            servable_modules = default_servable_modules(base_model_id)
        # The caller vouches for the base (by fingerprint); names are not compared here.
        info = validate_adapter(src, max_lora_rank=max_lora_rank, servable_modules=servable_modules,
                                check_hashes=False, manifest={}, base_shapes=base_shapes)
        cfg = json.loads((src / CONFIG_FILE).read_text())
        parent_v = check_version(parent) if parent not in (None, "") else None
        task_dir = self._task_dir(task)
        task_dir.mkdir(parents=True, exist_ok=True)
        with self.lock(task):
            _sweep_leftovers(task_dir)
            if parent_v is not None:
                self.get(task, parent_v)  # NotFound if the parent does not exist
            existing = self._version_names(task_dir)
            leftovers = [p for p in task_dir.iterdir() if p.is_dir() and p.name.isdigit()]
            version = str(max([0, *(int(p.name) for p in leftovers), *(int(v) for v in existing)]) + 1)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=task_dir))
            try:
                files = {}
                for p in sorted(src.iterdir()):
                    if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith("."):
                        shutil.copyfile(p, tmp / p.name)
                        files[p.name] = sha256_file(tmp / p.name)
                if files.get("adapter_model.safetensors") != info["files"].get("adapter_model.safetensors"):
                    raise FailedPrecondition(f"{src} changed while it was being registered; register it again")
                manifest = {
                    **(extra or {}),
                    "schema": MANIFEST_SCHEMA,
                    "task": task,
                    "version": version,
                    "name": f"{task}@{version}",
                    "base_model_id": base_model_id,
                    "base_fingerprint": base_fingerprint,
                    "peft_type": info["peft_type"],
                    "rank": info["rank"],
                    "alpha": info["alpha"],
                    "target_modules": info["target_modules"],
                    "modules": info["modules"],
                    "adapter_base_model_name_or_path": cfg.get("base_model_name_or_path") or "",
                    "data_fingerprint": data_fingerprint,
                    "metrics": dict(metrics or {}),
                    "parent": parent_v,
                    "source": str(src.resolve()),
                    "created_at": _now(),
                    "created_by": _actor(),
                    "files": files,
                }
                (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
                os.chmod(tmp, 0o755)
                publish_dir(tmp, task_dir / version)  # atomic: the version appears complete or not at all
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return self.get(task, version)

    def set_alias(self, task: str, alias: str, version: str | int | None, reason: str = "",
                  *, actor: str | None = None) -> AdapterVersion | None:
        """Point `alias` at `version` (None clears it), atomically; record the move; bump the generation.

        Returns the version now aliased (None when cleared). Moving an alias to where it already points
        records nothing.
        """
        self._check_alias(alias)
        target = self.get(task, version) if version is not None else None
        with self.lock(task):
            _sweep_leftovers(self._task_dir(task))
            if self._move_alias(task, alias, target.version if target else None, reason, actor):
                self._bump_generation()
        return target

    def _move_alias(self, task: str, alias: str, new: str | None, reason: str, actor: str | None,
                    **extra) -> bool:
        """(lock held) Write the alias and its history line; False when it already pointed there."""
        aliases = self.aliases(task)
        old = aliases[alias]
        if old == new:
            return False
        aliases[alias] = new
        atomic_write_text(self._task_dir(task) / ALIASES_FILE, json.dumps(aliases, indent=2, sort_keys=True) + "\n")
        self._append_history(task, {"alias": alias, "from": old, "to": new, "reason": reason, **extra}, actor)
        return True

    def _append_history(self, task: str, entry: dict, actor: str | None) -> None:
        entry = {"time": _now(), "actor": actor or _actor(), **entry}
        with open(self._task_dir(task) / HISTORY_FILE, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    # ------------------------------------------------------------------------------------------ canary
    def canary(self, task: str) -> dict | None:
        """The live canary of `task`: {"version", "share", "production", "started_at", "reason"}, or None."""
        p = self._task_dir(task) / CANARY_FILE
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise FailedPrecondition(f"{p} is corrupt ({exc}); end the canary with `specialist-router loop "
                                     f"cancel {task}` or delete the file") from exc
        return data if isinstance(data, dict) and data.get("version") else None

    def start_canary(self, task: str, version: str | int, share: float, *, reason: str = "",
                     actor: str | None = None) -> dict:
        """Send `share` (0 < share <= 1) of the task's routed traffic to `version`; the rest stays on production.
        One canary per task at a time; the version must not be production already."""
        if not 0.0 < float(share) <= 1.0:
            raise InvalidArgument(f"canary share must be within (0, 1], got {share!r}")
        target = self.get(task, version)
        with self.lock(task):
            if self.canary(task) is not None:
                raise FailedPrecondition(f"task {task!r} already has a canary ({self.canary(task)['version']}): end "
                                         "it first")
            prod = self.aliases(task)["production"]
            if prod == target.version:
                raise FailedPrecondition(f"{target.name} is already production: nothing to canary")
            state = {"version": target.version, "share": float(share), "production": prod, "started_at": time.time(),
                     "reason": reason}
            atomic_write_text(self._task_dir(task) / CANARY_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
            self._append_history(task, {"alias": "canary", "from": None, "to": target.version, "share": float(share),
                                        "production": prod, "reason": reason}, actor)
            self._bump_generation()
        return state

    def end_canary(self, task: str, outcome: str, *, reason: str = "", evidence: dict | None = None,
                   actor: str | None = None) -> dict:
        """End the live canary: `promoted` (its version becomes production, in the same step), `rolled_back` or
        `cancelled` (production unchanged). The decision and its evidence go into the history."""
        if outcome not in CANARY_OUTCOMES:
            raise InvalidArgument(f"canary outcome must be one of {', '.join(CANARY_OUTCOMES)}, got {outcome!r}")
        with self.lock(task):
            state = self.canary(task)
            if state is None:
                raise FailedPrecondition(f"task {task!r} has no live canary")
            ev = dict(evidence or {})
            self._append_history(task, {"alias": "canary", "from": state["version"], "to": None, "outcome": outcome,
                                        "reason": reason, "evidence": ev}, actor)
            if outcome == "promoted":
                self._move_alias(task, "production", state["version"], f"canary promoted: {reason}", actor)
            (self._task_dir(task) / CANARY_FILE).unlink()
            self._bump_generation()
        return {**state, "outcome": outcome}

    def _bump_generation(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock(self.root / LOCK_FILE):
            gen = self.generation() + 1
            atomic_write_text(self.root / GENERATION_FILE, f"{gen}\n")
        return gen

    @staticmethod
    def _check_alias(alias: str) -> None:
        if alias not in ALIASES:
            raise InvalidArgument(f"unknown alias {alias!r}: use one of {', '.join(ALIASES)}")


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = str(os.getuid())
    return f"{user}@{os.uname().nodename}:{os.getpid()}"
