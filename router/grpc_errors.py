"""The gRPC edge, written once: error mapping for every handler, and request decoding.

`@maps_errors` wraps unary and server-streaming handlers alike (the vllm-tgis-adapter pattern):
- a `core.errors.RouterError` becomes `context.abort(exc.code, message)`: the caller's message says what to fix;
- cancellation and an abort already under way pass through untouched;
- anything else is a bug: logged with the request id (`REQUEST_ID`, a contextvar the pipeline sets) and returned
  as INTERNAL with that id, never a trace.

`add_servicer` registers a servicer like the generated `add_*_to_server`, but a request whose bytes do not
decode (e.g. a string field that is not UTF-8) is INVALID_ARGUMENT, not INTERNAL.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging

import grpc
from google.protobuf.message import DecodeError

from core.errors import RouterError
from router.v1 import router_pb2 as pb

log = logging.getLogger("router.gateway")

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_UNDECODABLE = ("the request could not be decoded: every string field must be valid UTF-8 and the message must "
                "match router.v1 ({})")


async def _abort_for(exc: BaseException, context) -> None:
    if isinstance(exc, RouterError):
        await context.abort(exc.code, str(exc))
    rid = REQUEST_ID.get()
    log.error("request %s failed", rid or "(no id)", exc_info=exc)
    where = f" (request id {rid})" if rid else ""
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in the gateway{where}; see the gateway log")


def maps_errors(fn):
    """Decorator for a servicer method `(self, request, context)`: unary coroutine or async generator."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def stream(self, request, context):
            try:
                async for item in fn(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped in one place
                await _abort_for(exc, context)
        return stream

    @functools.wraps(fn)
    async def unary(self, request, context):
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped in one place
            await _abort_for(exc, context)
    return unary


class _Undecodable:
    """Stands in for a request whose bytes are not valid protobuf (e.g. strings that are not UTF-8)."""

    def __init__(self, error: str):
        self.error = error


def _safe_deserializer(cls):
    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))
    return deserialize


def add_servicer(server, service: str, servicer) -> None:
    """Register `servicer` for `router.v1.<service>`; an undecodable request is INVALID_ARGUMENT."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name[service].methods:
        fn = getattr(servicer, m.name)
        req_cls, resp_cls = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        kw = dict(request_deserializer=_safe_deserializer(req_cls), response_serializer=resp_cls.SerializeToString)
        if m.server_streaming:
            async def stream(request, context, fn=fn):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _UNDECODABLE.format(request.error))
                async for item in fn(request, context):
                    yield item
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(stream, **kw)
        else:
            async def unary(request, context, fn=fn):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _UNDECODABLE.format(request.error))
                return await fn(request, context)
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(unary, **kw)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(f"router.v1.{service}", handlers),))
