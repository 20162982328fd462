"""Where the project keeps its data. One root, everything else under it.

The root is `$SPECIALIST_ROUTER_HOME` if set, else `<user cache dir>/specialist-router`
(`$XDG_CACHE_HOME` or `~/.cache`). Read lazily, never at import time.
"""
from __future__ import annotations

from pathlib import Path

from core import envs


def data_dir() -> Path:
    """Root data dir (created on demand by the code that writes into it)."""
    env = envs.get("SPECIALIST_ROUTER_HOME")
    if env:
        return Path(env).expanduser().resolve()
    cache = envs.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(cache) / "specialist-router").resolve()


def models_dir() -> Path:
    """Prepared base models: `<data>/models/<name>/`."""
    return data_dir() / "models"


def classifier_dir() -> Path:
    """Classifier artifacts: `<data>/classifier/<version>/` and a `current` pointer."""
    return data_dir() / "classifier"


def registry_dir() -> Path:
    """Adapter registry root: `<data>/adapters/<task>/<version>/`."""
    return data_dir() / "adapters"


def local_adapters_dir() -> Path:
    """Adapters made by hand (not registered) that `LoadAdapter` may load: `<data>/local-adapters/<name>/`."""
    return data_dir() / "local-adapters"


def logs_db() -> Path:
    """Conversation log store (SQLite, WAL)."""
    return data_dir() / "logs" / "router.sqlite3"


def runs_dir() -> Path:
    """Training runs: `<data>/runs/<run-id>/`."""
    return data_dir() / "runs"
