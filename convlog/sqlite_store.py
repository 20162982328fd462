"""The SQLite log store (the default; one file, WAL).

Long module: one class, the SQLite implementation of every `LogStore` method, and its migrations; they share
one connection and one transaction discipline, which splitting would scatter.

SQLite choices (see docs/logs.md):
- WAL journal: readers (export, stats, training) never block the writer and vice versa.
- `synchronous=FULL`: a commit is fsynced to the WAL before it returns, so an acknowledged record
  survives a power loss / OS crash, not only a process crash (NORMAL would only guarantee the latter).
  The cost is one fsync per transaction; `AsyncLogWriter` amortizes it with group commit.
- `secure_delete=ON`: `purge` and `forget` overwrite deleted content, and `forget` truncates the WAL,
  so forgotten text does not linger in free pages.
- `foreign_keys=ON`: feedback rows are deleted with their record.
- The schema is versioned with `PRAGMA user_version`; `_MIGRATIONS[i]` upgrades version i to i+1.
  Fields added to `LogRecord` later are added as columns automatically (ALTER TABLE ADD COLUMN).

Records are never edited in place: feedback is its own table linked by request id.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from convlog.base import LogStore, LogWriteError, TimeLike, feedback_idempotency_key, record_filter
from convlog.schema import Feedback, LogRecord
from core.errors import FailedPrecondition, InvalidArgument, NotFound

SCHEMA_VERSION = 1
_JSON_FIELDS = {"messages", "sampling"}
_BOOL_FIELDS = {"stream"}
_RECORD_FIELDS = [f for f in dataclasses.fields(LogRecord)]
_RECORD_COLUMNS = [f.name for f in _RECORD_FIELDS]


def _col_type(f: dataclasses.Field) -> str:
    t = str(f.type)
    if f.name in _JSON_FIELDS:
        return "TEXT NOT NULL DEFAULT '[]'" if f.name == "messages" else "TEXT NOT NULL DEFAULT '{}'"
    if t in ("int", "bool"):
        return "INTEGER NOT NULL DEFAULT 0"
    if t == "float":
        return "REAL NOT NULL DEFAULT 0"
    return "TEXT NOT NULL DEFAULT ''"


def _migration_1(conn: sqlite3.Connection) -> None:
    cols = []
    for f in _RECORD_FIELDS:
        if f.name == "request_id":
            cols.append("request_id TEXT PRIMARY KEY")
        elif f.name == "created_at":
            cols.append("created_at REAL NOT NULL")
        else:
            cols.append(f"{f.name} {_col_type(f)}")
    conn.execute(f"CREATE TABLE records ({', '.join(cols)})")
    conn.execute("CREATE INDEX records_created ON records(created_at)")
    conn.execute("CREATE INDEX records_task_created ON records(task, created_at)")
    conn.execute("CREATE INDEX records_client ON records(client_id)")
    conn.execute(
        """CREATE TABLE feedback (
            feedback_id TEXT PRIMARY KEY,
            request_id TEXT NOT NULL REFERENCES records(request_id) ON DELETE CASCADE,
            created_at REAL NOT NULL,
            rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
            correction TEXT NOT NULL DEFAULT '',
            comment TEXT NOT NULL DEFAULT '',
            idem TEXT NOT NULL,
            UNIQUE (request_id, idem)
        )"""
    )
    conn.execute("CREATE INDEX feedback_request ON feedback(request_id)")


# _MIGRATIONS[i] takes the schema from user_version i to i+1. Append, never edit.
_MIGRATIONS = [_migration_1]
assert len(_MIGRATIONS) == SCHEMA_VERSION


def _feedback_key(request_id: str, rating, correction: str, comment: str) -> tuple:
    """(feedback_id, request_id, rating, correction, comment, idem) of a valid feedback row."""
    if isinstance(rating, bool):
        raise InvalidArgument(f"rating must be an integer 1..5, got {rating!r}")
    try:
        rating = int(rating)
    except (TypeError, ValueError):
        raise InvalidArgument(f"rating must be an integer 1..5, got {rating!r}") from None
    if not 1 <= rating <= 5:
        raise InvalidArgument(f"rating must be between 1 and 5, got {rating}")
    if not request_id:
        raise InvalidArgument("request_id is required")
    correction, comment = correction or "", comment or ""
    idem = feedback_idempotency_key(rating, correction, comment)
    fid = "fb-" + hashlib.sha256(f"{request_id}\0{idem}".encode()).hexdigest()[:24]
    return fid, request_id, rating, correction, comment, idem


def _cutoff(days: float) -> float:
    """The created_at bound of `purge --older-than-days`."""
    try:
        d = float(days)
    except (TypeError, ValueError):
        d = -1.0
    if not d >= 0:  # also NaN
        raise InvalidArgument(f"--older-than-days must be a number >= 0, got {days!r}")
    return time.time() - d * 86400.0


def _client(client_id: str) -> str:
    if not client_id:
        raise InvalidArgument("client_id is required (an empty id would match every anonymous request)")
    return client_id


class SQLiteLogStore(LogStore):
    """SQLite store (WAL). One write connection guarded by a lock; each `iter_records` opens its own
    read connection so a long export never blocks the gateway's writes."""

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False, synchronous: str = "FULL",
                 busy_timeout_ms: int = 10_000):
        self.path = str(Path(path).expanduser())
        self.read_only = read_only
        self._synchronous = synchronous.upper()
        if self._synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise InvalidArgument(f"synchronous must be FULL, NORMAL or EXTRA, got {synchronous!r}")
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = threading.RLock()
        self._closed = False
        if not read_only:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise FailedPrecondition(f"cannot create the log directory for {self.path}: {exc}") from exc
        elif not Path(self.path).exists():
            raise FailedPrecondition(f"log database {self.path} does not exist")
        try:
            self._conn = self._connect(read_only)
            self._setup()
        except sqlite3.DatabaseError as exc:
            if hasattr(self, "_conn"):
                self._conn.close()
            raise FailedPrecondition(
                f"log database {self.path} cannot be used ({exc}): it is corrupt, not a SQLite file or not "
                f"writable; move it aside (a new one is created) or restore a backup") from exc

    # -- connection management
    def _connect(self, read_only: bool) -> sqlite3.Connection:
        if read_only:
            uri = Path(self.path).resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _setup(self) -> None:
        c = self._conn
        version = c.execute("PRAGMA user_version").fetchone()[0]  # reads the header: fails on garbage
        if self.read_only:
            if version > SCHEMA_VERSION:
                raise FailedPrecondition(f"log database {self.path} has schema v{version}, newer than this "
                                         f"code (v{SCHEMA_VERSION}); upgrade specialist-router")
            return
        mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise FailedPrecondition(f"log database {self.path}: cannot enable WAL (journal_mode={mode})")
        c.execute(f"PRAGMA synchronous={self._synchronous}")
        c.execute("PRAGMA secure_delete=ON")
        if version > SCHEMA_VERSION:
            raise FailedPrecondition(f"log database {self.path} has schema v{version}, newer than this code "
                                     f"(v{SCHEMA_VERSION}); upgrade specialist-router")
        if version < SCHEMA_VERSION:
            c.execute("BEGIN IMMEDIATE")
            try:
                version = c.execute("PRAGMA user_version").fetchone()[0]  # another process may have migrated
                for i in range(version, SCHEMA_VERSION):
                    _MIGRATIONS[i](c)
                    c.execute(f"PRAGMA user_version={i + 1}")
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        # fields added to LogRecord after the table was made: add their columns
        have = {row[1] for row in c.execute("PRAGMA table_info(records)")}
        for f in _RECORD_FIELDS:
            if f.name not in have:
                c.execute(f"ALTER TABLE records ADD COLUMN {f.name} {_col_type(f)}")

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"log store {self.path} is closed")

    # -- row conversion
    @staticmethod
    def _row(r: LogRecord) -> tuple:
        out = []
        for name in _RECORD_COLUMNS:
            v = getattr(r, name)
            if name in _JSON_FIELDS:
                v = json.dumps(v, ensure_ascii=False)
            elif name in _BOOL_FIELDS:
                v = int(bool(v))
            out.append(v)
        return tuple(out)

    @staticmethod
    def _record(row: sqlite3.Row | tuple, names: list[str]) -> LogRecord:
        kw = {}
        for name, v in zip(names, row):
            if name not in _RECORD_COLUMNS:
                continue
            if name in _JSON_FIELDS:
                v = json.loads(v) if v else ([] if name == "messages" else {})
            elif name in _BOOL_FIELDS:
                v = bool(v)
            kw[name] = v
        return LogRecord(**kw)

    # -- writes
    def write_many(self, records: Iterable[LogRecord]) -> int:
        return self.write_with_feedback(records, [])[0]

    def write_with_feedback(self, records: Iterable[LogRecord],
                            feedback: Iterable[tuple[str, int, str, str]]) -> tuple[int, int]:
        rows = [self._row(r) for r in records]  # serialization and rating errors surface before the transaction
        now = time.time()
        fb_rows = [(*_feedback_key(rid, rating, correction, comment), now) for rid, rating, correction, comment in feedback]
        if not rows and not fb_rows:
            return 0, 0
        if self.read_only:
            raise LogWriteError(f"log store {self.path} is read-only")
        rec_sql = (f"INSERT OR IGNORE INTO records ({', '.join(_RECORD_COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(_RECORD_COLUMNS))})")
        fb_sql = ("INSERT OR IGNORE INTO feedback (feedback_id, request_id, rating, correction, comment, idem, "
                  "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
        with self._lock:
            self._check_open()
            c = self._conn
            try:
                c.execute("BEGIN IMMEDIATE")
                before = c.total_changes
                c.executemany(rec_sql, rows)
                inserted = c.total_changes - before
                before = c.total_changes
                c.executemany(fb_sql, fb_rows)
                fb_inserted = c.total_changes - before
                c.execute("COMMIT")
                return inserted, fb_inserted
            except sqlite3.Error as exc:
                if c.in_transaction:
                    try:
                        c.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                what = f"{len(rows)} record(s)" + (f" and {len(fb_rows)} feedback row(s)" if fb_rows else "")
                raise LogWriteError(f"log store {self.path}: write of {what} failed, nothing was written: "
                                    f"{exc}") from exc

    def add_feedback(self, request_id: str, rating: int, correction: str = "",
                     comment: str = "") -> tuple[Feedback, bool]:
        fid, request_id, rating, correction, comment, idem = _feedback_key(request_id, rating, correction, comment)
        if self.read_only:
            raise LogWriteError(f"log store {self.path} is read-only")
        with self._lock:
            self._check_open()
            c = self._conn
            try:
                c.execute("BEGIN IMMEDIATE")
                if c.execute("SELECT 1 FROM records WHERE request_id=?", (request_id,)).fetchone() is None:
                    c.execute("ROLLBACK")
                    raise NotFound(f"no logged request with id {request_id!r} (feedback needs a logged request)")
                cur = c.execute(
                    "INSERT OR IGNORE INTO feedback (feedback_id, request_id, created_at, rating, correction, "
                    "comment, idem) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (fid, request_id, time.time(), rating, correction, comment, idem))
                created = cur.rowcount == 1
                row = c.execute("SELECT feedback_id, request_id, created_at, rating, correction, comment "
                                "FROM feedback WHERE request_id=? AND idem=?", (request_id, idem)).fetchone()
                c.execute("COMMIT")
            except sqlite3.Error as exc:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise LogWriteError(f"log store {self.path}: feedback write failed: {exc}") from exc
        return Feedback(*row), created

    def _delete_where(self, where: str, params: tuple) -> int:
        if self.read_only:
            raise LogWriteError(f"log store {self.path} is read-only")
        with self._lock:
            self._check_open()
            c = self._conn
            try:
                c.execute("BEGIN IMMEDIATE")
                n = c.execute(f"DELETE FROM records WHERE {where}", params).rowcount
                c.execute("COMMIT")
            except sqlite3.Error as exc:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise LogWriteError(f"log store {self.path}: delete failed: {exc}") from exc
            if n:
                # move the (secure-deleted) pages into the main file and empty the WAL: no old copies left
                c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    def _count_where(self, where: str, params: tuple) -> int:
        with self._lock:
            self._check_open()
            return int(self._conn.execute(f"SELECT COUNT(*) FROM records WHERE {where}", params).fetchone()[0])

    def delete_older_than(self, days: float) -> int:
        return self._delete_where("created_at < ?", (_cutoff(days),))

    def count_older_than(self, days: float) -> int:
        return self._count_where("created_at < ?", (_cutoff(days),))

    def delete_client(self, client_id: str) -> int:
        return self._delete_where("client_id = ?", (_client(client_id),))

    def count_client(self, client_id: str) -> int:
        return self._count_where("client_id = ?", (_client(client_id),))

    # -- reads
    def existing_ids(self, request_ids: Iterable[str]) -> set[str]:
        ids = list(request_ids)
        out: set[str] = set()
        with self._lock:
            self._check_open()
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                q = f"SELECT request_id FROM records WHERE request_id IN ({','.join('?' * len(chunk))})"
                out.update(r[0] for r in self._conn.execute(q, chunk))
        return out

    def get(self, request_id: str) -> LogRecord | None:
        with self._lock:
            self._check_open()
            cur = self._conn.execute(f"SELECT {', '.join(_RECORD_COLUMNS)} FROM records WHERE request_id=?",
                                     (request_id,))
            row = cur.fetchone()
        return None if row is None else self._record(row, _RECORD_COLUMNS)

    def iter_records(self, task: str | None = None, since: TimeLike = None, until: TimeLike = None,
                     source: str | None = None, status: str | None = None,
                     client_id: str | None = None) -> Iterator[LogRecord]:
        self._check_open()
        where, params = record_filter(since, until, placeholder="?", task=task, source=source,
                                      status=status, client_id=client_id)
        sql = f"SELECT {', '.join(_RECORD_COLUMNS)} FROM records" + where + " ORDER BY created_at, request_id"
        conn = self._connect(read_only=True)  # its own snapshot; never holds the write lock
        try:
            cur = conn.execute(sql, params)
            while True:
                rows = cur.fetchmany(500)
                if not rows:
                    break
                for row in rows:
                    yield self._record(row, _RECORD_COLUMNS)
        finally:
            conn.close()

    def feedback_for(self, request_ids: Iterable[str]) -> dict[str, list[Feedback]]:
        ids = list(dict.fromkeys(request_ids))
        out: dict[str, list[Feedback]] = {}
        with self._lock:
            self._check_open()
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                q = ("SELECT feedback_id, request_id, created_at, rating, correction, comment FROM feedback "
                     f"WHERE request_id IN ({','.join('?' * len(chunk))}) ORDER BY created_at, feedback_id")
                for row in self._conn.execute(q, chunk):
                    out.setdefault(row[1], []).append(Feedback(*row))
        return out

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._check_open()
            c = self._conn
            total, first, last = c.execute("SELECT COUNT(*), MIN(created_at), MAX(created_at) FROM records").fetchone()

            def group(expr: str) -> dict[str, int]:
                q = f"SELECT {expr} AS k, COUNT(*) FROM records GROUP BY k ORDER BY COUNT(*) DESC, k"
                return {str(k): n for k, n in c.execute(q)}

            by_task = group("task")
            by_adapter = group("CASE adapter WHEN '' THEN '(base)' ELSE adapter END")
            by_day = dict(sorted(group("date(created_at, 'unixepoch')").items()))
            by_source = group("source")
            by_status = group("status")
            fb_rows, fb_neg, fb_mean = c.execute(
                "SELECT COUNT(*), COALESCE(SUM(rating <= 2), 0), AVG(rating) FROM feedback").fetchone()
            with_fb = c.execute("SELECT COUNT(DISTINCT request_id) FROM feedback").fetchone()[0]
            per_task_fb = {
                str(t): {"records_with_feedback": n, "negative": neg}
                for t, n, neg in c.execute(
                    "SELECT r.task, COUNT(DISTINCT f.request_id), COALESCE(SUM(f.rating <= 2), 0) "
                    "FROM feedback f JOIN records r USING (request_id) GROUP BY r.task")
            }
        size = sum(os.path.getsize(p) for p in (self.path, self.path + "-wal") if os.path.exists(p))
        return {
            "path": self.path,
            "schema_version": SCHEMA_VERSION,
            "size_bytes": size,
            "records": total,
            "first_at": first,
            "last_at": last,
            "by_task": by_task,
            "by_adapter": by_adapter,
            "by_day": by_day,
            "by_source": by_source,
            "by_status": by_status,
            "feedback": {
                "rows": fb_rows,
                "records_with_feedback": with_fb,
                "feedback_rate": (with_fb / total) if total else 0.0,
                "negative": fb_neg,
                "negative_rate": (fb_neg / fb_rows) if fb_rows else 0.0,
                "mean_rating": fb_mean,
                "by_task": per_task_fb,
            },
        }

    def integrity_check(self) -> list[str]:
        with self._lock:
            self._check_open()
            problems = [r[0] for r in self._conn.execute("PRAGMA integrity_check") if r[0] != "ok"]
            problems += [f"foreign key violation: {tuple(r)}" for r in self._conn.execute("PRAGMA foreign_key_check")]
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                problems.append(f"schema version {version}, expected {SCHEMA_VERSION}")
        return problems

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if not self.read_only:
                    self._conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            self._conn.close()
