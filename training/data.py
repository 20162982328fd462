"""Data stage: the task's logs -> filtered, scrubbed, deduplicated prompt/completion examples, split by conversation.

Every step counts records in and out and says why it dropped them (`DataReport`), so a run report shows
exactly which filter removed what. Order: select (task, window, source) -> failed/cancelled/truncated ->
classifier confidence -> feedback (negative dropped, corrections replace the answer) -> empty -> refusal ->
PII scrubbing -> exact duplicates -> near duplicates (MinHash) -> length in base-model tokens (a too-long
multi-turn record first loses its oldest turns, see `trim_history`) -> split.
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from convlog.pii import PiiPolicy
from convlog.schema import Feedback, LogRecord
from convlog.store import is_store_url, open_store
from core import paths
from core.errors import FailedPrecondition, InvalidArgument

REFUSAL_PATTERNS = (
    r"^\s*i'?m sorry,? but i (?:can(?:no|')t|am unable|won'?t)",
    r"^\s*i am sorry,? but i (?:can(?:no|')t|am unable|won'?t)",
    r"^\s*(?:sorry, )?i can(?:no|')t (?:help|assist|do|provide|comply) (?:with )?(?:that|this)",
    r"^\s*i'?m (?:not able|unable) to (?:help|assist|comply)",
    r"as an ai language model",
    r"^\s*i (?:must|have to) (?:decline|refuse)",
)
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)
_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class Example:
    """One training conversation: the prompt messages and the answer to learn."""

    request_id: str
    task: str
    prompt: list  # [{"role": ..., "content": ...}] ending before the answer
    completion: str
    corrected: bool = False

    def row(self) -> dict:
        """prompt/completion row in TRL's conversational format (completion-only loss with any chat template)."""
        return {"prompt": [dict(m) for m in self.prompt],
                "completion": [{"role": "assistant", "content": self.completion}],
                "request_id": self.request_id, "task": self.task}


@dataclass
class StepCount:
    step: str
    records_in: int
    records_out: int
    dropped: int
    note: str = ""


@dataclass
class DataReport:
    task: str
    records_in: int = 0
    steps: list = field(default_factory=list)  # [StepCount]
    corrected: int = 0  # answers replaced by a feedback correction
    pii_scrubbed: int = 0  # records whose text the PII policy changed
    history_trimmed: int = 0  # multi-turn records kept with their oldest turns cut to fit max_seq_len
    train: int = 0
    eval: int = 0

    @property
    def kept(self) -> int:
        return self.train + self.eval

    def dropped_by(self) -> dict:
        return {s.step: s.dropped for s in self.steps if s.dropped}

    def to_dict(self) -> dict:
        return {"task": self.task, "records_in": self.records_in, "kept": self.kept, "train": self.train,
                "eval": self.eval, "corrected": self.corrected, "pii_scrubbed": self.pii_scrubbed,
                "history_trimmed": self.history_trimmed,
                "dropped_by": self.dropped_by(), "steps": [s.__dict__ for s in self.steps]}

    def summary(self) -> str:
        parts = [f"{s.step}: -{s.dropped}" for s in self.steps if s.dropped]
        return (f"{self.records_in} records in, {self.kept} kept ({self.train} train / {self.eval} eval)"
                + (f"; dropped by {', '.join(parts)}" if parts else ""))


def parse_time(value: str | float | None, name: str) -> float | None:
    """ISO 8601 (naive = UTC) or unix seconds -> unix seconds."""
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    s = str(value).strip()
    try:
        return float(s)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidArgument(f"--{name} {s!r} is not a time; use ISO 8601 (2025-01-31 or 2025-01-31T12:00) "
                              "or unix seconds") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def normalize(text: str) -> str:
    return _WS.sub(" ", text.lower()).strip()


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text[:400]))


def _text_of(messages: list, completion: str) -> str:
    return "\n".join(str(m.get("content", "")) for m in messages) + "\n" + completion


def _split_is_eval(request_id: str, fraction: float, seed: int) -> bool:
    h = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


class _Counter:
    def __init__(self, report: DataReport):
        self.report = report

    def __call__(self, step: str, before: list, after: list, note: str = "") -> list:
        self.report.steps.append(StepCount(step, len(before), len(after), len(before) - len(after), note))
        return after


def _pii_policy(mode: str) -> PiiPolicy | None:
    return None if mode == "off" else PiiPolicy(mode=mode)


