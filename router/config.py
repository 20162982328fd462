"""Typed configuration of the gateway process, declared once (`core.config` derives the rest).

Precedence: dataclass defaults < `--config file.yaml` < environment (`SPECIALIST_ROUTER__SECTION__FIELD`,
e.g. `SPECIALIST_ROUTER__BACKEND__MAX_LORAS=4`) < CLI flags (`--backend-max-loras 4`). The embedded default
needs no file at all. `validate()` checks the cross-field rules.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core import config
from core.config import section
from core.config import setting as _s
from core.envs import GATEWAY_PREFIX
from core.errors import ConfigError

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices


@dataclass
class BackendConfig:
    """The vLLM server(s) behind the gateway."""

    mode: str = _s("auto", "managed: the gateway starts and supervises vLLM (the CPU default); external: use `url` / "
                           "`urls`; auto: external when one is set, else managed.",
                   choices=("auto", "managed", "external"))
    url: str = _s("", "Base URL of an already running vLLM OpenAI server (external mode), e.g. http://gpu-1:8000.")
    urls: list = _s([], "Several external vLLM replicas (instead of `url`): one gateway drives them all with adapter "
                        "affinity, e.g. [http://vllm-0:8000, http://vllm-1:8000].")
    replicas: int = _s(1, "Managed mode: how many vLLM child processes the gateway starts and supervises.")
    adapter_slots: int = _s(0, "Adapters one replica holds at most; a request for another evicts the least recently "
                               "used idle one. 0: no limit (vLLM's --max-cpu-loras cache pages them), the right choice "
                               "when several gateways share the replicas.")
    balance: str = _s("affinity", "How a request picks its replica: affinity (one that already holds its adapter, the "
                                  "least loaded; else the least loaded with a free slot loads it) or round_robin.",
                      choices=("affinity", "round_robin"))
    affinity_spill: int = _s(8, "Load an adapter onto one more replica when every replica holding it has this many "
                                "more requests in flight than a replica with a free slot. 0: never spread.")
    priority: str = _s("auto", "vLLM priority scheduling for the gateway's own requests (a deploy's one-token smoke test "
                               "goes ahead of queued traffic): on | off | auto (on for managed replicas, which are "
                               "started with --scheduling-policy priority; off for external ones: turn it on only if "
                               "they run with that flag, vLLM refuses a priority otherwise).",
                       choices=("auto", "on", "off"))
    slot_wait_s: float = _s(30.0, "How long a request waits for an adapter slot when every slot on every replica is "
                                  "busy (then RESOURCE_EXHAUSTED).")
    model: str = _s("", "Model path or id served by vLLM. Empty: the prepared embedded default (SmolLM2-135M-Instruct).",
                    flag="--model")
    api_key: str = _s("", "Bearer token for an external vLLM started with --api-key. A managed vLLM gets a random key "
                          "per gateway start (only the gateway knows it); set this to choose it yourself.")
    max_loras: int = _s(4, "Adapters resident in one batch (vLLM --max-loras).", flag="--max-loras")
    max_cpu_loras: int = _s(8, "Adapters cached in host memory (vLLM --max-cpu-loras); more are loaded on demand.",
                            flag="--max-cpu-loras")
    max_lora_rank: int = _s(64, "Largest LoRA rank the backend accepts (vLLM --max-lora-rank).", flag="--max-lora-rank",
                            choices=LORA_RANKS)
    max_model_len: int = _s(2048, "Context length (prompt + completion) in tokens.")
    dtype: str = _s("float32", "Weights dtype for the managed server (float32 is ~3x faster than bf16 on AVX2 CPUs).")
    kv_cache_gb: int = _s(2, "CPU KV cache size in GiB for the managed server (VLLM_CPU_KVCACHE_SPACE).")
    cpu_threads_bind: str = _s("", "VLLM_CPU_OMP_THREADS_BIND for the managed server; empty keeps vLLM's default binding.")
    extra_args: list = _s([], "Extra command-line arguments appended to the managed vLLM server.")
    startup_timeout_s: float = _s(600.0, "How long to wait for the managed vLLM to answer /health.")
    request_timeout_s: float = _s(600.0, "Upper bound on one backend request when the client sets no deadline.")
    restart: bool = _s(True, "Restart the managed vLLM if it dies.")
    port: int = _s(0, "Loopback port of the managed vLLM; 0 picks a free one.")
    health_interval_s: float = _s(1.0, "How often the gateway checks the backend's /health (and the log writer).")

    @property
    def external(self) -> bool:
        return self.mode == "external" or (self.mode == "auto" and bool(self.url or self.urls))

    @property
    def use_priority(self) -> bool:
        return self.priority == "on" or (self.priority == "auto" and not self.external)

    @property
    def backend_urls(self) -> list[str]:
        """The external replicas' URLs (`urls`, or the one `url`)."""
        return [str(u).rstrip("/") for u in self.urls] if self.urls else ([self.url] if self.url else [])


