"""Request validation: every rule's message says what is wrong and how to fix it (INVALID_ARGUMENT)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from core.errors import InvalidArgument

ROLES = ("system", "developer", "user", "assistant")
EFFORTS = {1: "low", 2: "medium", 3: "high"}


@dataclass
class Checked:
    messages: list[dict]
    sampling: dict  # OpenAI/vLLM request fields
    reasoning_effort: str  # "" or low/medium/high


def check_messages(messages, *, max_chars: int) -> list[dict]:
    if len(messages) == 0:
        raise InvalidArgument("messages is empty: send at least one message with role 'user' and non-empty content")
    out = []
    for i, m in enumerate(messages):
        role = (m.role or "").strip().lower()
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role is {m.role!r}: use one of {', '.join(ROLES)}")
        content = m.content
        if len(content) > max_chars:
            raise InvalidArgument(f"messages[{i}].content has {len(content)} characters, above the limit of "
                                  f"{max_chars}: shorten it (or raise limits.max_message_chars)")
        if "\x00" in content:
            raise InvalidArgument(f"messages[{i}].content contains a NUL character: remove it")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise InvalidArgument("no message with role 'user' has non-empty content: add the user's prompt")
    if out[-1]["role"] == "assistant":
        raise InvalidArgument("the last message has role 'assistant': end with a 'user' message to get an answer")
    return out


def check_sampling(sp, *, default_max_tokens: int, max_model_len: int) -> dict:
    out: dict = {}
    max_tokens = sp.max_tokens if sp.HasField("max_tokens") else default_max_tokens
    if max_tokens <= 0:
        raise InvalidArgument(f"sampling.max_tokens is {max_tokens}: it must be at least 1")
    if max_tokens >= max_model_len:
        raise InvalidArgument(f"sampling.max_tokens is {max_tokens}, but the model's context is {max_model_len} tokens "
                              f"(prompt included): use at most {max_model_len - 1}")
    out["max_tokens"] = int(max_tokens)
    if sp.HasField("temperature"):
        t = sp.temperature
        if not math.isfinite(t) or t < 0 or t > 2:
            raise InvalidArgument(f"sampling.temperature is {t}: use a value in [0, 2] (0 = greedy)")
        out["temperature"] = float(t)
    if sp.HasField("top_p"):
        p = sp.top_p
        if not math.isfinite(p) or p <= 0 or p > 1:
            raise InvalidArgument(f"sampling.top_p is {p}: use a value in (0, 1]")
        out["top_p"] = float(p)
    if sp.HasField("seed"):
        out["seed"] = int(sp.seed)
    stops = list(sp.stop)
    if len(stops) > 8:
        raise InvalidArgument(f"sampling.stop has {len(stops)} strings: use at most 8")
    if any(not s for s in stops):
        raise InvalidArgument("sampling.stop contains an empty string: remove it")
    if stops:
        out["stop"] = stops
    return out


def check_request(req, *, default_max_tokens: int, max_model_len: int, max_chars: int) -> Checked:
    messages = check_messages(req.messages, max_chars=max_chars)
    sampling = check_sampling(req.sampling, default_max_tokens=default_max_tokens, max_model_len=max_model_len)
    effort = req.reasoning_effort
    if effort and effort not in EFFORTS:
        raise InvalidArgument(f"reasoning_effort {effort} is not a known value: use LOW, MEDIUM or HIGH")
    return Checked(messages=messages, sampling=sampling, reasoning_effort=EFFORTS.get(effort, ""))
