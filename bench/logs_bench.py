"""Benchmark the conversation log store.

1. ShareGPT import speed (conversations/s): parse only, import without a classifier, and import with the
   real classifier (`classifier.load()`) when it can be loaded.
2. AsyncLogWriter: throughput (records/s) and the latency one `await writer.write()` adds to a request
   (p50/p99), at concurrency 1 and 8 (N concurrent request tasks each writing one record after another),
   with the store's default `synchronous=FULL` and, for comparison, NORMAL.

Records are real ShareGPT exchanges (messages + response). Results as a table and `--json FILE`.

    .venv/bin/python bench/logs_bench.py [--import-n 2000] [--writes 2000] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli.logs import load_classifier  # noqa: E402
from convlog.sharegpt import iter_conversations  # noqa: E402
from convlog.sharegpt_import import conversation_to_record, import_sharegpt  # noqa: E402
from convlog.store import SQLiteLogStore, open_store  # noqa: E402
from convlog.writer import AsyncLogWriter  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def bench_import(n: int, tmp: Path) -> dict:
    out = {}
    t0 = time.perf_counter()
    convs = list(iter_conversations(limit=n))
    parse_s = time.perf_counter() - t0
    out["parse_only_conv_per_s"] = n / parse_s
    with open_store(tmp / "import.sqlite3") as s:
        res = import_sharegpt(s, limit=n, progress=False)
        out["no_classifier"] = {"conv_per_s": res.seen / res.seconds, **res.as_dict()}
        again = import_sharegpt(s, limit=n, progress=False)
        out["rerun_idempotent"] = {"conv_per_s": again.seen / again.seconds, **again.as_dict()}
    try:
        classify = load_classifier(None)
    except Exception as exc:  # noqa: BLE001
        out["with_classifier"] = {"skipped": str(exc)}
    else:
        with open_store(tmp / "import_clf.sqlite3") as s:
            res = import_sharegpt(s, limit=n, classify=classify, progress=False)
            out["with_classifier"] = {"conv_per_s": res.seen / res.seconds, **res.as_dict()}
    del convs
    return out


def sample_records(k: int) -> list:
    recs = []
    for c in iter_conversations(limit=k * 2):
        r = conversation_to_record(c, created_at=time.time())
        if r is not None:
            recs.append(r)
        if len(recs) >= k:
            break
    return recs


async def bench_writer(records: list, n: int, concurrency: int, path: Path, synchronous: str) -> dict:
    store = SQLiteLogStore(path, synchronous=synchronous)
    writer = AsyncLogWriter(store)
    lat: list[float] = []
    counter = iter(range(n))

    async def worker():
        for i in counter:
            r = dataclasses.replace(records[i % len(records)], request_id=f"bench-{concurrency}-{i}",
                                    created_at=time.time())
            t = time.perf_counter()
            await writer.write(r)
            lat.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    el = time.perf_counter() - t0
    commits = writer.commits
    await writer.close()
    store.close()
    return {"synchronous": synchronous, "concurrency": concurrency, "records": n, "records_per_s": n / el,
            "p50_ms": statistics.median(lat), "p99_ms": pct(lat, 0.99), "commits": commits,
            "records_per_commit": n / commits}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--import-n", type=int, default=2000)
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dir", default=None, help="where the benchmark databases go (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    tmpctx = tempfile.TemporaryDirectory(dir=args.dir)
    tmp = Path(tmpctx.name)
    result = {"python": platform.python_version(), "cpus": os.cpu_count(), "dir": str(tmp)}
    print(f"import of {args.import_n} ShareGPT conversations ...", flush=True)
    result["import"] = imp = bench_import(args.import_n, tmp)
    print(f"  parse only        {imp['parse_only_conv_per_s']:9,.0f} conv/s")
    print(f"  import, no clf    {imp['no_classifier']['conv_per_s']:9,.0f} conv/s "
          f"(imported {imp['no_classifier']['imported']})")
    print(f"  re-run (no-op)    {imp['rerun_idempotent']['conv_per_s']:9,.0f} conv/s")
    wc = imp["with_classifier"]
    print("  import, with clf  " + (f"{wc['conv_per_s']:9,.0f} conv/s" if "conv_per_s" in wc else f"skipped: {wc['skipped']}"))
    records = sample_records(500)
    avg = statistics.mean(len(json.dumps(r.messages)) + len(r.response_text) for r in records)
    result["record_avg_chars"] = avg
    print(f"AsyncLogWriter, {args.writes} real ShareGPT records (avg {avg:,.0f} chars) ...", flush=True)
    result["writer"] = []
    for sync in ("FULL", "NORMAL"):
        for c in args.concurrency:
            w = asyncio.run(bench_writer(records, args.writes, c, tmp / f"w-{sync}-{c}.sqlite3", sync))
            result["writer"].append(w)
            print(f"  synchronous={sync:6} concurrency={c:2}  {w['records_per_s']:8,.0f} rec/s  "
                  f"p50 {w['p50_ms']:6.2f} ms  p99 {w['p99_ms']:6.2f} ms  {w['records_per_commit']:5.1f} rec/commit")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    tmpctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
