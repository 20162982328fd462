"""convlog: real SQLite in tmp_path and a real PostgreSQL server (session fixture), real ShareGPT data, real child
processes. No mocks. Store tests run against both stores (`[sqlite]` / `[postgres]`)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from convlog.pii import PiiPolicy, luhn_valid
from convlog.schema import LogRecord
from convlog.store import SCHEMA_VERSION, LogWriteError, open_store
from convlog.writer import AsyncLogWriter
from core.errors import FailedPrecondition, InvalidArgument, NotFound

REPO = Path(__file__).resolve().parents[1]


def rec(i: int | str, **kw) -> LogRecord:
    base = dict(request_id=f"req-{i}", created_at=time.time(),
                messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {i} ✓"}],
                response_text=f"answer {i}", task="code", confidence=0.91, adapter="code@3", adapter_task="code",
                adapter_version="3", model="SmolLM2-135M", prompt_tokens=12, completion_tokens=7, total_ms=12.5,
                finish_reason="stop", client_id="alice", stream=True, sampling={"temperature": 0.2, "max_tokens": 64})
    base.update(kw)
    return LogRecord(**base)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path) -> str:
    """Where a store lives: a SQLite file under tmp_path, or a fresh database on the session's PostgreSQL server."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return str(tmp_path / "logs" / "router.sqlite3")


def is_pg(store_or_db) -> bool:
    return str(getattr(store_or_db, "path", store_or_db)).startswith("postgresql://")


@pytest.fixture
def store(db):
    s = open_store(db)
    yield s
    s.close()


def on_disk(store, request) -> bytes:
    """Every byte the store has on disk: the SQLite file + WAL, or (PostgreSQL, after a CHECKPOINT) the database's
    files and the server's WAL."""
    if not is_pg(store):
        wal = Path(store.path + "-wal")
        return Path(store.path).read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    server = request.getfixturevalue("postgres_server")
    dbname = store.path.rsplit("/", 1)[1]
    server.execute("CHECKPOINT")
    oid = server.execute(f"SELECT oid FROM pg_database WHERE datname = '{dbname}'")[0][0]
    files = [p for d in (server.data / "base" / str(oid), server.data / "pg_wal") for p in d.rglob("*") if p.is_file()]
    return b"".join(p.read_bytes() for p in files)


# ------------------------------------------------------------------------------------------ store


