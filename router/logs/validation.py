"""Request-size validation the gateway runs before a prompt is classified, routed or logged."""
from __future__ import annotations

from typing import Any, Sequence

from router.errors import InvalidArgument

DEFAULT_MAX_CHARS = 200_000


def _text_len(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # OpenAI-style content parts
        return sum(len(p.get("text", "")) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def validate_record_sizes(messages: Sequence[dict], max_chars: int | None = DEFAULT_MAX_CHARS, *,
                          max_total_chars: int | None = None, setting: str = "logs.max_message_chars") -> None:
    """Raise `InvalidArgument` if a message's content is longer than `max_chars` characters (or all of
    them together longer than `max_total_chars`). `None` or <= 0 disables a cap.

    The message names the offending message index, its size, the cap and the setting that controls it.
    """
    if not isinstance(messages, (list, tuple)):
        raise InvalidArgument("messages must be a list of {role, content} objects")
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidArgument(f"messages[{i}] must be an object with role and content")
        n = _text_len(m.get("content"))
        total += n
        if max_chars and max_chars > 0 and n > max_chars:
            raise InvalidArgument(
                f"messages[{i}] ({m.get('role', '?')}) is {n:,} characters; the limit is {max_chars:,} "
                f"(set {setting} to change it)")
    if max_total_chars and max_total_chars > 0 and total > max_total_chars:
        raise InvalidArgument(f"the messages total {total:,} characters; the limit is {max_total_chars:,}")
