"""Import chat datasets from local files into the log store: OpenAI-messages JSONL, and Hugging Face datasets
(a `save_to_disk` folder, or Arrow / Parquet files) with a `messages` column.

One row = one conversation:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...],   # ends with the answer
     "task": "code",                                                               # optional label
     "feedback": {"rating": 1..5, "correction": "...", "comment": "..."}}          # optional
`content` is a string (or OpenAI text parts `[{"type": "text", "text": ...}]`); other keys of a row are ignored.
The last message is the assistant's answer (`response_text`); every message before it is the prompt
(`messages`), which needs a non-empty user turn. A `task` label wins over the classifier (confidence 1.0);
rows without one are classified on their last non-empty user turn, like the ShareGPT importer.

All or nothing: every row is read and checked first. Any bad row (invalid JSON, no messages, unknown role, no
assistant answer, bad rating, a task the classifier does not know, ...) and nothing is written: `BadRows` lists
every problem with its place (JSONL: `line N`, 1-based; datasets: `row N`, 0-based as in `dataset[N]`, with the
split or file). A clean input is then written in ONE store transaction (`LogStore.write_with_feedback`), so a
crash or a full disk leaves the store as it was.

Records: `source="import"`, `route_reason="import"`, `finish_reason="stop"`, `created_at` = import time,
`request_id = "import-<sha256 of the conversation>"` (the same id from either format): importing a conversation
again inserts nothing new, and its feedback is stored once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from convlog.pii import PiiPolicy
from convlog.schema import LogRecord
from convlog.sharegpt_import import Classify, last_user_turn
from convlog.store import LogStore
from core.errors import InvalidArgument

REQUEST_ID_PREFIX = "import-"
ROLES = ("system", "user", "assistant")
FEEDBACK_KEYS = ("rating", "correction", "comment")
MAX_SHOWN = 20  # problems named in the error message (all of them are in BadRows.problems)
_TASK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# loads the classifier on demand (after the rows are checked): () -> (classify, the tasks it knows)
ClassifierFactory = Callable[[], tuple[Classify, list[str]]]


class RowError(ValueError):
    """What is wrong with one row."""


class BadRows(InvalidArgument):
    """Some rows are bad; nothing was imported. `problems` = [(where, what)], every one of them."""

    def __init__(self, path: str, problems: list[tuple[str, str]], seen: int):
        shown = "; ".join(f"{w}: {e}" for w, e in problems[:MAX_SHOWN])
        more = f"; ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        super().__init__(f"{path}: {len(problems)} of {seen} rows are bad, nothing was imported: {shown}{more}. "
                         "Fix or remove those rows and run the import again")
        self.path, self.problems, self.seen = path, problems, seen

    def as_dict(self) -> dict:
        return {"path": self.path, "seen": self.seen, "bad": len(self.problems), "imported": 0,
                "errors": [{"where": w, "error": e} for w, e in self.problems]}


@dataclasses.dataclass
class DatasetImportResult:
    format: str
    path: str
    seen: int = 0  # rows read
    imported: int = 0  # new records written
    skipped_duplicate: int = 0  # already in the store, or repeated in the input
    labeled: int = 0  # new records whose task came from the input
    classified: int = 0  # new records whose task came from the classifier
    feedback: int = 0  # feedback rows written
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ParsedRow:
    where: str
    record: LogRecord
    task: str  # "" = no label
    feedback: tuple[int, str, str] | None  # (rating, correction, comment)


# ------------------------------------------------------------------------------------------------ one row


def _content(value: Any, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in value):
        return "".join(p["text"] for p in value)  # OpenAI content parts, text only
    raise RowError(f"messages[{i}].content must be a string (or a list of text parts), got {type(value).__name__}")


def _feedback(value: Any) -> tuple[int, str, str] | None:
    if value is None or (isinstance(value, dict) and all(v is None for v in value.values())):
        return None  # a datasets struct column stores "no feedback" as all-null fields
    if not isinstance(value, dict):
        raise RowError(f"feedback must be an object {{rating, correction, comment}}, got {type(value).__name__}")
    unknown = sorted(set(value) - set(FEEDBACK_KEYS))
    if unknown:
        raise RowError(f"feedback has unknown keys {unknown} (allowed: {', '.join(FEEDBACK_KEYS)})")
    rating = value.get("rating")
    if isinstance(rating, float) and rating.is_integer():
        rating = int(rating)
    if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
        raise RowError(f"feedback.rating must be an integer 1..5, got {rating!r}")
    texts = []
    for key in ("correction", "comment"):
        v = value.get(key)
        if v is not None and not isinstance(v, str):
            raise RowError(f"feedback.{key} must be a string, got {type(v).__name__}")
        texts.append(v or "")
    return rating, texts[0], texts[1]


def conversation_id(messages: list[dict], answer: str) -> str:
    payload = json.dumps([messages, answer], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return REQUEST_ID_PREFIX + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def parse_row(obj: Any, where: str, *, created_at: float) -> ParsedRow:
    """The record (and label, feedback) of one row; RowError saying what is wrong otherwise."""
    if not isinstance(obj, dict):
        raise RowError(f"a row must be a JSON object with a \"messages\" list, got {type(obj).__name__}")
    msgs = obj.get("messages")
    if msgs is None:
        raise RowError("no \"messages\" (a list of {role, content} ending with the assistant's answer)")
    if not isinstance(msgs, list) or not msgs:
        raise RowError("\"messages\" must be a non-empty list of {role, content}")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(f"messages[{i}] must be an object {{role, content}}, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise RowError(f"messages[{i}] has role {role!r}; use one of {', '.join(ROLES)}")
        if "content" not in m:
            raise RowError(f"messages[{i}] has no content")
        clean.append({"role": role, "content": _content(m["content"], i)})
    if clean[-1]["role"] != "assistant" or not clean[-1]["content"].strip():
        raise RowError("no assistant answer: the last message must be a non-empty assistant turn")
    prompt, answer = clean[:-1], clean[-1]["content"]
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise RowError("no user turn before the answer")
    task = obj.get("task")
    if task is None:
        task = ""
    elif not isinstance(task, str) or not _TASK.match(task.strip()):
        raise RowError(f"task must be a task name (letters, digits, '_', '-', '.'), got {task!r}")
    task = task.strip()
    fb = _feedback(obj.get("feedback"))
    rec = LogRecord(request_id=conversation_id(prompt, answer), created_at=created_at, messages=prompt,
                    response_text=answer, source="import", finish_reason="stop", route_reason="import",
                    task=task, confidence=1.0 if task else 0.0)
    return ParsedRow(where, rec, task, fb)


# ------------------------------------------------------------------------------------------------ readers


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(`line N`, the parsed object or a RowError) per non-blank line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidArgument(f"{p} is not a file; pass the JSONL file to import (one {{\"messages\": [...]}} per line)")
    with p.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield f"line {n}", RowError(f"not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"line {n}", RowError(f"invalid JSON ({exc.msg} at column {exc.colno})")


def _check_columns(names: list[str], where: str) -> None:
    if "messages" not in names:
        raise InvalidArgument(f"{where} has no \"messages\" column (columns: {', '.join(names) or 'none'}); the rows "
                              "need messages = [{role, content}, ...] ending with the assistant's answer")


def _rows_of_table_batches(batches: Iterable, prefix: str) -> Iterator[tuple[str, Any]]:
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{prefix}row {i}", row
            i += 1


def _arrow_file_batches(path: Path):
    # lazy: pyarrow costs ~0.3 s to import; only Arrow/Parquet imports need it
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        f = pq.ParquetFile(str(path))
        names = f.schema_arrow.names
        return names, f.iter_batches(batch_size=1024, columns=[c for c in ("messages", "task", "feedback") if c in names])
    try:  # save_to_disk writes the streaming format; others write the file format
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        return reader.schema.names, (reader.get_batch(i) for i in range(reader.num_record_batches))
    return reader.schema.names, reader


def iter_hf(path: str | Path, split: str | None = None) -> Iterator[tuple[str, Any]]:
    """(`[split or file ]row N`, row dict) of a local dataset: a `save_to_disk` folder (Dataset or DatasetDict),
    one .parquet / .arrow file, or a folder of them. Never downloads anything."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InvalidArgument(f"{p} does not exist; pass a local dataset folder (saved with save_to_disk) or "
                              ".parquet/.arrow files (nothing is downloaded)")
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        # lazy: datasets costs ~1 s to import; only this import format needs it
        import datasets

        ds = datasets.load_from_disk(str(p))
        parts = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"": ds}
        if split is not None:
            if split not in parts:
                raise InvalidArgument(f"{p} has no split {split!r} (splits: {', '.join(parts) or 'none'})")
            parts = {split: parts[split]}
        for name, d in parts.items():
            _check_columns(list(d.column_names), f"{p}" + (f" split {name}" if name else ""))
        for name, d in parts.items():
            cols = [c for c in ("messages", "task", "feedback") if c in d.column_names]
            yield from _rows_of_table_batches(d.select_columns(cols).with_format("arrow").iter(batch_size=1024),
                                              f"split {name} " if name else "")
        return
    if split is not None:
        raise InvalidArgument(f"--split applies to a save_to_disk DatasetDict folder, and {p} is not one")
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".parquet", ".arrow"))
    if not files or any(f.suffix not in (".parquet", ".arrow") for f in files):
        raise InvalidArgument(f"{p} is neither a dataset saved with save_to_disk nor .parquet/.arrow files")
    opened = []
    for f in files:
        try:
            names, batches = _arrow_file_batches(f)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for an unreadable file
            raise InvalidArgument(f"{f} cannot be read as {f.suffix[1:]} ({type(exc).__name__}: {exc})") from exc
        _check_columns(list(names), str(f))
        opened.append((f, batches))
    for f, batches in opened:
        yield from _rows_of_table_batches(batches, f"{f.name} " if len(files) > 1 else "")


