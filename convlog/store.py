"""Open the conversation log store: `open_store(path)` is the one constructor callers need.

The interface is `convlog.base.LogStore`; the implementation `convlog.sqlite_store.SQLiteLogStore`.
"""
from __future__ import annotations

import os
from pathlib import Path

from convlog.base import LogStore, LogWriteError, TimeLike, feedback_idempotency_key, to_timestamp
from convlog.sqlite_store import SCHEMA_VERSION, SQLiteLogStore
from core.paths import logs_db

__all__ = ["SCHEMA_VERSION", "LogStore", "LogWriteError", "SQLiteLogStore", "TimeLike", "feedback_idempotency_key",
           "open_store", "to_timestamp"]


def open_store(path: str | os.PathLike | None = None, *, read_only: bool | None = None) -> LogStore:
    """Open (creating and migrating if needed) the log store at `path` (default `core.paths.logs_db()`).

    `read_only=None` opens read-only when the file exists but is not writable by this process (so
    `logs stats` / `export` work on a read-only copy); writes then raise `LogWriteError`.
    Raises `FailedPrecondition` naming the file when it is corrupt or cannot be opened.
    """
    if path is None:
        path = logs_db()
    p = Path(path).expanduser()
    if read_only is None:
        read_only = p.exists() and not os.access(p, os.W_OK)
    return SQLiteLogStore(p, read_only=read_only)