@dataclass
class AuthConfig:
    """Bearer tokens in gRPC metadata (`authorization: Bearer <token>`)."""

    enabled: bool = _s(False, "Require tokens. Off is for local use only; the server says so at startup.")
    tokens_file: str = _s("", "YAML file: {tokens: [{token: ..., scopes: [generate, admin], name: ...}]}.",
                          flag="--auth-tokens-file")
    tokens: list = _s([], "Inline tokens, same shape as in tokens_file.", flag=False)


@dataclass
class LogsConfig:
    """Conversation log store."""

    enabled: bool = _s(True, "Write a log record for every Generate/GenerateStream.")
    path: str = _s("", "SQLite file; empty: <data dir>/logs/router.sqlite3.")
    url: str = _s("", "PostgreSQL store instead of the SQLite file: postgresql://user@host:5432/db (password in the URL, "
                      "PGPASSWORD or a pgpass file; `?pool_size=N` most connections, default 4). Empty: SQLite at "
                      "`path`.")
    pii: str = _s("off", "PII policy applied before anything touches disk.", flag="--pii", choices=("off", "mask"))
    pii_patterns: list = _s([], "Extra regular expressions masked when pii=mask.")


@dataclass
class ClassifierConfig:
    """Task classifier used for routing."""

    enabled: bool = _s(True, "Classify every request; off sends everything to the base model unless overridden.")
    path: str = _s("", "Artifact folder; empty: the default artifact under <data dir>/classifier (built if absent).")
    threshold: float = _s(-1.0, "Abstain threshold override; negative keeps the artifact's own threshold.")
    threads: int = _s(1, "torch threads per classification (torch.set_num_threads in each classify thread); 0 keeps "
                         "torch's default (one per core). 1 suits a host whose cores vLLM shares (added TTFT 8.4-8.6 ms "
                         "vs 10.0-10.3 with 2 threads on 2 cores, docs/benchmarks.md); raise it on a many-core host "
                         "with vLLM on a GPU.")
    workers: int = _s(2, "Classify threads: requests classified at once, off the event loop.")


@dataclass
class LimitsConfig:
    """Bounds on what one request may carry (every free-text field has one); a request over a bound gets
    INVALID_ARGUMENT naming the field and the bound. The gRPC receive limit follows from them."""

    max_message_chars: int = _s(200_000, "Largest accepted message content (and Classify text), in characters.")
    max_request_chars: int = _s(1_000_000, "Largest total content of one request's messages, in characters.")
    max_messages: int = _s(512, "Most messages in one request.")
    max_stop_chars: int = _s(256, "Longest stop string, in characters (at most 8 stop strings).")
    max_feedback_chars: int = _s(20_000, "Longest feedback correction, in characters.")
    max_comment_chars: int = _s(2_000, "Longest feedback comment, in characters.")
    max_name_chars: int = _s(128, "Longest adapter name, task, client id or request id in a request.")
    max_concurrent_streams: int = _s(256, "Requests in flight at once; more get RESOURCE_EXHAUSTED.")

    def receive_bytes(self) -> int:
        """The gRPC receive limit: the largest valid request (4 bytes per character at worst in UTF-8), plus room
        for the other fields and protobuf framing."""
        return 4 * self.max_request_chars + 4 * (self.max_feedback_chars + self.max_comment_chars) + (1 << 20)