def test_schema_round_trip_and_pragmas(store):
    r = rec(1, reasoning_text="thinking…", route_reason="specialist", ttft_ms=3.25, error="")
    assert store.write_many([r]) == 1
    assert store.get("req-1") == r
    assert store.get("nope") is None
    assert store.write_many([r]) == 0  # same id: ignored, never edited in place
    if is_pg(store):
        from convlog import postgres_store

        with store._pool.connection() as conn:  # what every write runs under
            assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
            assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == postgres_store.SCHEMA_VERSION
            types = dict(conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                                      "WHERE table_name = 'records'").fetchall())
        assert types["messages"] == "text" and types["created_at"] == "double precision" and types["stream"] == "boolean"
    else:
        conn = sqlite3.connect(store.path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        conn.close()
    assert store.integrity_check() == []


def test_reopen_keeps_data_and_migrates_once(db):
    with open_store(db) as s:
        s.write_many([rec(1)])
    with open_store(db) as s:
        assert s.get("req-1") is not None
        assert s.integrity_check() == []


def test_iter_records_filters(store):
    day = 86400.0
    t0 = 1_700_000_000.0  # 2023-11-14 22:13 UTC
    store.write_many([rec(1, created_at=t0, task="code"), rec(2, created_at=t0 + day, task="math"),
                      rec(3, created_at=t0 + 2 * day, task="code", source="import", status="error")])
    assert [r.request_id for r in store.iter_records()] == ["req-1", "req-2", "req-3"]
    assert [r.request_id for r in store.iter_records(task="code")] == ["req-1", "req-3"]
    assert [r.request_id for r in store.iter_records(since="2023-11-15")] == ["req-2", "req-3"]
    assert [r.request_id for r in store.iter_records(until="2023-11-15")] == ["req-1", "req-2"]  # inclusive day
    assert [r.request_id for r in store.iter_records(since=t0 + 1, until=t0 + 2 * day)] == ["req-2"]
    assert [r.request_id for r in store.iter_records(source="import", status="error")] == ["req-3"]
    with pytest.raises(InvalidArgument):
        list(store.iter_records(since="last tuesday"))


def test_feedback_not_found_invalid_and_idempotent(store):
    store.write_many([rec(1)])
    with pytest.raises(NotFound):
        store.add_feedback("missing", 4)
    for bad in (0, 6, -1, "x"):
        with pytest.raises(InvalidArgument):
            store.add_feedback("req-1", bad)
    fb, created = store.add_feedback("req-1", 2, correction="use a list comprehension", comment="too long")
    assert created and fb.negative and fb.request_id == "req-1"
    fb2, created2 = store.add_feedback("req-1", 2, correction="use a list comprehension", comment="too long")
    assert not created2 and fb2.feedback_id == fb.feedback_id  # a retried RPC creates no duplicate
    fb3, created3 = store.add_feedback("req-1", 5)
    assert created3 and fb3.feedback_id != fb.feedback_id
    got = store.feedback_for(["req-1", "missing"])
    assert list(got) == ["req-1"] and [f.rating for f in got["req-1"]] == [2, 5]
    s = store.stats()
    assert s["feedback"]["rows"] == 2 and s["feedback"]["records_with_feedback"] == 1
    assert s["feedback"]["negative"] == 1 and s["by_task"] == {"code": 1}


def test_retention_and_forget(store, request):
    now = time.time()
    store.write_many([rec(1, created_at=now - 40 * 86400), rec(2, created_at=now - 10 * 86400, client_id="bob"),
                      rec(3, created_at=now, client_id="bob"), rec(4, created_at=now, client_id="")])
    store.add_feedback("req-1", 1)
    store.add_feedback("req-3", 5, comment="bob's secret comment")
    assert store.delete_older_than(30) == 1
    assert store.get("req-1") is None and store.feedback_for(["req-1"]) == {}  # feedback cascades
    with pytest.raises(InvalidArgument):
        store.delete_client("")  # would hit every anonymous request
    with pytest.raises(InvalidArgument):
        store.delete_older_than(-1)
    assert store.delete_client("bob") == 2
    assert [r.request_id for r in store.iter_records()] == ["req-4"]
    assert store.feedback_for(["req-3"]) == {}
    assert store.integrity_check() == []
    assert store.count_client("bob") == 0 and store.stats()["feedback"]["rows"] == 0
    if not is_pg(store):  # PostgreSQL keeps deleted text in its WAL until recycled (docs/logs.md, Retention)
        assert b"bob's secret comment" not in on_disk(store, request)  # secure_delete + WAL truncate: really gone


def test_corrupt_database_is_a_clear_failed_precondition(tmp_path):
    p = tmp_path / "router.sqlite3"
    p.write_bytes(b"this is not a database\n" * 512)
    with pytest.raises(FailedPrecondition, match=str(p)):
        open_store(p)


def test_stats_counts(store):
    store.write_many([rec(1), rec(2, task="math", adapter=""), rec(3, task="math", adapter="")])
    s = store.stats()
    assert s["records"] == 3 and s["by_task"] == {"math": 2, "code": 1}
    assert s["by_adapter"] == {"(base)": 2, "code@3": 1} and sum(s["by_day"].values()) == 3
    json.dumps(s)


# ----------------------------------------------------------------------------------------- writer


async def test_async_writer_500_concurrent_writes_group_commit(store):
    writer = AsyncLogWriter(store, max_batch=256)
    await asyncio.gather(*(writer.write(rec(i)) for i in range(500)))
    assert writer.written == 500 and writer.failures == 0 and writer.healthy
    assert writer.commits < 500  # commits were batched
    await writer.close()
    ids = {r.request_id for r in store.iter_records()}
    assert ids == {f"req-{i}" for i in range(500)}
    with pytest.raises(LogWriteError):
        await writer.write(rec("late"))


async def test_async_writer_applies_pii_before_disk(store, request):
    writer = AsyncLogWriter(store, pii_policy=PiiPolicy("mask"))
    await writer.write(rec(1, messages=[{"role": "user", "content": "mail me: jane@corp.example.com"}],
                           response_text="call +1 (415) 555-0134"))
    fb, _ = await writer.add_feedback("req-1", 3, correction="my card 4111 1111 1111 1111")
    await writer.close()
    r = store.get("req-1")
    assert r.messages[0]["content"] == "mail me: [EMAIL]" and r.response_text == "call [PHONE]"
    assert fb.correction == "my card [CARD]"
    raw = on_disk(store, request)
    assert b"mail me: [EMAIL]" in raw  # the record is there (masked), so the check reads the right files
    assert b"jane@corp" not in raw and b"4111 1111" not in raw


async def test_async_writer_bad_record_fails_alone(store):
    writer = AsyncLogWriter(store)
    bad = rec("bad", sampling={"x": object()})  # not JSON-serializable
    results = await asyncio.gather(writer.write(rec(1)), writer.write(bad), writer.write(rec(2)),
                                   return_exceptions=True)
    assert results[0] is None and results[2] is None and isinstance(results[1], LogWriteError)
    assert writer.failures == 1
    await writer.close()
    assert {r.request_id for r in store.iter_records()} == {"req-1", "req-2"}


async def test_async_writer_full_disk_reports_without_crashing(tmp_path):
    store = open_store(tmp_path / "full.sqlite3")
    page_count = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count={page_count + 2}")  # SQLite's own SQLITE_FULL path
    writer = AsyncLogWriter(store)
    big = "x" * 200_000
    with pytest.raises(LogWriteError, match="full"):
        await writer.write(rec(1, response_text=big))
    assert not writer.healthy and writer.failures == 1 and "full" in writer.last_error
    await writer.write(rec(2))  # small records still fit: the writer recovers
    assert writer.healthy
    await writer.close()
    store.close()


async def test_read_only_store_writer_reports_failure(tmp_path):
    d = tmp_path / "ro"
    with open_store(d / "router.sqlite3") as s:
        s.write_many([rec(1)])
    os.chmod(d / "router.sqlite3", 0o444)
    os.chmod(d, 0o555)
    try:
        # open_store opens a non-writable file read-only; root ignores permissions, so force it there
        store = open_store(d / "router.sqlite3", read_only=True if os.geteuid() == 0 else None)
        assert store.get("req-1") is not None  # readers still work
        writer = AsyncLogWriter(store)
        with pytest.raises(LogWriteError):
            await writer.write(rec(2))
        assert writer.failures == 1 and not writer.healthy and writer.last_error
        await writer.close()
        store.close()
    finally:
        os.chmod(d, 0o755)
        os.chmod(d / "router.sqlite3", 0o644)


CHILD = textwrap.dedent("""
    import asyncio, sys, time
    from convlog.schema import LogRecord
    from convlog.store import open_store
    from convlog.writer import AsyncLogWriter

    async def one(w, i):
        rid = f"crash-{i}"
        await w.write(LogRecord(request_id=rid, created_at=time.time(),
                                messages=[{"role": "user", "content": "x" * 500}], response_text="y" * 500))
        sys.stdout.write(rid + "\\n")
        sys.stdout.flush()

    async def main():
        w = AsyncLogWriter(open_store(sys.argv[1]), max_batch=64)
        i = 0
        while True:  # until killed
            await asyncio.gather(*(one(w, i + k) for k in range(8)))
            i += 8

    asyncio.run(main())
""")


def test_crash_durability_kill_9(tmp_path, db):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, env=env)
    printed: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(printed) < 400:
            assert time.monotonic() < deadline, "child did not acknowledge 400 writes in 60 s"
            line = proc.stdout.readline()
            assert line, f"child exited early (rc={proc.poll()})"
            printed.append(line.decode().strip())
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-run: writes are in flight
        rest = proc.stdout.read()  # acknowledged before the kill, still in the pipe
        proc.wait()
    printed += [ln for ln in rest.decode().split("\n")[:-1]]  # a cut last line is not an acknowledgement
    if is_pg(db):
        with open_store(db) as s:
            assert s.integrity_check() == []
            stored = s.existing_ids(printed)
    else:
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {r[0] for r in conn.execute("SELECT request_id FROM records")}
        conn.close()
    missing = [rid for rid in printed if rid not in stored]
    assert not missing, f"{len(missing)} acknowledged records lost, e.g. {missing[:3]}"


