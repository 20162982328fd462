"""The OpenAI chat-completions wire format, both ways: a request body becomes a `router.v1` GenerateRequest (so the
HTTP door runs the same checks, limits and routing as gRPC), and pipeline results become OpenAI JSON.

What an OpenAI client may send and how it is treated:
- `model`: `auto` (the classifier decides), `base` (or the served model's id), a task name (that task's production
  specialist, the base model when it has none), or a loaded adapter name such as `code@3` (see `resolve_model`).
- `messages` (content as a string or a list of `{"type": "text"}` parts), `max_tokens` / `max_completion_tokens`,
  `temperature`, `top_p`, `seed`, `stop`, `reasoning_effort`, `user` (logged as the client id), `stream`,
  `stream_options.include_usage`: honoured.
- `n` > 1, `tools` / `functions`, `logprobs`, `response_format` other than text, non-zero penalties, `logit_bias`:
  refused with a 400 that names the field (the gateway cannot honour them; silently ignoring would mislead).
- Anything else (`metadata`, `store`, `service_tier`, ...) is ignored, as vLLM does.
"""
from __future__ import annotations

import json
import time

from core.errors import InvalidArgument, NotFound, quoted
from router.pipeline import Finished
from router.routing import BASE, Decision
from router.v1 import router_pb2 as pb

_EFFORT = {"low": pb.REASONING_EFFORT_LOW, "medium": pb.REASONING_EFFORT_MEDIUM, "high": pb.REASONING_EFFORT_HIGH}
AUTO = "auto"


def _typed(body: dict, key: str, types: tuple, what: str):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in types:
        raise InvalidArgument(f"{key} must be {what}, got a boolean")
    if not isinstance(v, types):
        raise InvalidArgument(f"{key} must be {what}, got {type(v).__name__}")
    return v


def _refuse_unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidArgument(f"n is {quoted(n, 20)}: this gateway returns one choice per request, use n=1")
    for key in ("tools", "functions"):
        if body.get(key):
            raise InvalidArgument(f"{key} is not supported by this gateway (no tool calling): remove it")
    if body.get("tool_choice") not in (None, "none"):
        raise InvalidArgument("tool_choice is not supported by this gateway (no tool calling): remove it")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise InvalidArgument("logprobs are not supported by this gateway: remove logprobs / top_logprobs")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type", "text") == "text"):
        raise InvalidArgument("response_format other than {'type': 'text'} is not supported by this gateway: remove it")
    for key in ("presence_penalty", "frequency_penalty"):
        v = body.get(key)
        if v not in (None, 0, 0.0):
            raise InvalidArgument(f"{key} is not supported by this gateway: remove it or send 0")
    if body.get("logit_bias"):
        raise InvalidArgument("logit_bias is not supported by this gateway: remove it")


def _content(i: int, m: dict) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgument(f"messages[{i}].content[{j}] is not a text part: this gateway accepts text only "
                                      "({'type': 'text', 'text': '...'})")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidArgument(f"messages[{i}].content must be a string or a list of text parts")


