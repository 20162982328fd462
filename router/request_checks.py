"""Request validation: every rule's message says what is wrong and how to fix it (INVALID_ARGUMENT).

Every free-text field has a bound (`router.config.LimitsConfig`); a message quotes at most a short prefix of
what the caller sent (`core.errors.quoted`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from core.errors import InvalidArgument, quoted
from router.config import LimitsConfig

ROLES = ("system", "developer", "user", "assistant")
EFFORTS = {1: "low", 2: "medium", 3: "high"}


@dataclass
class Checked:
    messages: list[dict]
    sampling: dict  # OpenAI/vLLM request fields
    reasoning_effort: str  # "" or low/medium/high


def check_text(field: str, value: str, limit: int, key: str) -> str:
    if len(value) > limit:
        raise InvalidArgument(f"{field} has {len(value)} characters, above the limit of {limit}: shorten it (or "
                              f"raise limits.{key})")
    if "\x00" in value:
        raise InvalidArgument(f"{field} contains a NUL character: remove it")
    return value


def check_messages(messages, limits: LimitsConfig) -> list[dict]:
    if len(messages) == 0:
        raise InvalidArgument("messages is empty: send at least one message with role 'user' and non-empty content")
    if len(messages) > limits.max_messages:
        raise InvalidArgument(f"messages has {len(messages)} entries, above the limit of {limits.max_messages}: "
                              "drop older turns (or raise limits.max_messages)")
    out = []
    total = 0
    for i, m in enumerate(messages):
        role = (m.role or "").strip().lower()
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role is {quoted(m.role, 20)}: use one of {', '.join(ROLES)}")
        content = m.content
        if len(content) > limits.max_message_chars:
            raise InvalidArgument(f"messages[{i}].content has {len(content)} characters, above the limit of "
                                  f"{limits.max_message_chars}: shorten it (or raise limits.max_message_chars)")
        total += len(content)
        if total > limits.max_request_chars:
            raise InvalidArgument(f"the messages hold more than {limits.max_request_chars} characters in all: drop "
                                  "older turns or shorten them (or raise limits.max_request_chars)")
        if "\x00" in content:
            raise InvalidArgument(f"messages[{i}].content contains a NUL character: remove it")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise InvalidArgument("no message with role 'user' has non-empty content: add the user's prompt")
    if out[-1]["role"] == "assistant":
        raise InvalidArgument("the last message has role 'assistant': end with a 'user' message to get an answer")
    return out


def check_sampling(sp, *, default_max_tokens: int, max_model_len: int, limits: LimitsConfig) -> dict:
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
    for i, stop in enumerate(stops):
        check_text(f"sampling.stop[{i}]", stop, limits.max_stop_chars, "max_stop_chars")
    if stops:
        out["stop"] = stops
    return out


def check_name(field: str, value: str, limits: LimitsConfig) -> str:
    if len(value) > limits.max_name_chars:
        raise InvalidArgument(f"{field} {quoted(value)} is longer than {limits.max_name_chars} characters: no "
                              f"{field} is that long")
    return value


def check_request(req, *, default_max_tokens: int, max_model_len: int, limits: LimitsConfig) -> Checked:
    for field in ("adapter", "task", "client_id"):
        check_name(field, getattr(req, field), limits)
    messages = check_messages(req.messages, limits)
    sampling = check_sampling(req.sampling, default_max_tokens=default_max_tokens, max_model_len=max_model_len,
                              limits=limits)
    effort = req.reasoning_effort
    if effort and effort not in EFFORTS:
        raise InvalidArgument(f"reasoning_effort {effort} is not a known value: use LOW, MEDIUM or HIGH")
    return Checked(messages=messages, sampling=sampling, reasoning_effort=EFFORTS.get(effort, ""))