@dataclass
class DeployConfig:
    """Zero-downtime deployment of registry versions."""

    drain_timeout_s: float = _s(120.0, "After a swap, how long requests on the old adapter may finish before it is "
                                       "unloaded anyway.")
    registry_poll_s: float = _s(2.0, "How often the gateway polls the registry's generation counter to follow alias "
                                     "moves made by another process or replica.")
    smoke_timeout_s: float = _s(120.0, "Timeout of the one-token smoke generation on a newly loaded adapter.")
    pinned_max_loaded: int = _s(2, "Registry versions a request pinned by name (`code@3`) may load on demand, at most "
                                   "at once besides the production and canary adapters; the least recently used "
                                   "idle one makes room, and when all are busy the request gets RESOURCE_EXHAUSTED.")
    pinned_idle_s: float = _s(300.0, "A version loaded on demand is unloaded after this many seconds without requests.")


@dataclass
class HttpConfig:
    """The HTTP port: the OpenAI-compatible API, Prometheus `/metrics` and `/health`, in the gateway process."""

    enabled: bool = _s(True, "Serve HTTP: /v1/chat/completions, /v1/models, /v1/feedback, /metrics, /health.",
                       flag="--http")
    host: str = _s("", "Address the HTTP server listens on; empty: the gateway's `host`.")
    port: int = _s(8080, "HTTP port; 0 picks a free one.", flag="--http-port")


@dataclass
class MetricsConfig:
    """Prometheus metrics, served on the HTTP port's /metrics."""

    enabled: bool = _s(True, "Record request, backend, adapter and log-writer metrics (served when http.enabled).",
                       flag="--metrics")


@dataclass
class TlsConfig:
    """TLS for both APIs (gRPC and HTTP). Both files set: TLS on; `client_ca_file` too: mutual TLS."""

    cert_file: str = _s("", "PEM server certificate (chain). With key_file it turns TLS on for gRPC and HTTP.",
                        flag="--tls-cert")
    key_file: str = _s("", "PEM private key of cert_file (keep it chmod 600).", flag="--tls-key")
    client_ca_file: str = _s("", "PEM CA bundle: require and verify client certificates (mutual TLS).",
                             flag="--tls-client-ca")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file and self.key_file)