def filter_records(records: Iterable[LogRecord], feedback: dict[str, list[Feedback]], cfg, *,
                   token_count: Callable[[list, str], tuple[int, int]] | None = None,
                   task: str | None = None) -> tuple[list[Example], list[Example], DataReport]:
    """Run every filter over `records` of `task` (default cfg.task); returns (train, eval, report).

    `token_count(prompt_messages, completion) -> (prompt_tokens, total_tokens)` measures length in base-model
    tokens with its chat template; None skips the length step (tests of the other filters).
    """
    task = task or cfg.task
    report = DataReport(task=task)
    count = _Counter(report)
    recs = list(records)
    report.records_in = len(recs)

    since, until = parse_time(cfg.since, "since"), parse_time(cfg.until, "until")
    srcs = set(cfg.sources or ())
    cur = count("select", recs, [r for r in recs if r.task == task
                                 and (since is None or r.created_at >= since)
                                 and (until is None or r.created_at < until)
                                 and (not srcs or r.source in srcs)], "other task, outside the time window or source")
    cur = count("failed_or_truncated", cur, [r for r in cur if r.status == "ok"
                                            and r.finish_reason not in ("length", "cancelled", "error")],
                "status error/cancelled or finish_reason length")
    cur = count("low_confidence", cur, [r for r in cur if r.confidence >= cfg.min_confidence],
                f"classifier confidence < {cfg.min_confidence}")

    examples: list[Example] = []
    dropped_negative = 0
    for r in cur:
        fbs = sorted(feedback.get(r.request_id, []), key=lambda f: f.created_at)
        corrections = [f for f in fbs if f.correction.strip()]
        if corrections:
            examples.append(Example(r.request_id, task, _prompt_messages(r), corrections[-1].correction.strip(), True))
            report.corrected += 1
        elif any(f.negative for f in fbs):
            dropped_negative += 1
        else:
            examples.append(Example(r.request_id, task, _prompt_messages(r), r.response_text))
    report.steps.append(StepCount("negative_feedback", len(cur), len(examples), dropped_negative,
                                  "rating <= 2 without a correction (corrections replace the answer)"))
    ex = examples
    ex = count("empty", ex, [e for e in ex if e.completion.strip()
                             and any(str(m.get("content", "")).strip() for m in e.prompt)], "empty answer or prompt")
    ex = count("refusal", ex, [e for e in ex if not is_refusal(e.completion)], "refusal phrasing")

    policy = _pii_policy(cfg.pii)
    if policy is not None:
        for e in ex:
            new_prompt = [{**m, "content": policy.apply(str(m.get("content", "")))} for m in e.prompt]
            new_completion = policy.apply(e.completion)
            if new_prompt != e.prompt or new_completion != e.completion:
                report.pii_scrubbed += 1
            e.prompt, e.completion = new_prompt, new_completion
    count("pii", ex, ex, f"policy {cfg.pii}: {report.pii_scrubbed} records scrubbed, none dropped")

    seen: set[str] = set()
    uniq = []
    for e in ex:
        key = hashlib.sha256(normalize(_text_of(e.prompt, e.completion)).encode()).hexdigest()
        if key not in seen:
            seen.add(key)
            uniq.append(e)
    ex = count("exact_duplicate", ex, uniq, "same normalized prompt + answer")
    ex = count("near_duplicate", ex, _near_dedup(ex, cfg), f"MinHash Jaccard >= {cfg.near_dup_threshold}")

    if token_count is not None:
        max_prompt = cfg.effective_max_prompt_tokens()
        kept, short, long_, trimmed = [], 0, [], 0
        for e in ex:
            p, total = token_count(e.prompt, e.completion)
            if (p > max_prompt or total > cfg.max_seq_len) and cfg.trim_history:
                fitted = trim_history(e.prompt, e.completion, token_count, max_prompt, cfg.max_seq_len)
                if fitted is not None:
                    e.prompt, (p, total) = fitted
                    trimmed += 1
            if p > max_prompt or total > cfg.max_seq_len:
                long_.append(e)
            elif total - p < cfg.min_completion_tokens:
                short += 1
            else:
                kept.append(e)
        report.history_trimmed = trimmed
        report.steps.append(StepCount("too_long", len(ex), len(ex) - len(long_), len(long_),
                                      f"prompt > {max_prompt} or prompt+answer > {cfg.max_seq_len} tokens"
                                      + (f" even with only the last user turn ({trimmed} multi-turn records "
                                         "kept with their oldest turns trimmed)" if cfg.trim_history
                                         else "")))
        report.steps.append(StepCount("too_short", len(ex) - len(long_), len(kept), short,
                                      f"answer < {cfg.min_completion_tokens} tokens"))
        ex = kept

    train, held = [], []
    for e in ex:
        (held if _split_is_eval(e.request_id, cfg.eval_fraction, cfg.seed) else train).append(e)
    want = min(cfg.min_eval_records, len(ex) // 4)
    while len(held) < want and train:  # tiny sets: move deterministic picks (lowest hash) to eval
        train.sort(key=lambda e: hashlib.sha256(f"{cfg.seed}:{e.request_id}".encode()).digest())
        held.append(train.pop(0))
    report.train, report.eval = len(train), len(held)
    return train, held, report


def trim_history(prompt: list, completion: str, token_count, max_prompt: int,
                 max_seq_len: int) -> tuple[list, tuple[int, int]] | None:
    """The longest suffix of a multi-turn prompt that fits, or None when even the last user turn does not.

    Keeps every leading system message and the final user turn, then adds earlier turns newest first while
    prompt <= max_prompt and prompt + answer <= max_seq_len; the kept history always starts at a user turn
    (a conversation that opens with an assistant turn confuses most chat templates).
    """
    system = [m for m in prompt[:1] if m.get("role") == "system"]
    rest = prompt[len(system):]
    if not rest or rest[-1].get("role") != "user":
        return None
    best = None
    for start in range(len(rest) - 1, -1, -1):  # newest first: [last user], [.., last user], ...
        if rest[start].get("role") != "user":
            continue
        cand = system + rest[start:]
        p, total = token_count(cand, completion)
        if p > max_prompt or total > max_seq_len:
            break
        best = (cand, (p, total))
    return best


def _prompt_messages(r: LogRecord) -> list:
    msgs = [{"role": str(m.get("role", "user")), "content": str(m.get("content") or "")} for m in (r.messages or [])]
    # a logged conversation may already end with an assistant turn only when the client sent one; keep the prompt as sent
    return msgs


def _near_dedup(examples: list[Example], cfg) -> list[Example]:
    # lazy: datasketch costs ~0.6 s to import; only near-duplicate removal needs it
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.near_dup_threshold, num_perm=cfg.minhash_perm)
    kept = []
    for i, e in enumerate(examples):
        words = _WORD.findall(normalize(_text_of(e.prompt, e.completion)))
        shingles = {" ".join(words[j:j + 3]) for j in range(max(1, len(words) - 2))} or {""}
        mh = MinHash(num_perm=cfg.minhash_perm, seed=cfg.seed)
        for s in shingles:
            mh.update(s.encode())
        if lsh.query(mh):
            continue
        lsh.insert(str(i), mh)
        kept.append(e)
    return kept


