"""The PostgreSQL log store: `open_store("postgresql://...")` (psycopg 3 + a `psycopg_pool.ConnectionPool`).

Long module: one class, the PostgreSQL implementation of every `LogStore` method, with its URL handling and
migrations; like `sqlite_store`, they share one connection and error discipline that splitting would scatter.

Same tables, columns and semantics as `convlog.sqlite_store` (see docs/logs.md), so every caller (the gateway's
`AsyncLogWriter`, the CLI, training) works unchanged:

- `records` (one column per `LogRecord` field, `request_id` primary key; `messages` and `sampling` are JSON
  *text*, byte-for-byte what SQLite stores: JSONB would reorder keys and rejects `\\u0000`) and `feedback`
  (FK -> records ON DELETE CASCADE, rating CHECK 1..5, UNIQUE (request_id, idem)). Inserts are
  `ON CONFLICT DO NOTHING`: a second write of a request id, or the same feedback again, is ignored.
- PostgreSQL text cannot hold U+0000: a NUL character in a plain text column is stored as U+FFFD (JSON columns
  keep it exactly, escaped).
- Versioned schema: the `schema_version` table (one row per applied version); `_MIGRATIONS[i]` takes version i
  to i+1, run in one transaction under an advisory lock, so gateways starting together migrate once. Fields
  added to `LogRecord` later become columns (ALTER TABLE ADD COLUMN IF NOT EXISTS).
- Durability: every write is one transaction and returns after COMMIT with `synchronous_commit` on (a session
  whose server default is `off` is switched on; stronger settings such as `remote_apply` are kept), so the
  writer's "durable before the final message" holds as with SQLite's `synchronous=FULL`.
- Thread safety: each call takes its own pooled connection; `iter_records` streams through a server-side cursor
  on a connection of its own, so a long export never holds a pool slot the gateway's writes need.
- Errors name the server as `postgresql://user@host:port/db`, never the password: writes raise
  `LogWriteError`, reads `Unavailable` (server unreachable) and opening raises `InvalidArgument` (bad URL),
  `Unavailable` (cannot connect) or `FailedPrecondition` (server refused: login, missing database, newer schema).

URL: any libpq URL (`postgresql://user:password@host:5432/db?sslmode=require`, `postgres://` too; the password
may instead come from PGPASSWORD or a pgpass file) plus this store's own `pool_size=N` (most connections,
default 4). `connect_timeout` defaults to 5 s.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
import time
from typing import Any, Iterable, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import conninfo as _conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from convlog.base import LogStore, LogWriteError, TimeLike, record_filter
from convlog.schema import Feedback, LogRecord
from convlog.sqlite_store import _client, _cutoff, _feedback_key
from core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

SCHEMA_VERSION = 1
DEFAULT_POOL_SIZE = 4
POOL_TIMEOUT_S = 5.0  # how long a call waits for a pooled connection (the server down: fail, do not hang)
BREAKER_S = 5.0  # after a connection failure, calls fail at once for this long (the writer retries per record)
RECONNECT_S = 10.0  # the pool retries a lost connection with backoff for this long, then starts over: the
# delay between attempts stays short, so logging resumes within seconds of the server coming back
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"specialist-router convlog schema").digest()[:8], "big", signed=True)

_JSON_FIELDS = {"messages", "sampling"}
_BOOL_FIELDS = {"stream"}
_RECORD_FIELDS = list(dataclasses.fields(LogRecord))
_RECORD_COLUMNS = [f.name for f in _RECORD_FIELDS]
_COLS = ", ".join(f'"{c}"' for c in _RECORD_COLUMNS)
_FB_COLS = "feedback_id, request_id, created_at, rating, correction, comment"


def _col_type(f: dataclasses.Field) -> str:
    t = str(f.type)
    if f.name in _JSON_FIELDS:
        return "TEXT NOT NULL DEFAULT '[]'" if f.name == "messages" else "TEXT NOT NULL DEFAULT '{}'"
    if t == "bool":
        return "BOOLEAN NOT NULL DEFAULT false"
    if t == "int":
        return "BIGINT NOT NULL DEFAULT 0"
    if t == "float":
        return "DOUBLE PRECISION NOT NULL DEFAULT 0"
    return "TEXT NOT NULL DEFAULT ''"


def _migration_1(cur: psycopg.Cursor) -> None:
    cols = []
    for f in _RECORD_FIELDS:
        if f.name == "request_id":
            cols.append('"request_id" TEXT PRIMARY KEY')
        elif f.name == "created_at":
            cols.append('"created_at" DOUBLE PRECISION NOT NULL')
        else:
            cols.append(f'"{f.name}" {_col_type(f)}')
    cur.execute(f"CREATE TABLE records ({', '.join(cols)})")
    cur.execute("CREATE INDEX records_created ON records (created_at)")
    cur.execute("CREATE INDEX records_task_created ON records (task, created_at)")
    cur.execute("CREATE INDEX records_client ON records (client_id)")
    cur.execute(
        """CREATE TABLE feedback (
            feedback_id TEXT PRIMARY KEY,
            request_id TEXT NOT NULL REFERENCES records (request_id) ON DELETE CASCADE,
            created_at DOUBLE PRECISION NOT NULL,
            rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
            correction TEXT NOT NULL DEFAULT '',
            comment TEXT NOT NULL DEFAULT '',
            idem TEXT NOT NULL,
            UNIQUE (request_id, idem)
        )"""
    )
    cur.execute("CREATE INDEX feedback_request ON feedback (request_id)")


# _MIGRATIONS[i] takes the schema from version i to i+1. Append, never edit.
_MIGRATIONS = [_migration_1]
assert len(_MIGRATIONS) == SCHEMA_VERSION


class _Url:
    """A parsed store URL: the libpq conninfo, this store's own options, and a password-free display name."""

    def __init__(self, url: str):
        url = url.strip()
        parts = urlsplit(url)
        ours = {"pool_size"}
        query = parse_qsl(parts.query, keep_blank_values=True)
        opts = {k: v for k, v in query if k in ours}
        self.conninfo = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k not in ours])))
        try:
            params = _conninfo.conninfo_to_dict(self.conninfo)
        except psycopg.Error as exc:
            try:
                raw_pw = parts.password or ""
            except ValueError:
                raw_pw = ""
            msg = " ".join(str(exc).split())
            msg = msg.replace(raw_pw, "***") if raw_pw else msg
            raise InvalidArgument(f"invalid PostgreSQL URL {redact(url)}: {msg}") from None
        self.password = str(params.get("password") or "")
        try:
            self.pool_size = int(opts.get("pool_size", DEFAULT_POOL_SIZE))
        except ValueError:
            self.pool_size = 0
        if self.pool_size < 1:
            raise InvalidArgument(f"pool_size in {redact(url)} must be an integer >= 1, "
                                  f"got {opts.get('pool_size')!r}")
        self.kwargs: dict[str, Any] = {}
        if "connect_timeout" not in params:
            self.kwargs["connect_timeout"] = 5
        if "application_name" not in params:
            self.kwargs["application_name"] = "specialist-router"
        user = params.get("user") or ""
        host = params.get("host") or params.get("hostaddr") or "localhost"
        if "," not in host and ":" in host:
            host = f"[{host}]"
        port = params.get("port") or "5432"
        db = params.get("dbname") or user or "postgres"
        self.display = f"postgresql://{user + '@' if user else ''}{host}:{port}/{db}"

    def scrub(self, text: object) -> str:
        """`text` on one line with the password (if any) masked: error messages never carry it."""
        s = " ".join(str(text).split())
        return s.replace(self.password, "***") if self.password else s


