"""Typed configuration for the gateway process.

Precedence: dataclass defaults < `--config file.yaml` < environment (`SPECIALIST_ROUTER__SECTION__FIELD`,
e.g. `SPECIALIST_ROUTER__BACKEND__MAX_LORAS=4`) < CLI flags. The embedded default needs no file at all.
Every field is documented with `metadata["help"]`; `validate()` checks cross-field rules.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from router.errors import InvalidArgument

ENV_PREFIX = "SPECIALIST_ROUTER__"


class ConfigError(InvalidArgument):
    """A configuration value is wrong; the message says which and how to fix it."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class BackendConfig:
    """The vLLM server behind the gateway."""

    mode: str = _f("managed", "managed: the gateway starts and supervises vLLM (CPU default); external: use `url`.")
    url: str = _f("", "Base URL of an already running vLLM OpenAI server (external mode), e.g. http://gpu-1:8000.")
    model: str = _f("", "Model path or id served by vLLM. Empty: the prepared embedded default (SmolLM2-135M-Instruct).")
    api_key: str = _f("", "Bearer token for an external vLLM started with --api-key.")
    max_loras: int = _f(4, "Adapters resident in one batch (vLLM --max-loras).")
    max_cpu_loras: int = _f(8, "Adapters cached in host memory (vLLM --max-cpu-loras); more are loaded on demand.")
    max_lora_rank: int = _f(64, "Largest LoRA rank the backend accepts (vLLM --max-lora-rank).")
    max_model_len: int = _f(2048, "Context length (prompt + completion) in tokens.")
    dtype: str = _f("float32", "Weights dtype for the managed server (float32 is ~3x faster than bf16 on AVX2 CPUs).")
    kv_cache_gb: int = _f(2, "CPU KV cache size in GiB for the managed server (VLLM_CPU_KVCACHE_SPACE).")
    cpu_threads_bind: str = _f("", "VLLM_CPU_OMP_THREADS_BIND for the managed server; empty keeps vLLM's default binding.")
    extra_args: list = _f([], "Extra command-line arguments appended to the managed vLLM server.")
    startup_timeout_s: float = _f(600.0, "How long to wait for the managed vLLM to answer /health.")
    request_timeout_s: float = _f(600.0, "Upper bound on one backend request when the client sets no deadline.")
    restart: bool = _f(True, "Restart the managed vLLM if it dies.")
    port: int = _f(0, "Loopback port of the managed vLLM; 0 picks a free one.")


@dataclass
class AuthConfig:
    """Bearer tokens in gRPC metadata (`authorization: Bearer <token>`)."""

    enabled: bool = _f(False, "Require tokens. Off is for local use only; the server says so at startup.")
    tokens_file: str = _f("", "YAML file: {tokens: [{token: ..., scopes: [generate, admin], name: ...}]}.")
    tokens: list = _f([], "Inline tokens, same shape as in tokens_file.")


@dataclass
class LogsConfig:
    """Conversation log store."""

    enabled: bool = _f(True, "Write a log record for every Generate/GenerateStream.")
    path: str = _f("", "SQLite file; empty: <data dir>/logs/router.sqlite3.")
    pii: str = _f("off", "PII policy applied before anything touches disk: off | mask.")
    pii_patterns: list = _f([], "Extra regular expressions masked when pii=mask.")
    max_message_chars: int = _f(200_000, "Largest accepted message content, in characters.")


@dataclass
class ClassifierConfig:
    """Task classifier used for routing."""

    enabled: bool = _f(True, "Classify every request; off sends everything to the base model unless overridden.")
    path: str = _f("", "Artifact folder; empty: the default artifact under <data dir>/classifier (built if absent).")
    threshold: float = _f(-1.0, "Abstain threshold override; negative keeps the artifact's own threshold.")
    threads: int = _f(1, "torch threads per classification (torch.set_num_threads in each of the gateway's two "
                        "classify threads); 0 keeps torch's default (one per core). 1 suits a host whose cores vLLM "
                        "shares (added TTFT 8.4-8.6 ms vs 10.0-10.3 with 2 threads on 2 cores, docs/benchmarks.md); "
                        "raise it on a many-core host with vLLM on a GPU.")