def _messages(body: dict) -> list[pb.ChatMessage]:
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise InvalidArgument("messages must be a list of {'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise InvalidArgument(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str):
            raise InvalidArgument(f"messages[{i}].role must be a string (system, developer, user or assistant)")
        out.append(pb.ChatMessage(role=role, content=_content(i, m)))
    return out


def _sampling(body: dict) -> pb.SamplingParams:
    sp = pb.SamplingParams()
    mt = _typed(body, "max_completion_tokens", (int,), "an integer")
    if mt is None:
        mt = _typed(body, "max_tokens", (int,), "an integer")
    if mt is not None:
        if not -(2**31) <= mt < 2**31:
            raise InvalidArgument(f"max_tokens is {quoted(mt, 24)}: far above any model's context")
        sp.max_tokens = mt
    for key in ("temperature", "top_p"):
        v = _typed(body, key, (int, float), "a number")
        if v is not None:
            setattr(sp, key, float(v))
    seed = _typed(body, "seed", (int,), "an integer")
    if seed is not None:
        if not -(2**63) <= seed < 2**63:
            raise InvalidArgument("seed must fit in 64 bits")
        sp.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        sp.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        sp.stop.extend(stop)
    elif stop is not None:
        raise InvalidArgument("stop must be a string or a list of strings")
    return sp


def generate_request(body: dict, *, adapter: str, task: str) -> pb.GenerateRequest:
    """The OpenAI request body as a router.v1 GenerateRequest (`adapter`/`task` from `resolve_model`)."""
    _refuse_unsupported(body)
    effort = _typed(body, "reasoning_effort", (str,), "low, medium or high")
    if effort is not None and effort not in _EFFORT:
        raise InvalidArgument(f"reasoning_effort is {quoted(effort, 20)}: use low, medium or high")
    user = _typed(body, "user", (str,), "a string") or ""
    return pb.GenerateRequest(messages=_messages(body), sampling=_sampling(body),
                              reasoning_effort=_EFFORT.get(effort or "", 0), adapter=adapter, task=task,
                              client_id=user)


def resolve_model(model, *, served_model: str, loaded: dict, routes: dict, tasks: list[str]) -> tuple[str, str]:
    """(adapter, task) fields of the GenerateRequest for an OpenAI `model`; NotFound names what is served."""
    if model is None or model == "":
        model = AUTO
    if not isinstance(model, str):
        raise InvalidArgument("model must be a string: auto, base, a task name or an adapter name")
    if model == AUTO:
        return "", ""
    if model == BASE or model == served_model or model == served_model.rstrip("/").rsplit("/", 1)[-1]:
        return BASE, ""
    if model in loaded or "@" in model:  # a loaded adapter, or a registry version the gateway loads on demand
        return model, ""
    if model in tasks or model in routes:
        return "", model
    known = sorted(set(tasks) | set(routes))
    raise NotFound(f"model {quoted(model)} is not served here: use 'auto' (the classifier picks the specialist), "
                   f"'base', a task ({', '.join(known) or 'none known'}) or a loaded adapter "
                   f"({', '.join(sorted(loaded)) or 'none loaded'}); GET /v1/models lists them")


def models_list(*, served_model: str, loaded: dict, routes: dict, tasks: list[str]) -> dict:
    created = int(time.time())

    def entry(mid: str, **extra) -> dict:
        return {"id": mid, "object": "model", "created": created, "owned_by": "specialist-router", **extra}

    data = [entry(AUTO, description="the classifier picks the task's specialist"),
            entry(BASE, root=served_model, description="the base model, no adapter")]
    for t in sorted(set(tasks) | set(routes)):
        data.append(entry(t, description=f"task {t}: its production specialist "
                                         f"({routes[t] if t in routes else 'none deployed: the base model'})"))
    for name, a in sorted(loaded.items()):
        data.append(entry(name, parent=served_model, task=a.task, version=a.version))
    return {"object": "list", "data": data}


def route_headers(request_id: str, d: Decision) -> dict[str, str]:
    return {"x-request-id": request_id, "x-router-task": d.task, "x-router-confidence": f"{d.confidence:.4f}",
            "x-router-adapter": d.adapter or BASE, "x-router-reason": d.reason_name}


def _route(d: Decision) -> dict:
    return {"task": d.task, "confidence": round(d.confidence, 4), "adapter": d.adapter or BASE, "reason": d.reason_name}


def _usage(f: Finished) -> dict:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens}


def completion(f: Finished, model: str, created: int) -> dict:
    msg = {"role": "assistant", "content": f.text}
    if f.reasoning_text:
        msg["reasoning_content"] = f.reasoning_text
    return {"id": f"chatcmpl-{f.request_id}", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": f.finish_reason or "stop"}],
            "usage": _usage(f), "route": _route(f.decision)}


class ChunkWriter:
    """SSE lines of one streamed completion, framed exactly as OpenAI does (`data: {json}\\n\\n`, `[DONE]`)."""

    def __init__(self, request_id: str, model: str, include_usage: bool):
        self.id = f"chatcmpl-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def _chunk(self, choices: list, **extra) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": choices, **extra}
        if self.include_usage and "usage" not in obj:
            obj["usage"] = None
        return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    def first(self, d: Decision) -> bytes:
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}], route=_route(d))

    def delta(self, text: str, reasoning: str) -> bytes:
        delta: dict = {"content": text} if text or not reasoning else {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def last(self, f: Finished) -> bytes:
        out = self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": f.finish_reason or "stop"}])
        if self.include_usage:
            out += self._chunk([], usage=_usage(f))
        return out + b"data: [DONE]\n\n"

    @staticmethod
    def error(body: dict) -> bytes:
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n"