@dataclass
class GatewayConfig:
    """The gateway process."""

    host: str = _s("127.0.0.1", "Address the gRPC server listens on.", flag="--host")
    port: int = _s(50051, "gRPC port; 0 picks a free one.", flag="--port")
    data_dir: str = _s("", "Data root (models, classifier, adapters, logs); empty: $SPECIALIST_ROUTER_HOME or "
                           "~/.cache/specialist-router.", flag="--data-dir")
    default_max_tokens: int = _s(256, "max_tokens when a request sets none.")
    grace_s: float = _s(10.0, "Graceful shutdown: how long in-flight requests may finish.")
    task_adapters: dict = _s({}, "Static task -> adapter name table (the registry's production aliases take "
                                 "precedence).")
    registry: str = _s("", "Adapter registry root; empty: <data dir>/adapters.", flag="--registry")
    adapter_roots: list = _s([], "Folders LoadAdapter may load unregistered adapters from, besides the registry and "
                                 "<data dir>/local-adapters (symlinks are resolved before the check).")
    backend: BackendConfig = section(BackendConfig)
    auth: AuthConfig = section(AuthConfig)
    logs: LogsConfig = section(LogsConfig)
    classifier: ClassifierConfig = section(ClassifierConfig)
    limits: LimitsConfig = section(LimitsConfig)
    deploy: DeployConfig = section(DeployConfig)
    http: HttpConfig = section(HttpConfig)
    metrics: MetricsConfig = section(MetricsConfig)
    tls: TlsConfig = section(TlsConfig)
    log_format: str = _s("text", "Gateway log lines: text, or json (one object per line, with the request id).",
                         flag="--log-format", choices=("text", "json"))

    def validate(self) -> "GatewayConfig":
        b = self.backend
        if (self.auth.tokens_file or self.auth.tokens) and not self.auth.enabled:
            raise ConfigError("auth tokens are configured (auth.tokens_file / auth.tokens) but auth.enabled is false: "
                              "pass --auth (or set auth.enabled: true), or drop the tokens")
        if b.mode == "external" and not b.backend_urls:
            raise ConfigError("backend.mode=external needs backend.url (e.g. http://127.0.0.1:8000) or backend.urls")
        if b.url and b.urls:
            raise ConfigError("backend.url and backend.urls are both set: list every replica in backend.urls")
        for u in b.backend_urls:
            if not str(u).startswith(("http://", "https://")):
                raise ConfigError(f"backend.urls: {u!r} is not an http(s):// URL of a vLLM server")
        if len(set(b.backend_urls)) != len(b.backend_urls):
            raise ConfigError("backend.urls lists the same replica twice")
        if b.replicas < 1:
            raise ConfigError(f"backend.replicas must be >= 1, got {b.replicas}")
        if b.replicas > 1 and b.external:
            raise ConfigError("backend.replicas counts managed replicas; for external ones list their URLs in "
                              "backend.urls")
        if b.adapter_slots < 0 or b.affinity_spill < 0:
            raise ConfigError("backend.adapter_slots and backend.affinity_spill must be >= 0 (0: no limit / never)")
        if b.slot_wait_s <= 0:
            raise ConfigError(f"backend.slot_wait_s must be > 0, got {b.slot_wait_s}")
        if b.max_loras < 1 or b.max_cpu_loras < b.max_loras:
            raise ConfigError("backend.max_loras must be >= 1 and backend.max_cpu_loras >= backend.max_loras")
        if self.default_max_tokens < 1:
            raise ConfigError("default_max_tokens must be >= 1")
        if self.classifier.threads < 0:
            raise ConfigError(f"classifier.threads must be >= 0 (0: torch's default), got {self.classifier.threads}")
        if self.classifier.workers < 1:
            raise ConfigError(f"classifier.workers must be >= 1, got {self.classifier.workers}")
        for name in ("max_message_chars", "max_request_chars", "max_messages", "max_stop_chars", "max_feedback_chars",
                     "max_comment_chars", "max_name_chars", "max_concurrent_streams"):
            if getattr(self.limits, name) < 1:
                raise ConfigError(f"limits.{name} must be >= 1, got {getattr(self.limits, name)}")
        if self.deploy.pinned_max_loaded < 0:
            raise ConfigError(f"deploy.pinned_max_loaded must be >= 0 (0: no on-demand loads), got "
                              f"{self.deploy.pinned_max_loaded}")
        for name in ("drain_timeout_s", "registry_poll_s", "smoke_timeout_s", "pinned_idle_s"):
            if getattr(self.deploy, name) <= 0:
                raise ConfigError(f"deploy.{name} must be > 0, got {getattr(self.deploy, name)}")
        t = self.tls
        if bool(t.cert_file) != bool(t.key_file):
            raise ConfigError("TLS needs both tls.cert_file and tls.key_file (--tls-cert, --tls-key)")
        if t.client_ca_file and not t.enabled:
            raise ConfigError("tls.client_ca_file (mutual TLS) needs tls.cert_file and tls.key_file as well")
        for key in ("cert_file", "key_file", "client_ca_file"):
            f = getattr(t, key)
            if f and not Path(f).expanduser().is_file():
                raise ConfigError(f"tls.{key} {f} does not exist or is not a file")
        if self.http.enabled and self.http.port == self.port and self.port != 0 and \
                (self.http.host or self.host) == self.host:
            raise ConfigError(f"http.port and port are both {self.port}: give the HTTP API its own port (--http-port)")
        if b.health_interval_s <= 0:
            raise ConfigError(f"backend.health_interval_s must be > 0, got {b.health_interval_s}")
        return self


def load(config_file: str | Path | None = None, overrides: dict | None = None) -> GatewayConfig:
    """defaults < YAML file < environment < overrides (CLI flags); `data_dir` becomes the process's data root."""
    cfg = config.load(GatewayConfig, config_file=config_file, env_prefix=GATEWAY_PREFIX, overrides=overrides,
                      other_sections=("loop",))
    if cfg.data_dir:
        os.environ["SPECIALIST_ROUTER_HOME"] = str(Path(cfg.data_dir).expanduser().resolve())
    return cfg