# ------------------------------------------------------------------------------------------------- import


@dataclasses.dataclass
class CheckedRows:
    """Rows that passed every check (nothing written yet), and the classifier for the unlabeled ones."""

    fmt: str
    path: str
    seen: int
    rows: list  # [ParsedRow]
    classify: Classify | None
    seconds: float


def check_rows(rows: Iterable[tuple[str, Any]], *, fmt: str, path: str, classifier: ClassifierFactory | None = None,
               limit: int | None = None) -> CheckedRows:
    """Read and check every row (then the labels against the classifier's tasks); BadRows names every bad one.
    Nothing is written; the classifier is loaded only once the rows themselves are fine."""
    if limit is not None and limit < 1:
        raise InvalidArgument(f"--limit must be >= 1, got {limit}")
    t0 = time.perf_counter()
    created_at = time.time()
    seen = 0
    parsed: list[ParsedRow] = []
    problems: list[tuple[str, str]] = []
    for where, obj in rows:
        if limit is not None and seen >= limit:
            break
        seen += 1
        try:
            if isinstance(obj, RowError):
                raise obj
            parsed.append(parse_row(obj, where, created_at=created_at))
        except RowError as exc:
            problems.append((where, str(exc)))
    if seen == 0:
        raise InvalidArgument(f"{path} has no rows to import")
    if problems:
        raise BadRows(path, problems, seen)
    classify, tasks = classifier() if classifier is not None else (None, None)
    if tasks is not None:
        known = set(tasks)
        problems = [(r.where, f"task {r.task!r} is not one of the classifier's tasks ({', '.join(tasks)})")
                    for r in parsed if r.task and r.task not in known]
        if problems:
            raise BadRows(path, problems, seen)
    return CheckedRows(fmt, path, seen, parsed, classify, time.perf_counter() - t0)