@dataclass
class GatewayConfig:
    """The gateway process."""

    host: str = _f("127.0.0.1", "Address the gRPC server listens on.")
    port: int = _f(50051, "gRPC port; 0 picks a free one.")
    data_dir: str = _f("", "Data root (models, classifier, adapters, logs); empty: $SPECIALIST_ROUTER_HOME or ~/.cache/specialist-router.")
    default_max_tokens: int = _f(256, "max_tokens when a request sets none.")
    grace_s: float = _f(10.0, "Graceful shutdown: how long in-flight requests may finish.")
    max_concurrent_streams: int = _f(256, "Requests in flight at once; more get RESOURCE_EXHAUSTED.")
    task_adapters: dict = _f({}, "Static task -> adapter name table (the registry's production aliases take precedence).")
    registry: str = _f("", "Adapter registry root; empty: <data dir>/adapters.")
    backend: BackendConfig = field(default_factory=BackendConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def validate(self) -> "GatewayConfig":
        b = self.backend
        if b.mode not in ("managed", "external"):
            raise ConfigError(f"backend.mode must be 'managed' or 'external', got {b.mode!r}")
        if b.mode == "external" and not b.url:
            raise ConfigError("backend.mode=external needs backend.url (e.g. http://127.0.0.1:8000)")
        if b.max_loras < 1 or b.max_cpu_loras < b.max_loras:
            raise ConfigError("backend.max_loras must be >= 1 and backend.max_cpu_loras >= backend.max_loras")
        if b.max_lora_rank not in (1, 8, 16, 32, 64, 128, 256, 320, 512):
            raise ConfigError("backend.max_lora_rank must be one of 8, 16, 32, 64, 128, 256, 320, 512 (vLLM's choices)")
        if self.default_max_tokens < 1:
            raise ConfigError("default_max_tokens must be >= 1")
        if self.classifier.threads < 0:
            raise ConfigError(f"classifier.threads must be >= 0 (0: torch's default), got {self.classifier.threads}")
        if self.logs.pii not in ("off", "mask"):
            raise ConfigError(f"logs.pii must be 'off' or 'mask', got {self.logs.pii!r}")
        return self


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp) or tp
    try:
        if origin is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if origin in (int, float, str):
            return origin(value)
        if origin in (list, dict):
            v = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(v, origin):
                raise ValueError(value)
            return v
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read {value!r} as {getattr(origin, '__name__', origin)}") from exc
    return value


def apply(obj: Any, values: dict, where: str = "") -> None:
    """Apply a nested dict onto a config dataclass, checking names and types."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        k = str(key).replace("-", "_")
        path = f"{where}{k}"
        if k not in names:
            raise ConfigError(f"unknown setting {path!r}; known: {', '.join(sorted(names))}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a mapping")
            apply(cur, value, path + ".")
        else:
            setattr(obj, k, _coerce(hints[k], value, path))


def _env_overrides(prefix: str = ENV_PREFIX) -> dict:
    out: dict = {}
    for name, value in os.environ.items():
        if not name.startswith(prefix):
            continue
        parts = [p.lower() for p in name[len(prefix):].split("__") if p]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if parts:
            node[parts[-1]] = value
    return out


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML config file's top-level mapping, or a ConfigError saying what is wrong with the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def load(config_file: str | Path | None = None, overrides: dict | None = None) -> GatewayConfig:
    """defaults < YAML file < environment < overrides (CLI flags)."""
    cfg = GatewayConfig()
    if config_file:
        apply(cfg, read_yaml_mapping(config_file))
    apply(cfg, _env_overrides())
    if overrides:
        apply(cfg, overrides)
    if cfg.data_dir:
        os.environ["SPECIALIST_ROUTER_HOME"] = str(Path(cfg.data_dir).expanduser().resolve())
    return cfg.validate()
