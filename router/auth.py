"""Bearer-token auth for the gateway (gRPC metadata and HTTP header `authorization: Bearer <token>`), two scopes.

`generate` allows RouterService; `admin` allows AdminService (and implies nothing else). Health and
reflection are open. Wrong or missing token -> UNAUTHENTICATED; right token, wrong scope -> PERMISSION_DENIED.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

from core.errors import ConfigError, PermissionDenied, Unauthenticated
from router.config import AuthConfig

SCOPES = ("generate", "admin")
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

MIN_TOKEN_CHARS = 32


@dataclass(frozen=True)
class Token:
    token: str
    scopes: frozenset
    name: str = ""


def load_tokens(cfg: AuthConfig) -> list[Token]:
    raw = list(cfg.tokens)
    if cfg.tokens_file:
        p = Path(cfg.tokens_file)
        if not p.is_file():
            raise ConfigError(f"auth.tokens_file {p} does not exist")
        mode = p.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"auth.tokens_file {p} is readable by other users (mode {mode:o}): tokens are secrets, "
                              f"run `chmod 600 {p}`")
        data = yaml.safe_load(p.read_text()) or {}
        raw += list(data.get("tokens", []))
    out = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or not t.get("token"):
            raise ConfigError(f"auth token #{i} needs a 'token' field")
        scopes = frozenset(t.get("scopes") or ["generate"])
        bad = scopes - set(SCOPES)
        if bad:
            raise ConfigError(f"auth token #{i} has unknown scopes {sorted(bad)}: use {list(SCOPES)}")
        if len(str(t["token"])) < MIN_TOKEN_CHARS:
            raise ConfigError(f"auth token #{i} is shorter than {MIN_TOKEN_CHARS} characters: use a long random token, "
                              "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        out.append(Token(str(t["token"]), scopes, str(t.get("name", f"token{i}"))))
    if cfg.enabled and not out:
        raise ConfigError("auth.enabled is true but no tokens are configured (auth.tokens or auth.tokens_file)")
    return out


def required_scope(method: str) -> str | None:
    if method.startswith(OPEN_PREFIXES):
        return None
    if method.startswith("/router.v1.AdminService/"):
        return "admin"
    return "generate"


def _aborting_handler(handler, code: grpc.StatusCode, message: str):
    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.stream_stream_rpc_method_handler(stream, **kw)


class Authenticator:
    """Checks an `authorization` header value against the tokens, for one scope; shared by gRPC and HTTP."""

    def __init__(self, tokens: list[Token]):
        self.tokens = tokens

    def _find(self, presented: str) -> Token | None:
        found = None
        for t in self.tokens:  # every token compared, in constant time: no early exit to time
            if hmac.compare_digest(t.token.encode(), presented.encode()):
                found = t
        return found

    def check(self, authorization: str, scope: str, what: str) -> Token:
        """The token, or Unauthenticated / PermissionDenied with what to fix."""
        if not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
            raise Unauthenticated("missing bearer token: send the header 'authorization: Bearer <token>'")
        tok = self._find(authorization[7:].strip())
        if tok is None:
            raise Unauthenticated("unknown bearer token: check the token")
        if scope not in tok.scopes:
            raise PermissionDenied(f"token {tok.name!r} lacks the {scope!r} scope needed for {what}")
        return tok


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: Authenticator):
        self.auth = auth

    async def intercept_service(self, continuation, details):
        scope = required_scope(details.method)
        handler = await continuation(details)
        if scope is None or handler is None:
            return handler
        md = dict(details.invocation_metadata or ())
        try:
            self.auth.check(md.get("authorization", ""), scope, details.method)
        except (Unauthenticated, PermissionDenied) as exc:
            return _aborting_handler(handler, exc.code, str(exc))
        return handler
