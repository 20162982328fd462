"""Client for vLLM's OpenAI-compatible HTTP server: streaming chat, health, runtime LoRA load/unload.

Every generation is streamed from vLLM, also for unary `Generate`: closing the HTTP stream is how a
cancelled or timed-out gRPC call aborts the request inside vLLM (vLLM aborts on client disconnect).
Errors are mapped to `router.errors` classes with vLLM's own message, so the gateway can return the
right gRPC status: 400 -> INVALID_ARGUMENT, 404 -> NOT_FOUND, connection failures/5xx -> UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import aiohttp

from core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, Unavailable


@dataclass
class StreamEvent:
    """One piece of a streamed answer; the last event has `finish_reason` and `usage`."""

    delta: str = ""
    reasoning_delta: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    final: bool = False


@dataclass
class BackendStats:
    requests: int = 0
    errors: int = 0
    last_error: str = ""
    extra: dict = field(default_factory=dict)


def _error_message(body: str) -> str:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return body.strip()[:500]
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)[:1000]
    return str(err)[:1000]


class VLLMBackend:
    """One vLLM server (managed child process or external URL)."""

    def __init__(self, url: str, *, api_key: str = "", request_timeout_s: float = 600.0, max_connections: int = 1024):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self.stats = BackendStats()

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers())
        return self._session

    def set_url(self, url: str) -> None:
        self.url = url.rstrip("/")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ----------------------------------------------------------------------------------- health
    async def health(self, timeout_s: float = 2.0) -> bool:
        try:
            async with self.session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def models(self) -> list[dict]:
        data = await self._json("GET", "/v1/models")
        return list(data.get("data", []))

    async def metrics_text(self) -> str:
        async with self.session.get(f"{self.url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
            return await r.text()

    # ------------------------------------------------------------------------------------ LoRA
    async def load_lora(self, name: str, path: str) -> None:
        """An adapter vLLM refuses (corrupt weights, rank, shapes, already loaded) is a permanent problem of that
        adapter: FAILED_PRECONDITION with vLLM's reason in one line, never UNAVAILABLE (which clients retry).
        UNAVAILABLE stays for a backend that cannot be reached."""
        try:
            await self._json("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path},
                             what=f"load adapter {name!r}")
        except (InvalidArgument, NotFound, Unavailable) as exc:
            if isinstance(exc, Unavailable) and exc.__cause__ is not None:  # not reached: transient
                raise
            reason = " ".join(str(exc).split())[:300]
            raise FailedPrecondition(f"vLLM refused the adapter: {reason}") from None

    async def unload_lora(self, name: str) -> None:
        await self._json("POST", "/v1/unload_lora_adapter", {"lora_name": name}, what=f"unload adapter {name!r}")

    async def _json(self, method: str, path: str, payload: dict | None = None, *, what: str = "", timeout_s: float = 120.0) -> dict:
        try:
            async with self.session.request(method, f"{self.url}{path}", json=payload,
                                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                body = await r.text()
                if r.status >= 400:
                    self._raise_for(r.status, body, what or path)
                try:
                    return json.loads(body) if body.strip().startswith(("{", "[")) else {"text": body}
                except json.JSONDecodeError:
                    return {"text": body}
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
            raise Unavailable(f"the vLLM backend at {self.url} is not reachable ({type(exc).__name__}); "
                              "it may be starting or restarting, retry shortly") from exc

    def _timed_out(self, total: float) -> DeadlineExceeded:
        return DeadlineExceeded(f"the request did not finish within its deadline ({total:.1f} s): raise the "
                                "client timeout or lower max_tokens")

    @staticmethod
    def _raise_for(status: int, body: str, what: str) -> None:
        msg = _error_message(body)
        if status == 404:
            raise NotFound(f"{what}: {msg}")
        if status in (400, 422):
            low = msg.lower()
            if "already been loaded" in low or "already loaded" in low:
                raise FailedPrecondition(f"{what}: {msg}")
            raise InvalidArgument(f"{what}: {msg}")
        if status == 401:
            raise FailedPrecondition(f"{what}: the vLLM backend refused the gateway's API key ({msg})")
        raise Unavailable(f"{what}: the vLLM backend answered HTTP {status}: {msg}")

    # ------------------------------------------------------------------------------ generation
    async def chat_stream(self, payload: dict, *, timeout_s: float | None = None) -> AsyncIterator[StreamEvent]:
        """Stream a chat completion. Cancelling the consumer closes the stream, which aborts it in vLLM."""
        body = dict(payload)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": False}
        # a little beyond the caller's deadline, so the gRPC deadline (which cancels us) normally fires first
        total = min(timeout_s + 1.0, self.request_timeout_s) if timeout_s else self.request_timeout_s
        self.stats.requests += 1
        try:
            resp = await self.session.post(f"{self.url}/v1/chat/completions", json=body,
                                           timeout=aiohttp.ClientTimeout(total=total, sock_connect=5))
        except TimeoutError as exc:  # (before OSError: TimeoutError is one)
            raise self._timed_out(total) from exc
        except (aiohttp.ClientConnectionError, OSError) as exc:
            self.stats.errors += 1
            self.stats.last_error = repr(exc)
            raise Unavailable(f"the vLLM backend at {self.url} is not reachable ({type(exc).__name__}); "
                              "it may be starting or restarting, retry shortly") from exc
        completed = False
        final: StreamEvent | None = None
        try:
            if resp.status >= 400:
                text = await resp.text()
                self._raise_for(resp.status, text, "generate")
            finish = ""
            async for raw in resp.content:
                line = raw.strip()
                if not line or not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    await resp.content.read()  # the chunked terminator, so the connection can be reused
                    break
                chunk = json.loads(data)
                if "error" in chunk and "choices" not in chunk:
                    self._raise_for(int(chunk["error"].get("code") or 500) if isinstance(chunk["error"], dict) else 500,
                                    json.dumps(chunk), "generate")
                usage = chunk.get("usage")
                choices = chunk.get("choices") or []
                if choices:
                    ch = choices[0]
                    d = ch.get("delta") or {}
                    content = d.get("content") or ""
                    reasoning = d.get("reasoning") or d.get("reasoning_content") or ""
                    if ch.get("finish_reason"):
                        finish = ch["finish_reason"]
                    if content or reasoning:
                        yield StreamEvent(delta=content, reasoning_delta=reasoning)
                if usage:
                    # held until the stream is fully read: the consumer stops at the final event
                    final = StreamEvent(finish_reason=finish or "stop", prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                        completion_tokens=int(usage.get("completion_tokens") or 0), final=True)
                    finish = ""
            completed = final is not None
        except TimeoutError as exc:
            raise self._timed_out(total) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError) as exc:
            self.stats.errors += 1
            self.stats.last_error = repr(exc)
            raise Unavailable(f"the vLLM backend dropped the stream ({type(exc).__name__}); retry the request") from exc
        finally:
            if completed:
                resp.release()  # back to the keep-alive pool: the next request skips the TCP connect
            else:
                resp.close()  # on cancel/deadline/error this disconnects, and vLLM aborts the request
        if final is not None:
            yield final


def now_ms() -> float:
    return time.perf_counter() * 1000.0
