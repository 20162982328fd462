"""`specialist-router logs ...`: inspect, export, import, purge and check the conversation log store.

    logs stats [--json]
    logs export --out FILE [--task T] [--since YYYY-MM-DD] [--until YYYY-MM-DD] [--format jsonl|parquet]
    logs import-sharegpt [--limit N] [--no-classify] [--classifier PATH]   (alias: logs import sharegpt)
    logs purge --older-than-days N
    logs forget --client-id ID
    logs check

Every command takes `--db PATH` (default: `core.paths.logs_db()`). Each is a `main(args) -> int`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

import classifier
from convlog.export import rows, write_export
from convlog.pii import PiiPolicy
from convlog.sharegpt_import import Classify, import_sharegpt
from convlog.store import LogWriteError, open_store
from core.errors import FailedPrecondition
from core.paths import logs_db


def load_classifier(path: str | None = None) -> Classify:
    """The classifier (`path`, or the default artifact, built on first use) as a batched callable."""
    try:
        clf = classifier.load(path) if path else classifier.load(classifier.ensure_default())
    except Exception as exc:  # noqa: BLE001 - any failure to load is reported the same way
        raise FailedPrecondition(f"cannot load a classifier{' from ' + path if path else ''} ({exc}); train one "
                                 f"first (`specialist-router classifier train`) or pass --no-classify") from exc
    return lambda texts: [(str(t), float(c)) for t, c in clf.predict(texts)]


def _open(args, *, read_only: bool | None = None):
    if read_only:
        p = Path(args.db) if args.db else logs_db()
        if not p.exists():
            raise FailedPrecondition(f"no log database at {p} (nothing logged yet, or pass --db PATH)")
    return open_store(args.db or None, read_only=read_only)


def _fmt_ts(ts: float | None) -> str:
    if ts is None:
        return "-"
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ------------------------------------------------------------------------------------------ commands


def stats_main(args) -> int:
    with _open(args, read_only=None) as store:
        s = store.stats()
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    con = Console()
    fb = s["feedback"]
    con.print(f"[bold]{s['path']}[/bold]  schema v{s['schema_version']}, {s['size_bytes'] / 1e6:.1f} MB")
    con.print(f"{s['records']:,} records from {_fmt_ts(s['first_at'])} to {_fmt_ts(s['last_at'])}; "
              f"feedback on {fb['records_with_feedback']:,} ({fb['feedback_rate']:.1%}), "
              f"{fb['negative']:,} negative ({fb['negative_rate']:.1%}), mean rating "
              f"{fb['mean_rating']:.2f}" if fb["mean_rating"] is not None else
              f"{s['records']:,} records from {_fmt_ts(s['first_at'])} to {_fmt_ts(s['last_at'])}; no feedback")
    for title, key in (("task", "by_task"), ("adapter", "by_adapter"), ("source", "by_source"),
                       ("status", "by_status"), ("day (UTC)", "by_day")):
        t = Table(title=f"records per {title}", title_justify="left")
        t.add_column(title)
        t.add_column("records", justify="right")
        if key == "by_task":
            t.add_column("with feedback", justify="right")
            t.add_column("negative", justify="right")
        items = list(s[key].items())
        if key == "by_day" and len(items) > 31:
            items = items[-31:]
            t.caption = "last 31 days with records"
        for k, n in items:
            row = [k or "(none)", f"{n:,}"]
            if key == "by_task":
                f = fb["by_task"].get(k, {})
                row += [f"{f.get('records_with_feedback', 0):,}", f"{f.get('negative', 0):,}"]
            t.add_row(*row)
        con.print(t)
    return 0


def export_main(args) -> int:
    with _open(args, read_only=None) as store:
        n = write_export(rows(store, task=args.task, since=args.since, until=args.until, source=args.source,
                              status=args.status), args.out, args.format)
    print(f"exported {n:,} records to {args.out} ({args.format})")
    return 0


def import_sharegpt_main(args) -> int:
    classify = None if args.no_classify else load_classifier(args.classifier)
    policy = PiiPolicy(args.pii)
    with _open(args, read_only=False) as store:
        res = import_sharegpt(store, limit=args.limit, classify=classify, pii_policy=policy,
                              batch_size=args.batch_size, progress=not args.no_progress)
    if args.json:
        print(json.dumps(res.as_dict()))
    else:
        print(f"seen {res.seen:,} conversations: imported {res.imported:,}, skipped {res.skipped_duplicate:,} "
              f"already present, {res.skipped_invalid:,} without a usable exchange ({res.seconds:.1f} s)")
    return 0


def purge_main(args) -> int:
    with _open(args, read_only=False) as store:
        n = store.delete_older_than(args.older_than_days)
    print(f"deleted {n:,} records older than {args.older_than_days:g} days (and their feedback)")
    return 0


def forget_main(args) -> int:
    with _open(args, read_only=False) as store:
        n = store.delete_client(args.client_id)
    print(f"deleted {n:,} records of client {args.client_id!r} (and their feedback)")
    return 0


def check_main(args) -> int:
    with _open(args, read_only=True) as store:
        problems = store.integrity_check()
    if problems:
        for p in problems:
            print(f"problem: {p}")
        return 1
    print(f"{store.path}: ok")
    return 0


def _guard(fn):
    """Write failures (read-only store, full disk) -> one line, exit status 1."""

    def main(args) -> int:
        try:
            return fn(args)
        except LogWriteError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    main.__name__ = fn.__name__
    main.__doc__ = fn.__doc__
    return main


# ------------------------------------------------------------------------------------------- parser


def add_commands(subparsers) -> None:
    logs = subparsers.add_parser("logs", help="Conversation log store: stats, export, import, purge, forget, check.",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = logs.add_subparsers(dest="logs_command", metavar="LOGS_COMMAND")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=None, help="SQLite log database (default: <data dir>/logs/router.sqlite3)")

    p = sub.add_parser("stats", parents=[common], help="Counts per task / adapter / day and feedback rates.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_guard(stats_main))

    p = sub.add_parser("export", parents=[common], help="Write records (+ feedback) as JSONL or Parquet.")
    p.add_argument("--out", required=True, help="output file (written atomically)")
    p.add_argument("--format", choices=("jsonl", "parquet"), default=None,
                   help="default: from the --out suffix (.parquet -> parquet, else jsonl)")
    p.add_argument("--task", default=None, help="only this task")
    p.add_argument("--since", default=None, help="YYYY-MM-DD (inclusive, UTC) or ISO timestamp")
    p.add_argument("--until", default=None, help="YYYY-MM-DD (inclusive day, UTC) or ISO timestamp (exclusive)")
    p.add_argument("--source", default=None, choices=("live", "import"), help="only live traffic or imports")
    p.add_argument("--status", default=None, help="only this status (ok | error | cancelled)")
    p.set_defaults(func=_guard(_export_with_format))

    for name, aliases in (("import-sharegpt", []), ("import", [])):
        p = sub.add_parser(name, aliases=aliases, parents=[common],
                           help="Import real ShareGPT conversations as source=import records (idempotent).")
        if name == "import":
            p.add_argument("dataset", choices=("sharegpt",), help="what to import")
        p.add_argument("--limit", type=int, default=None, help="first N conversations (default: all, ~17.6k)")
        p.add_argument("--no-classify", action="store_true", help="store without task/confidence")
        p.add_argument("--classifier", default=None, help="classifier artifact path (default: classifier.load())")
        p.add_argument("--pii", choices=("off", "mask"), default="off", help="PII policy applied before storing")
        p.add_argument("--batch-size", type=int, default=256, help="conversations per classifier call / transaction")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--json", action="store_true", help="print the counts as JSON")
        p.set_defaults(func=_guard(import_sharegpt_main))

    p = sub.add_parser("purge", parents=[common], help="Retention: delete records older than N days.")
    p.add_argument("--older-than-days", type=float, required=True)
    p.set_defaults(func=_guard(purge_main))

    p = sub.add_parser("forget", parents=[common], help="Delete every record and feedback of one client.")
    p.add_argument("--client-id", required=True)
    p.set_defaults(func=_guard(forget_main))

    p = sub.add_parser("check", parents=[common], help="SQLite integrity + foreign-key + schema version check.")
    p.set_defaults(func=_guard(check_main))


def _export_with_format(args) -> int:
    if args.format is None:
        args.format = "parquet" if str(args.out).endswith(".parquet") else "jsonl"
    return export_main(args)