# -------------------------------------------------------------------------------------------- PII


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")


def test_pii_masks_realistic_text():
    p = PiiPolicy("mask", extra_patterns=[r"EMP-\d{6}"])
    text = ("Hi, I'm Dana (dana.smith+work@acme-corp.co.uk, employee EMP-004211). Call me on +44 20 7946 0958 "
            "or (415) 555-0134 / 415-555-0199. Card 4111 1111 1111 1111 exp 09/27, Amex 3782-822463-10005. "
            "Our VPN gateway is 203.0.113.45 and the v6 one 2001:db8:85a3::8a2e:370:7334.")
    out = p.apply(text)
    for secret in ("dana.smith", "EMP-004211", "7946", "555-0134", "555-0199", "4111", "3782", "203.0.113.45",
                   "2001:db8"):
        assert secret not in out, (secret, out)
    for tag in ("[EMAIL]", "[REDACTED]", "[PHONE]", "[CARD]", "[IP]"):
        assert tag in out
    assert "exp 09/27" in out and out.startswith("Hi, I'm Dana (")


@pytest.mark.parametrize("text, secret, tag", [
    ("my SSN is 123-45-6789, thanks", "123-45-6789", "[SSN]"),
    ("write to josé.garcía@correo.es today", "josé.garcía", "[EMAIL]"),
    ("或者发到 用户@例子.中国 吧", "用户@例子", "[EMAIL]"),
    ("card on the receipt: 4111.1111.1111.1111", "4111.1111", "[CARD]"),
    ("amex 3782.822463.10005 expires soon", "3782.822463", "[CARD]"),
])
def test_pii_masks_each_kind_that_slipped_through(text, secret, tag):
    out = PiiPolicy("mask").apply(text)
    assert secret not in out and tag in out, out