def load_logs(cfg, task: str | None = None) -> tuple[list[LogRecord], dict[str, list[Feedback]]]:
    """Read the task's records (time window applied by the store) and their feedback."""
    task = task or cfg.task
    if is_store_url(cfg.db):  # PostgreSQL: read-only, so a missing schema is an error, not an empty new store
        store = open_store(cfg.db, read_only=True)
    else:
        db = Path(cfg.db).expanduser() if cfg.db else paths.logs_db()
        if not db.exists():
            raise FailedPrecondition(f"log store {db} does not exist; pass --db with the gateway's log file "
                                     "(logs.path) or URL (logs.url), or import data with `specialist-router logs "
                                     "import`")
        store = open_store(str(db))
    try:
        source = cfg.sources[0] if len(cfg.sources or ()) == 1 else None
        recs = list(store.iter_records(task=task, since=parse_time(cfg.since, "since"),
                                       until=parse_time(cfg.until, "until"), source=source))
        fb = store.feedback_for([r.request_id for r in recs]) if recs else {}
    finally:
        close = getattr(store, "close", None)
        if close:
            close()
    return recs, fb


def too_few_message(report: DataReport, minimum: int) -> str:
    worst = sorted(report.steps, key=lambda s: -s.dropped)
    removed = ", ".join(f"{s.step} removed {s.dropped}" for s in worst if s.dropped) or "no filter removed any"
    return (f"only {report.kept} usable records for task {report.task!r} after filtering (need >= {minimum}); "
            f"{report.records_in} records in, {removed}. Collect more traffic, widen --since/--until, "
            "or lower min_confidence / min_records in the config")


def data_fingerprint(examples: Iterable[Example]) -> str:
    h = hashlib.sha256()
    for e in sorted(examples, key=lambda e: e.request_id):
        h.update(e.request_id.encode() + b"\0")
        h.update(_text_of(e.prompt, e.completion).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def now() -> float:
    return time.time()
