"""Import real ShareGPT conversations into the log store as `source="import"` records.

Each conversation becomes one record: `messages` = every turn before the last assistant turn,
`response_text` = that last assistant turn. `request_id = "sharegpt-<conversation id>"`, so a re-run
inserts nothing new (INSERT OR IGNORE; already-stored ids are not even classified again).
`task`/`confidence` come from an optional batched classifier callable (texts -> [(task, confidence)]),
applied to the last non-empty user turn, i.e. the prompt the response answers.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from convlog.pii import PiiPolicy
from convlog.schema import LogRecord
from convlog.sharegpt import iter_conversations
from convlog.store import LogStore

Classify = Callable[[list[str]], list[tuple[str, float]]]
REQUEST_ID_PREFIX = "sharegpt-"


@dataclasses.dataclass
class ImportResult:
    seen: int = 0  # conversations read
    imported: int = 0  # new records written
    skipped_duplicate: int = 0  # already in the store (earlier run, or a repeated id)
    skipped_invalid: int = 0  # no id, or no assistant turn answering a user turn
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def conversation_to_record(conv, *, created_at: float) -> LogRecord | None:
    """The record for one `router.sharegpt.Conversation`, or None when it has no usable exchange."""
    if not conv.id:
        return None
    msgs = list(conv.messages)
    last = None
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i]["role"] == "assistant" and msgs[i]["content"].strip():
            last = i
            break
    if last is None or not any(m["role"] == "user" and m["content"].strip() for m in msgs[:last]):
        return None
    return LogRecord(request_id=REQUEST_ID_PREFIX + conv.id, created_at=created_at,
                     messages=[{"role": m["role"], "content": m["content"]} for m in msgs[:last]],
                     response_text=msgs[last]["content"], source="import", finish_reason="stop",
                     route_reason="import")


def last_user_turn(messages: list[dict]) -> str:
    """The last user turn with text (ShareGPT has empty user turns; the classifier refuses empty text)."""
    for m in reversed(messages):
        if m["role"] == "user" and m["content"].strip():
            return m["content"]
    return ""


def _batches(it: Iterable, n: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def import_sharegpt(store: LogStore, *, limit: int | None = None, classify: Classify | None = None,
                    pii_policy: PiiPolicy | None = None, batch_size: int = 256, progress: bool = True,
                    conversations: Iterable | None = None) -> ImportResult:
    """Import (the first `limit`) ShareGPT conversations; idempotent. Returns the counts.

    `conversations` defaults to `convlog.sharegpt.iter_conversations(limit)`.
    """
    if conversations is None:
        conversations = iter_conversations(limit=limit)
    policy = pii_policy or PiiPolicy("off")
    res = ImportResult()
    t0 = time.perf_counter()
    created_at = time.time()

    bar = None
    if progress:
        bar = Progress(TextColumn("importing ShareGPT"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[rate]}"), transient=False, console=Console(stderr=True))
        bar.start()
        task_id = bar.add_task("import", total=limit, rate="")
    try:
        seen_ids: set[str] = set()
        for convs in _batches(conversations, batch_size):
            res.seen += len(convs)
            records = []
            for c in convs:
                r = conversation_to_record(c, created_at=created_at)
                if r is None:
                    res.skipped_invalid += 1
                elif r.request_id in seen_ids:
                    res.skipped_duplicate += 1  # the dataset repeats some ids
                else:
                    seen_ids.add(r.request_id)
                    records.append(r)
            existing = store.existing_ids(r.request_id for r in records)
            new = [r for r in records if r.request_id not in existing]
            res.skipped_duplicate += len(records) - len(new)
            if new and classify is not None:
                preds = classify([last_user_turn(r.messages) for r in new])
                if len(preds) != len(new):
                    raise RuntimeError(f"classifier returned {len(preds)} predictions for {len(new)} texts")
                for r, (task, conf) in zip(new, preds):
                    r.task, r.confidence = str(task), float(conf)
            new = [policy.apply_record(r) for r in new]
            inserted = store.write_many(new)
            res.imported += inserted
            res.skipped_duplicate += len(new) - inserted  # raced with another importer
            if bar is not None:
                el = time.perf_counter() - t0
                bar.update(task_id, completed=res.seen, rate=f"{res.seen / el:,.0f} conv/s" if el else "")
    finally:
        if bar is not None:
            bar.stop()
    res.seconds = time.perf_counter() - t0
    return res