def redact(url: str) -> str:
    """`url` without its password (in the user part or a `password=` parameter); also for URLs libpq rejects."""
    try:
        p = urlsplit(url)
        netloc = p.netloc
        if "@" in netloc:
            userinfo, hosts = netloc.rsplit("@", 1)
            netloc = f"{userinfo.split(':', 1)[0]}@{hosts}"
        q = [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(p.query, keep_blank_values=True)]
        return urlunsplit(p._replace(netloc=netloc, query=urlencode(q, safe="*/:=,")))
    except ValueError:
        return "postgresql://(unparsable URL)"


def _no_nul(v: Any) -> Any:
    return v.replace("\x00", "\ufffd") if isinstance(v, str) and "\x00" in v else v


class PostgresLogStore(LogStore):
    """PostgreSQL store: a connection pool shared by all threads (the gateway's writer thread, feedback threads)."""

    def __init__(self, url: str, *, read_only: bool = False):
        self._url = _Url(url)
        self.path = self._url.display
        self.read_only = read_only
        self._closed = False
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down_reason = ""
        self._setup()
        self._pool = ConnectionPool(self._url.conninfo, kwargs={**self._url.kwargs, "autocommit": True},
                                    min_size=1, max_size=self._url.pool_size, open=False, configure=self._configure,
                                    check=ConnectionPool.check_connection, timeout=POOL_TIMEOUT_S,
                                    name="convlog", num_workers=2, reconnect_timeout=RECONNECT_S)
        try:
            self._pool.open(wait=True, timeout=max(10.0, float(self._url.kwargs.get("connect_timeout", 10))))
        except PoolTimeout as exc:
            self._pool.close()
            raise Unavailable(f"log store {self.path}: cannot connect to the PostgreSQL server ({exc})") from None

    # -- connections
    def _connect(self, *, autocommit: bool = True) -> psycopg.Connection:
        """A new connection outside the pool (schema setup, `iter_records`); errors named, password-free."""
        try:
            conn = psycopg.connect(self._url.conninfo, autocommit=autocommit, **self._url.kwargs)
        except psycopg.OperationalError as exc:
            msg = self._url.scrub(exc)
            if "FATAL" in msg:  # the server answered: wrong password, no such database or role, ...
                raise FailedPrecondition(f"log store {self.path}: the PostgreSQL server refused the connection: "
                                         f"{msg}") from None
            if re.search(r"\binvalid\b.*\b(value|option)\b", msg):  # libpq rejected a URL option's value
                raise InvalidArgument(f"log store {self.path}: {msg}") from None
            raise Unavailable(f"log store {self.path}: cannot connect to the PostgreSQL server: {msg}") from None
        except psycopg.Error as exc:
            raise InvalidArgument(f"log store {self.path}: {self._url.scrub(exc)}") from None
        try:
            self._configure(conn)
        except psycopg.Error as exc:
            conn.close()
            raise Unavailable(f"log store {self.path}: setting up a connection failed: {self._url.scrub(exc)}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _configure(self, conn: psycopg.Connection) -> None:
        """Every connection: commits wait for the WAL flush; read-only stores cannot write at all."""
        ac = conn.autocommit
        conn.autocommit = True
        if conn.execute("SHOW synchronous_commit").fetchone()[0] == "off":
            conn.execute("SET synchronous_commit TO on")
        if self.read_only:
            conn.execute("SET default_transaction_read_only TO on")
        conn.autocommit = ac

    def _borrow(self, what: str, error: type[Exception]):
        """The pool's connection context, failing fast (`error`) while the server is known to be unreachable."""
        self._check_open()
        now = time.monotonic()
        if now < self._down_until:
            raise error(f"log store {self.path}: {what} failed: the server is unreachable ({self._down_reason})")
        return self._pool.connection()

    def _error(self, exc: BaseException, what: str, error: type[Exception], *, suffix: str = "") -> Exception:
        """`exc` as `error` naming the server; a lost connection opens the breaker."""
        msg = self._url.scrub(exc) or type(exc).__name__
        if isinstance(exc, PoolTimeout) or (isinstance(exc, psycopg.OperationalError) and not getattr(exc, "sqlstate", None)):
            self._down_until = time.monotonic() + BREAKER_S
            self._down_reason = msg
        return error(f"log store {self.path}: {what} failed{suffix}: {msg}")

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"log store {self.path} is closed")

    # -- schema
    def _setup(self) -> None:
        with self._connect() as conn:
            try:
                version = self._version(conn)
                if version > SCHEMA_VERSION:
                    raise FailedPrecondition(f"log store {self.path} has schema v{version}, newer than this code "
                                             f"(v{SCHEMA_VERSION}); upgrade specialist-router")
                if version == SCHEMA_VERSION and not self._missing_columns(conn):
                    return
                if self.read_only:
                    if version == 0:
                        raise FailedPrecondition(f"log store {self.path} has no log tables yet (nothing logged, or "
                                                 "the URL names another database or schema)")
                    if version == SCHEMA_VERSION:
                        missing = ", ".join(f.name for f in self._missing_columns(conn))
                        raise FailedPrecondition(f"log store {self.path} lacks the columns {missing} (fields added "
                                                 "since it was made); open it once read-write to add them")
                    raise FailedPrecondition(f"log store {self.path} has schema v{version}, older than this code "
                                             f"(v{SCHEMA_VERSION}); open it once read-write to migrate it")
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                    cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                                "applied_at DOUBLE PRECISION NOT NULL)")
                    version = self._version(conn)  # another process may have migrated meanwhile
                    if version > SCHEMA_VERSION:
                        raise FailedPrecondition(f"log store {self.path} has schema v{version}, newer than this "
                                                 f"code (v{SCHEMA_VERSION}); upgrade specialist-router")
                    for i in range(version, SCHEMA_VERSION):
                        _MIGRATIONS[i](cur)
                        cur.execute("INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)",
                                    (i + 1, time.time()))
                    for f in self._missing_columns(conn):
                        cur.execute(f'ALTER TABLE records ADD COLUMN IF NOT EXISTS "{f.name}" {_col_type(f)}')
            except psycopg.Error as exc:
                raise FailedPrecondition(f"log store {self.path} cannot be used: {self._url.scrub(exc)}") from None

    @staticmethod
    def _version(conn: psycopg.Connection) -> int:
        if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            if conn.execute("SELECT to_regclass('records')").fetchone()[0] is not None:
                raise FailedPrecondition("a table named records exists but no schema_version table: this is not "
                                         "a specialist-router log store (use another database or schema)")
            return 0
        return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])

    @staticmethod
    def _missing_columns(conn: psycopg.Connection) -> list:
        have = {r[0] for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass('records') AND attnum > 0 "
            "AND NOT attisdropped")}
        return [f for f in _RECORD_FIELDS if f.name not in have] if have else []

    # -- row conversion
    @staticmethod
    def _row(r: LogRecord) -> tuple:
        out = []
        for name in _RECORD_COLUMNS:
            v = getattr(r, name)
            if name in _JSON_FIELDS:
                v = json.dumps(v, ensure_ascii=False)  # escapes NUL: exact round trip
            elif name in _BOOL_FIELDS:
                v = bool(v)
            else:
                v = _no_nul(v)
            out.append(v)
        return tuple(out)

    @staticmethod
    def _record(row: tuple) -> LogRecord:
        kw = {}
        for name, v in zip(_RECORD_COLUMNS, row):
            if name in _JSON_FIELDS:
                v = json.loads(v) if v else ([] if name == "messages" else {})
            elif name in _BOOL_FIELDS:
                v = bool(v)
            kw[name] = v
        return LogRecord(**kw)

    # -- writes
    _REC_SQL = f"INSERT INTO records ({_COLS}) VALUES {{values}} ON CONFLICT DO NOTHING"
    _FB_SQL = ("INSERT INTO feedback (feedback_id, request_id, rating, correction, comment, idem, created_at) "
               "VALUES {values} ON CONFLICT DO NOTHING")
    _ROWS_PER_STATEMENT = 1000  # multi-row INSERTs: one round trip each, under PostgreSQL's 65535 parameters

    @classmethod
    def _insert(cls, cur: psycopg.Cursor, sql: str, rows: list[tuple]) -> int:
        """Insert `rows` with multi-row INSERT statements; returns how many were new."""
        n = 0
        for i in range(0, len(rows), cls._ROWS_PER_STATEMENT):
            chunk = rows[i:i + cls._ROWS_PER_STATEMENT]
            one = "(" + ", ".join(["%s"] * len(chunk[0])) + ")"
            cur.execute(sql.format(values=", ".join([one] * len(chunk))), [v for row in chunk for v in row])
            n += max(cur.rowcount, 0)
        return n

    def write_many(self, records: Iterable[LogRecord]) -> int:
        return self.write_with_feedback(records, [])[0]

    def write_with_feedback(self, records: Iterable[LogRecord],
                            feedback: Iterable[tuple[str, int, str, str]]) -> tuple[int, int]:
        rows = [self._row(r) for r in records]  # serialization and rating errors surface before the transaction
        now = time.time()
        fb_rows = [tuple(_no_nul(v) for v in _feedback_key(rid, rating, correction, comment)) + (now,)
                   for rid, rating, correction, comment in feedback]
        return self._write(rows, fb_rows)

    def write_copies(self, records: Iterable[LogRecord], feedback: Iterable[Feedback]) -> tuple[int, int]:
        """`logs copy`: records plus feedback rows as they are (their ids and created_at kept), ONE transaction.
        Idempotent like `write_with_feedback`; returns (records inserted, feedback inserted)."""
        rows = [self._row(r) for r in records]
        fb_rows = []
        for f in feedback:
            fid, rid, rating, correction, comment, idem = _feedback_key(f.request_id, f.rating, f.correction,
                                                                        f.comment)
            fb_rows.append(tuple(_no_nul(v) for v in (f.feedback_id or fid, rid, rating, correction, comment, idem))
                           + (float(f.created_at),))
        return self._write(rows, fb_rows)

    def _write(self, rows: list[tuple], fb_rows: list[tuple]) -> tuple[int, int]:
        if not rows and not fb_rows:
            return 0, 0
        what = f"write of {len(rows)} record(s)" + (f" and {len(fb_rows)} feedback row(s)" if fb_rows else "")
        if self.read_only:
            raise LogWriteError(f"log store {self.path} is read-only")
        committing = False
        try:
            with self._borrow(what, LogWriteError) as conn:
                tx = conn.transaction()
                with tx:
                    with conn.cursor() as cur:
                        inserted = self._insert(cur, self._REC_SQL, rows) if rows else 0
                        fb_inserted = self._insert(cur, self._FB_SQL, fb_rows) if fb_rows else 0
                    committing = True  # leaving the block commits
                return inserted, fb_inserted
        except (psycopg.Error, PoolTimeout, UnicodeError, ValueError, OverflowError) as exc:
            suffix = (" (the connection was lost while committing: the outcome is unknown; writing again is safe, "
                      "duplicates are ignored)") if committing and isinstance(exc, psycopg.OperationalError) else \
                ", nothing was written"
            raise self._error(exc, what, LogWriteError, suffix=suffix) from None

    def add_feedback(self, request_id: str, rating: int, correction: str = "",
                     comment: str = "") -> tuple[Feedback, bool]:
        fid, request_id, rating, correction, comment, idem = _feedback_key(request_id, rating, correction, comment)
        correction, comment = _no_nul(correction), _no_nul(comment)
        if self.read_only:
            raise LogWriteError(f"log store {self.path} is read-only")
        try:
            with self._borrow("feedback write", LogWriteError) as conn, conn.transaction():
                if conn.execute("SELECT 1 FROM records WHERE request_id = %s",
                                (request_id,)).fetchone() is None:
                    raise NotFound(f"no logged request with id {request_id!r} (feedback needs a logged request)")
                cur = conn.execute(
                    "INSERT INTO feedback (feedback_id, request_id, created_at, rating, correction, comment, idem) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (fid, request_id, time.time(), rating, correction, comment, idem))
                created = cur.rowcount == 1
                row = conn.execute(f"SELECT {_FB_COLS} FROM feedback WHERE request_id = %s AND idem = %s",
                                   (request_id, idem)).fetchone()
        except (psycopg.Error, PoolTimeout, UnicodeError) as exc:
            raise self._error(exc, "feedback write", LogWriteError) from None
        return Feedback(*row), created

    def _delete_where(self, where: str, params: tuple) -> int:
        if self.read_only:
            raise LogWriteError(f"log store {self.path} is read-only")
        try:
            with self._borrow("delete", LogWriteError) as conn:
                with conn.transaction():
                    n = conn.execute(f"DELETE FROM records WHERE {where}", params).rowcount
                if n:
                    # reclaim the dead rows now (feedback went by cascade); see docs/logs.md on what stays on disk
                    try:
                        conn.execute("VACUUM records, feedback")
                    except psycopg.Error:
                        pass
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._error(exc, "delete", LogWriteError) from None
        return n

    def _count_where(self, where: str, params: tuple) -> int:
        return int(self._read("count", lambda conn: conn.execute(
            f"SELECT COUNT(*) FROM records WHERE {where}", params).fetchone()[0]))

    def delete_older_than(self, days: float) -> int:
        return self._delete_where("created_at < %s", (_cutoff(days),))

    def count_older_than(self, days: float) -> int:
        return self._count_where("created_at < %s", (_cutoff(days),))

    def delete_client(self, client_id: str) -> int:
        return self._delete_where("client_id = %s", (_client(client_id),))

    def count_client(self, client_id: str) -> int:
        return self._count_where("client_id = %s", (_client(client_id),))

    # -- reads
    def _read(self, what: str, fn):
        try:
            with self._borrow(what, Unavailable) as conn:
                return fn(conn)
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._error(exc, what, Unavailable) from None

    def existing_ids(self, request_ids: Iterable[str]) -> set[str]:
        ids = list(dict.fromkeys(request_ids))
        if not ids:
            return set()
        return self._read("read", lambda conn: {r[0] for r in conn.execute(
            "SELECT request_id FROM records WHERE request_id = ANY(%s)", (ids,))})

    def get(self, request_id: str) -> LogRecord | None:
        row = self._read("read", lambda conn: conn.execute(
            f"SELECT {_COLS} FROM records WHERE request_id = %s", (request_id,)).fetchone())
        return None if row is None else self._record(row)

    def iter_records(self, task: str | None = None, since: TimeLike = None, until: TimeLike = None,
                     source: str | None = None, status: str | None = None,
                     client_id: str | None = None) -> Iterator[LogRecord]:
        self._check_open()
        where, params = record_filter(since, until, placeholder="%s", quote='"', task=task, source=source,
                                      status=status, client_id=client_id)
        sql = f"SELECT {_COLS} FROM records" + where + ' ORDER BY created_at, request_id COLLATE "C"'
        return self._stream(sql, params)

    def _stream(self, sql: str, params: list) -> Iterator[LogRecord]:
        conn = self._connect(autocommit=False)  # its own connection: a long read never holds a pool slot
        try:
            with conn.cursor(name="convlog_iter_records") as cur:  # server-side cursor: constant memory
                cur.itersize = 500
                cur.execute(sql, params)
                for row in cur:
                    yield self._record(row)
        except psycopg.Error as exc:
            raise self._error(exc, "reading records", Unavailable) from None
        finally:
            conn.close()

    def feedback_for(self, request_ids: Iterable[str]) -> dict[str, list[Feedback]]:
        ids = list(dict.fromkeys(request_ids))
        out: dict[str, list[Feedback]] = {}
        if not ids:
            return out

        def q(conn):
            for row in conn.execute(f"SELECT {_FB_COLS} FROM feedback WHERE request_id = ANY(%s) "
                                    'ORDER BY created_at, feedback_id COLLATE "C"', (ids,)):
                out.setdefault(row[1], []).append(Feedback(*row))
            return out

        return self._read("read", q)

    def stats(self) -> dict[str, Any]:
        def q(conn):
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")  # one snapshot
                total, first, last = conn.execute(
                    "SELECT COUNT(*), MIN(created_at), MAX(created_at) FROM records").fetchone()

                def group(expr: str) -> dict[str, int]:
                    sql = (f"SELECT {expr} AS k, COUNT(*) FROM records GROUP BY 1 "
                           f'ORDER BY COUNT(*) DESC, ({expr}) COLLATE "C"')
                    return {str(k): int(n) for k, n in conn.execute(sql)}

                by_task = group("task")
                by_adapter = group("CASE adapter WHEN '' THEN '(base)' ELSE adapter END")
                by_day = dict(sorted(group(
                    "to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')").items()))
                by_source = group("source")
                by_status = group("status")
                fb_rows, fb_neg, fb_mean, with_fb = conn.execute(
                    "SELECT COUNT(*), COUNT(*) FILTER (WHERE rating <= 2), AVG(rating)::float8, "
                    "COUNT(DISTINCT request_id) FROM feedback").fetchone()
                per_task_fb = {
                    str(t): {"records_with_feedback": int(n), "negative": int(neg)}
                    for t, n, neg in conn.execute(
                        "SELECT r.task, COUNT(DISTINCT f.request_id), COUNT(*) FILTER (WHERE f.rating <= 2) "
                        "FROM feedback f JOIN records r USING (request_id) GROUP BY r.task")
                }
                size = conn.execute("SELECT pg_total_relation_size('records'::regclass) + "
                                    "pg_total_relation_size('feedback'::regclass)").fetchone()[0]
            return total, first, last, by_task, by_adapter, by_day, by_source, by_status, fb_rows, fb_neg, \
                fb_mean, with_fb, per_task_fb, size

        (total, first, last, by_task, by_adapter, by_day, by_source, by_status, fb_rows, fb_neg, fb_mean, with_fb,
         per_task_fb, size) = self._read("stats", q)
        total, fb_rows, fb_neg, with_fb = int(total), int(fb_rows), int(fb_neg), int(with_fb)
        return {
            "path": self.path,
            "schema_version": SCHEMA_VERSION,
            "size_bytes": int(size),
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
        """Schema version and columns, orphan or out-of-range feedback, and the server settings durability
        depends on. Page-level corruption is the server's own business (data checksums, amcheck)."""
        def q(conn):
            problems = []
            version = self._version(conn)
            if version != SCHEMA_VERSION:
                problems.append(f"schema version {version}, expected {SCHEMA_VERSION}")
            if conn.execute("SELECT to_regclass('records')").fetchone()[0] is None or \
                    conn.execute("SELECT to_regclass('feedback')").fetchone()[0] is None:
                return problems + ["the records or feedback table is missing"]
            problems += [f"records has no column {f.name}" for f in self._missing_columns(conn)]
            orphans = conn.execute("SELECT COUNT(*) FROM feedback f LEFT JOIN records r USING (request_id) "
                                   "WHERE r.request_id IS NULL").fetchone()[0]
            if orphans:
                problems.append(f"foreign key violation: {orphans} feedback row(s) without their record")
            bad = conn.execute("SELECT COUNT(*) FROM feedback WHERE rating NOT BETWEEN 1 AND 5").fetchone()[0]
            if bad:
                problems.append(f"{bad} feedback row(s) with a rating outside 1..5")
            if conn.execute("SHOW fsync").fetchone()[0] != "on":
                problems.append("the server runs with fsync=off: committed records do not survive a server crash")
            if conn.execute("SHOW synchronous_commit").fetchone()[0] == "off":
                problems.append("synchronous_commit is off on the store's connections")
            return problems

        return self._read("integrity check", q)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close(timeout=5.0)
