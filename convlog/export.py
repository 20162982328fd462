"""Export log records (with their feedback) as JSONL or Parquet that `datasets.load_dataset` reads.

Row layout (one per record): every `LogRecord` field, except that `messages` is normalized to
`[{"role": str, "content": str}]` (non-string content JSON-encoded) and `sampling` is a JSON string
(`sampling_json`) so rows with different sampling keys share one Arrow schema. Feedback is appended as
`feedback` (list of {rating, correction, comment, created_at}) and `feedback_rating` (the latest, or null).

Files are written to a temporary name in the target directory, fsynced, then renamed: a reader never
sees a half-written export.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Iterator

from convlog.schema import LogRecord
from convlog.store import LogStore, TimeLike
from core.errors import InvalidArgument
from core.files import atomic_path

FORMATS = ("jsonl", "parquet")
_CHUNK = 1000


def _norm_messages(msgs: list) -> list[dict]:
    out = []
    for m in msgs or []:
        c = m.get("content", "")
        out.append({"role": str(m.get("role", "")), "content": c if isinstance(c, str) else json.dumps(c, ensure_ascii=False)})
    return out


def rows(store: LogStore, *, task: str | None = None, since: TimeLike = None, until: TimeLike = None,
         source: str | None = None, status: str | None = None) -> Iterator[dict]:
    """Export rows, oldest first, with feedback attached (streamed in chunks)."""
    chunk: list[LogRecord] = []

    def flush() -> Iterator[dict]:
        fb = store.feedback_for(r.request_id for r in chunk)
        for r in chunk:
            d = dataclasses.asdict(r)
            d["messages"] = _norm_messages(r.messages)
            d["sampling_json"] = json.dumps(d.pop("sampling") or {}, ensure_ascii=False, sort_keys=True)
            items = fb.get(r.request_id, [])
            d["feedback"] = [{"rating": f.rating, "correction": f.correction, "comment": f.comment,
                              "created_at": f.created_at} for f in items]
            d["feedback_rating"] = items[-1].rating if items else None
            yield d

    for r in store.iter_records(task=task, since=since, until=until, source=source, status=status):
        chunk.append(r)
        if len(chunk) >= _CHUNK:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()


def arrow_schema():
    # lazy: pyarrow costs ~0.4 s to import; only Parquet export needs it
    import pyarrow as pa

    types = {"str": pa.string(), "float": pa.float64(), "int": pa.int64(), "bool": pa.bool_()}
    fields = []
    for f in dataclasses.fields(LogRecord):
        if f.name == "messages":
            fields.append(pa.field("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))))
        elif f.name == "sampling":
            continue
        else:
            fields.append(pa.field(f.name, types.get(str(f.type), pa.string())))
    fields.append(pa.field("sampling_json", pa.string()))
    fields.append(pa.field("feedback", pa.list_(pa.struct([("rating", pa.int64()), ("correction", pa.string()),
                                                           ("comment", pa.string()), ("created_at", pa.float64())]))))
    fields.append(pa.field("feedback_rating", pa.int64()))
    return pa.schema(fields)


def write_export(row_iter: Iterable[dict], out: str | os.PathLike, fmt: str) -> int:
    """Write rows to `out` atomically; returns the row count."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    n = 0
    with atomic_path(out) as tmp:
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as fh:
                for d in row_iter:
                    fh.write(json.dumps(d, ensure_ascii=False))
                    fh.write("\n")
                    n += 1
        else:
            # lazy: pyarrow costs ~0.4 s to import; only Parquet export needs it
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = arrow_schema()
            with pq.ParquetWriter(str(tmp), schema) as w:
                buf: list[dict] = []
                for d in row_iter:
                    buf.append(d)
                    n += 1
                    if len(buf) >= _CHUNK:
                        w.write_table(pa.Table.from_pylist(buf, schema=schema))
                        buf = []
                if buf or n == 0:
                    w.write_table(pa.Table.from_pylist(buf, schema=schema))
    return n