def write_rows(store: LogStore, checked: CheckedRows, *, pii_policy: PiiPolicy | None = None, batch_size: int = 256,
               progress: bool = True) -> DatasetImportResult:
    """Classify the new unlabeled rows, then write every new record and all feedback in ONE transaction."""
    if batch_size < 1:
        raise InvalidArgument(f"--batch-size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    res = DatasetImportResult(format=checked.fmt, path=checked.path, seen=checked.seen)
    by_id: dict[str, ParsedRow] = {}
    feedback: list[tuple[str, int, str, str]] = []
    policy = pii_policy or PiiPolicy("off")
    for r in checked.rows:
        rid = r.record.request_id
        if rid in by_id:
            res.skipped_duplicate += 1
        else:
            by_id[rid] = r
        if r.feedback is not None:
            rating, correction, comment = r.feedback
            feedback.append((rid, rating, policy.apply(correction), policy.apply(comment)))
    existing = store.existing_ids(by_id)
    new = [r for rid, r in by_id.items() if rid not in existing]
    res.skipped_duplicate += len(by_id) - len(new)
    unlabeled = [r for r in new if not r.task]
    if checked.classify is not None and unlabeled:
        _classify(unlabeled, checked.classify, batch_size, progress)
        res.classified = len(unlabeled)
    res.labeled = sum(1 for r in new if r.task)
    records = [policy.apply_record(r.record) for r in new]
    inserted, res.feedback = store.write_with_feedback(records, feedback)
    res.imported = inserted
    res.skipped_duplicate += len(records) - inserted  # raced with another importer
    res.seconds = checked.seconds + time.perf_counter() - t0
    return res


def _classify(rows: list[ParsedRow], classify: Classify, batch_size: int, progress: bool) -> None:
    bar = None
    if progress:
        bar = Progress(TextColumn("classifying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=Console(stderr=True))
        bar.start()
        task_id = bar.add_task("classify", total=len(rows))
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            preds = classify([last_user_turn(r.record.messages) for r in chunk])
            if len(preds) != len(chunk):
                raise RuntimeError(f"classifier returned {len(preds)} predictions for {len(chunk)} texts")
            for r, (task, conf) in zip(chunk, preds):
                r.record.task, r.record.confidence = str(task), float(conf)
            if bar is not None:
                bar.update(task_id, completed=i + len(chunk))
    finally:
        if bar is not None:
            bar.stop()


def read_jsonl(path: str | Path, *, classifier: ClassifierFactory | None = None,
               limit: int | None = None) -> CheckedRows:
    """`logs import jsonl FILE`, first half: every line read and checked (see the module doc)."""
    return check_rows(iter_jsonl(path), fmt="jsonl", path=str(path), classifier=classifier, limit=limit)


def read_hf(path: str | Path, *, split: str | None = None, classifier: ClassifierFactory | None = None,
            limit: int | None = None) -> CheckedRows:
    """`logs import hf PATH`, first half: every row read and checked (see the module doc)."""
    return check_rows(iter_hf(path, split), fmt="hf", path=str(path), classifier=classifier, limit=limit)


def import_jsonl(store: LogStore, path: str | Path, *, classifier: ClassifierFactory | None = None,
                 limit: int | None = None, **kw) -> DatasetImportResult:
    """Check, then write (`kw` as `write_rows`)."""
    return write_rows(store, read_jsonl(path, classifier=classifier, limit=limit), **kw)


def import_hf(store: LogStore, path: str | Path, *, split: str | None = None,
              classifier: ClassifierFactory | None = None, limit: int | None = None, **kw) -> DatasetImportResult:
    """Check, then write (`kw` as `write_rows`)."""
    return write_rows(store, read_hf(path, split=split, classifier=classifier, limit=limit), **kw)
