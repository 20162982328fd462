"""Open the conversation log store: `open_store(path_or_url)` is the one constructor callers need.

The interface is `convlog.base.LogStore`; the implementations are `convlog.sqlite_store.SQLiteLogStore` (a file
path, the default) and `convlog.postgres_store.PostgresLogStore` (a `postgresql://` URL).
"""
from __future__ import annotations

import os
from pathlib import Path

from convlog.base import LogStore, LogWriteError, TimeLike, feedback_idempotency_key, to_timestamp
from convlog.sqlite_store import SCHEMA_VERSION, SQLiteLogStore
from core.paths import logs_db

__all__ = ["SCHEMA_VERSION", "LogStore", "LogWriteError", "SQLiteLogStore", "TimeLike", "feedback_idempotency_key",
           "is_store_url", "open_store", "redact_url", "to_timestamp"]

_URL_SCHEMES = ("postgresql://", "postgres://")


def is_store_url(value: object) -> bool:
    """True when `value` names a server store (`postgresql://...` / `postgres://...`) rather than a SQLite file."""
    return isinstance(value, str) and value.strip().lower().startswith(_URL_SCHEMES)


def redact_url(value: str) -> str:
    """`value` without its password when it is a store URL (for reports and logs); a file path unchanged."""
    if not is_store_url(value):
        return value
    from convlog.postgres_store import redact  # lazy: psycopg imports in ~0.1-0.2 s (-X importtime); URLs only

    return redact(value)


def open_store(path: str | os.PathLike | None = None, *, read_only: bool | None = None) -> LogStore:
    """Open (creating and migrating if needed) the log store at `path` (default `core.paths.logs_db()`).

    `path` is a SQLite file, or a `postgresql://user[:password]@host[:port]/db[?pool_size=N]` URL for the
    PostgreSQL store (psycopg is imported only then).

    SQLite: `read_only=None` opens read-only when the file exists but is not writable by this process (so
    `logs stats` / `export` work on a read-only copy); writes then raise `LogWriteError`. Raises
    `FailedPrecondition` naming the file when it is corrupt or cannot be opened.
    PostgreSQL: `read_only=None` means read-write; `read_only=True` never writes (not even the schema) and raises
    `FailedPrecondition` when the database holds no log tables. An unreachable server is `Unavailable`, a
    refused login or missing database `FailedPrecondition`, a malformed URL `InvalidArgument`; messages name
    the server without the password.
    """
    if is_store_url(path):
        from convlog.postgres_store import PostgresLogStore  # lazy: psycopg imports in ~0.1-0.2 s; SQLite needs none

        return PostgresLogStore(str(path), read_only=bool(read_only))
    if path is None:
        path = logs_db()
    p = Path(path).expanduser()
    if read_only is None:
        read_only = p.exists() and not os.access(p, os.W_OK)
    return SQLiteLogStore(p, read_only=read_only)