@pytest.mark.parametrize("text", [
    "Never issued: 000-12-3456, 666-12-3456, 912-34-5678; phone-like 555-12-34567; part no. 123-45-67890",
    "Dotted runs are not cards: 1.2.3.4.5.6.7.8.9.10.11.12.13 and 4111.1111.1111 (12 digits) and pi 3.14159265358979",
    "Upgrade to version 1.2.3.4, or pin foo==2.10.0.1 and v10.0.19041.1; python 3.11.4.1 works too",
    "Dates: 2024-01-15, 12/03/2023, 2024-01-15T12:30:45Z and 03.04.2024 at 12:30:45",
    "mask = 0xFFFFFFFF; id = '123e4567-e89b-12d3-a456-426614174000'; sha = 9f86d081884c7d659a2feaa0c55ad015",
    "arr = [5551234567, 4111, 1111, 1111, 1111]; np.array([415, 555, 134]); x[1:2:3]",
    "listen on localhost:8080 or 127.0.0.1:5432, bind 0.0.0.0, ipv6 loopback ::1, std::vector<int> v;",
    "ISBN 978-3-16-148410-0, ISBN-10 0-306-40615-2, order #4111111111111112, tracking 1Z999AA10123456784",
    "ts 1700000000000 ms, total $1,234,567.89, 3 + 4 = 7, MAC 00:1A:2B:3C:4D:5E",
    "git clone git@github.com:org/repo.git && npm i react@18.2.0 && pip install 'torch>=2.1.0'",
])
def test_pii_false_positive_traps(text):
    assert PiiPolicy("mask").apply(text) == text


def test_pii_off_and_messages():
    msgs = [{"role": "user", "content": "me@example.org"},
            {"role": "user", "content": [{"type": "text", "text": "ip 8.8.4.4"}]}]
    assert PiiPolicy("off").apply_messages(msgs) == msgs
    masked = PiiPolicy("mask").apply_messages(msgs)
    assert masked[0]["content"] == "[EMAIL]" and masked[1]["content"][0]["text"] == "ip [IP]"
    assert msgs[0]["content"] == "me@example.org"  # input untouched
    with pytest.raises(InvalidArgument):
        PiiPolicy("scramble")
    with pytest.raises(InvalidArgument):
        PiiPolicy("mask", extra_patterns=["(unclosed"])


