"""The conversation log store's interface: `LogStore`, its errors and time helpers.

Callers (gateway writer, CLI, training) only use `LogStore`; `convlog.sqlite_store.SQLiteLogStore` is the
implementation, and `convlog.store.open_store(path)` the one constructor callers need. Records are never
edited in place: feedback is its own table linked by request id.
"""
from __future__ import annotations

import abc
import datetime as _dt
import hashlib
import json
from typing import Any, Iterable, Iterator

from convlog.schema import Feedback, LogRecord
from core.errors import InvalidArgument


class LogWriteError(RuntimeError):
    """A record (or batch) could not be committed: read-only store, full disk, I/O error.

    Not a client error: the gateway still answers the client and reports the failure (metrics, health).
    """


# ----------------------------------------------------------------------------------------------- time

TimeLike = float | int | str | _dt.date | _dt.datetime | None


def to_timestamp(value: TimeLike, *, end_of_day: bool = False) -> float | None:
    """Unix seconds from a float, a datetime (naive = UTC), a date or an ISO string (`YYYY-MM-DD[THH:MM]`).

    With `end_of_day=True` a bare date means the start of the *next* day, so `until=2024-01-31` includes
    the whole of January 31 (bounds are `since <= created_at < until`).
    """
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        s = value.strip()
        try:
            if len(s) == 10:
                value = _dt.date.fromisoformat(s)
            else:
                value = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(f"invalid date {value!r}: use YYYY-MM-DD or an ISO 8601 timestamp") from None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.timestamp()
    if isinstance(value, _dt.date):
        d = value + _dt.timedelta(days=1) if end_of_day else value
        return _dt.datetime(d.year, d.month, d.day, tzinfo=_dt.timezone.utc).timestamp()
    raise InvalidArgument(f"invalid time value {value!r}")

def record_filter(since: TimeLike, until: TimeLike, *, placeholder: str, quote: str = "",
                  **equal) -> tuple[str, list]:
    """The WHERE clause (with its leading " WHERE ", or "") and parameters of `iter_records`, for either SQL
    dialect: `placeholder` is "?" (SQLite) or "%s" (psycopg); `equal` are column = value filters, None skipped."""
    where, params = [], []
    lo, hi = to_timestamp(since), to_timestamp(until, end_of_day=True)
    if lo is not None:
        where.append(f"created_at >= {placeholder}")
        params.append(lo)
    if hi is not None:
        where.append(f"created_at < {placeholder}")
        params.append(hi)
    for col, val in equal.items():
        if val is not None:
            where.append(f"{quote}{col}{quote} = {placeholder}")
            params.append(val)
    return (" WHERE " + " AND ".join(where) if where else ""), params



def feedback_idempotency_key(rating: int, correction: str, comment: str) -> str:
    """Hash of the feedback's content: a retried SubmitFeedback with the same content is the same row."""
    payload = json.dumps([int(rating), correction or "", comment or ""], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------- interface


class LogStore(abc.ABC):
    """Append-only store of `LogRecord`s plus `Feedback`. Implementations must be thread-safe."""

    path: str

    @abc.abstractmethod
    def write_many(self, records: Iterable[LogRecord]) -> int:
        """Insert all records in ONE transaction; a record whose request_id exists is ignored.

        Returns how many were inserted. Raises `LogWriteError` if nothing could be committed.
        """

    @abc.abstractmethod
    def write_with_feedback(self, records: Iterable[LogRecord],
                            feedback: Iterable[tuple[str, int, str, str]]) -> tuple[int, int]:
        """Insert `records` and `feedback` ((request_id, rating, correction, comment) each) in ONE transaction:
        all of it is committed or none of it (imports). A record whose request_id exists is ignored; feedback
        with the same content on the same record is stored once. Returns (records inserted, feedback inserted).

        InvalidArgument for a rating outside 1..5, `LogWriteError` if the transaction could not be committed
        (feedback naming a request id that is neither stored nor in `records` fails the whole transaction).
        """

    @abc.abstractmethod
    def existing_ids(self, request_ids: Iterable[str]) -> set[str]:
        """The subset of `request_ids` already stored."""

    @abc.abstractmethod
    def get(self, request_id: str) -> LogRecord | None:
        """The record, or None."""

    @abc.abstractmethod
    def iter_records(self, task: str | None = None, since: TimeLike = None, until: TimeLike = None,
                     source: str | None = None, status: str | None = None,
                     client_id: str | None = None) -> Iterator[LogRecord]:
        """Records with `since <= created_at < until`, oldest first, streamed (constant memory)."""

    @abc.abstractmethod
    def add_feedback(self, request_id: str, rating: int, correction: str = "",
                     comment: str = "") -> tuple[Feedback, bool]:
        """Attach feedback; `(feedback, created)`. Same content again -> the existing row, created=False.

        NotFound for an unknown request id, InvalidArgument for a rating outside 1..5.
        """

    @abc.abstractmethod
    def feedback_for(self, request_ids: Iterable[str]) -> dict[str, list[Feedback]]:
        """Feedback per request id (oldest first); ids without feedback are absent."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counts per task / adapter / day / source / status and feedback rates (JSON-serializable)."""

    @abc.abstractmethod
    def delete_older_than(self, days: float) -> int:
        """Retention: delete records (and their feedback) older than `days`; returns records deleted."""

    @abc.abstractmethod
    def count_older_than(self, days: float) -> int:
        """How many records `delete_older_than(days)` would delete now (`logs purge --dry-run`)."""

    @abc.abstractmethod
    def count_client(self, client_id: str) -> int:
        """How many records `delete_client(client_id)` would delete (`logs forget --dry-run`)."""

    @abc.abstractmethod
    def delete_client(self, client_id: str) -> int:
        """Right to be forgotten: delete every record (and feedback) of one client; returns records deleted."""

    @abc.abstractmethod
    def integrity_check(self) -> list[str]:
        """Problems found ([] = healthy)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store; idempotent."""

    def __enter__(self) -> "LogStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