def _cli(*argv: str) -> int:
    from cli import main

    return main(list(argv))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_loadable_by_datasets(tmp_path, db, fmt, capsys):
    import datasets

    with open_store(db) as s:
        s.write_many([rec(i, task="code" if i % 2 else "math", created_at=1_700_000_000.0 + i) for i in range(20)])
        s.write_many([rec("m", task="math", sampling={"seed": 7})])
        s.add_feedback("req-1", 1, correction="better answer")
    out = tmp_path / "out" / f"code.{fmt}"
    assert _cli("logs", "export", "--db", str(db), "--task", "code", "--since", "2023-11-14",
                "--until", "2023-11-14", "--format", fmt, "--out", str(out)) == 0
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # no half-written leftovers
    ds = datasets.load_dataset("json" if fmt == "jsonl" else "parquet", data_files=str(out), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 10 and set(ds["task"]) == {"code"}
    row = ds[0]
    assert row["request_id"] == "req-1" and row["messages"][1] == {"role": "user", "content": "question 1 ✓"}
    assert row["feedback_rating"] == 1 and row["feedback"][0]["correction"] == "better answer"
    assert json.loads(row["sampling_json"]) == {"max_tokens": 64, "temperature": 0.2}


def test_cli_stats_purge_forget_check(tmp_path, db, capsys):
    with open_store(db) as s:
        s.write_many([rec(1, created_at=time.time() - 100 * 86400), rec(2, client_id="carol"), rec(3)])
    assert _cli("logs", "stats", "--db", str(db), "--json") == 0
    assert json.loads(capsys.readouterr().out)["records"] == 3
    assert _cli("logs", "stats", "--db", str(db)) == 0
    assert "records per task" in capsys.readouterr().out
    assert _cli("logs", "purge", "--db", str(db), "--older-than-days", "30", "--yes") == 0
    assert _cli("logs", "forget", "--db", str(db), "--client-id", "carol", "--yes") == 0
    assert _cli("logs", "check", "--db", str(db)) == 0
    assert "ok" in capsys.readouterr().out.splitlines()[-1]
    with open_store(db) as s:
        assert [r.request_id for r in s.iter_records()] == ["req-3"]
    if is_pg(db):  # a refused login: one line naming the server, never the password; status 2
        user_host = db.split("://", 1)[1].split("@", 1)
        bad = f"postgresql://{user_host[0].split(':')[0]}:not-the-password@{user_host[1]}"
        assert _cli("logs", "check", "--db", bad) == 2
        e = capsys.readouterr().err
        assert "not-the-password" not in e and user_host[1] in e and len(e.strip().splitlines()) == 1
        return
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"\x00garbage" * 1000)
    assert _cli("logs", "check", "--db", str(bad)) == 2  # FailedPrecondition -> one line, status 2
    assert str(bad) in capsys.readouterr().err


def test_import_sharegpt_idempotent(db):
    from convlog.sharegpt_import import import_sharegpt

    def classify(texts):
        return [("code" if "def " in t or "```" in t else "general", 0.5) for t in texts]

    with open_store(db) as s:
        first = import_sharegpt(s, limit=300, classify=classify, progress=False, batch_size=128)
        assert first.seen == 300 and first.imported + first.skipped_invalid + first.skipped_duplicate == 300
        assert first.imported > 250
        again = import_sharegpt(s, limit=300, classify=classify, progress=False)
        assert again.imported == 0 and again.skipped_duplicate == first.imported + first.skipped_duplicate
        records = list(s.iter_records(source="import"))
        assert len(records) == first.imported
        r = records[0]
        assert r.request_id.startswith("sharegpt-") and r.response_text and r.task in ("code", "general")
        assert r.messages and r.messages[-1]["role"] in ("user", "system", "assistant")
        assert any(m["role"] == "user" for m in r.messages)
        assert s.stats()["by_source"] == {"import": first.imported}


def test_import_sharegpt_classifies_last_non_empty_user_turn(db):
    # real ShareGPT has empty user turns; the classifier refuses empty text, so the last non-empty one is sent
    from convlog.sharegpt import Conversation
    from convlog.sharegpt_import import import_sharegpt

    conv = Conversation("x1", ({"role": "user", "content": "fix my SQL"}, {"role": "assistant", "content": "ok"},
                               {"role": "user", "content": "  "}, {"role": "assistant", "content": "SELECT 1;"}))
    seen = []

    def classify(texts):
        assert all(t.strip() for t in texts)
        seen.extend(texts)
        return [("code", 0.9) for _ in texts]

    with open_store(db) as s:
        res = import_sharegpt(s, classify=classify, progress=False, conversations=[conv])
        assert res.imported == 1 and seen == ["fix my SQL"]
        assert s.get("sharegpt-x1").task == "code"


def test_cli_import_without_classifier_flag(db, capsys):
    assert _cli("logs", "import", "sharegpt", "--db", str(db), "--limit", "20", "--no-classify", "--no-progress",
                "--json") == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["seen"] == 20 and counts["imported"] + counts["skipped_invalid"] + counts["skipped_duplicate"] == 20
