"""Shared real parts: one vLLM CPU server per test session, gateways on loopback ports.

- `model_dir`: the real SmolLM2-135M-Instruct HF folder (prepared once from the PyPI GGUF).
- `vllm_server`: a real vLLM OpenAI server (CPU) with runtime LoRA, started once per session.
- `gateway_factory(**overrides)`: starts a real gRPC gateway in its own thread/event loop against that
  vLLM (external mode) and returns a handle (`.target`, `.server`, `.run(coro)`); stopped at teardown.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# tests never touch the user's cache; a session-wide data dir under the repo (ignored by git)
os.environ.setdefault("SPECIALIST_ROUTER_HOME", str(ROOT / ".data" / "test-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lora_fixtures  # noqa: E402  (tests/ is on sys.path only from the line above)
from pg_fixtures import PostgresServer  # noqa: E402

# an operator's own task set (classifier tests): customer-support intents, five examples each
OPS_ROWS = [("Is my flight on time?", "status"), ("Where is my parcel?", "status"), ("Has my order shipped yet?", "status"),
            ("Track package 12345", "status"), ("What's the status of my refund?", "status"),
            ("I want my money back", "refund"), ("Please refund my last payment", "refund"),
            ("How do I get a refund for a broken item?", "refund"), ("Refund request for order 991", "refund"),
            ("Charge me back, the product was wrong", "refund"),
            ("Hello there", "other"), ("Tell me a joke", "other"), ("What's your name?", "other"),
            ("Nice weather today", "other"), ("Thanks a lot!", "other")]


def _poll(fn, *, timeout_s: float, interval_s: float = 0.2, what: str = "condition"):
    """Poll fn() until truthy or the deadline passes (no fixed sleeps in tests)."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture(scope="session")
def poll():
    """`poll(fn, timeout_s=..., what=...)`: wait for a condition with a deadline (no fixed sleeps in tests)."""
    return _poll


@pytest.fixture()
def ops_data(tmp_path) -> Path:
    """An operator's own task set (OPS_ROWS) as a labeled JSONL file."""
    path = tmp_path / "ops.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in OPS_ROWS))
    return path


@pytest.fixture(scope="session")
def make_lora():
    """`make_lora(base_dir, out_dir, seed=...)`: a real PEFT LoRA with random non-zero weights (lora_fixtures)."""
    return lora_fixtures.make_lora


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from basemodel import prepare

    return prepare()


@dataclass
class VLLMHandle:
    url: str
    model: str  # served model name
    model_dir: Path
    managed: object
    max_loras: int  # the server's --max-loras: adapters that share one batch
    api_key: str  # vLLM refuses /v1/* without it

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"}


class _Loop:
    """An asyncio loop in a daemon thread (gateways and vLLM supervision live there)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = 900):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def bg_loop():
    lp = _Loop()
    yield lp
    lp.close()


@pytest.fixture(scope="session")
def vllm_server(model_dir, bg_loop):
    from router.config import BackendConfig
    from router.managed import ManagedVLLM

    cfg = BackendConfig(max_loras=4, max_cpu_loras=8, max_lora_rank=64, max_model_len=2048, restart=False)
    m = ManagedVLLM(cfg, str(model_dir))
    bg_loop.run(m.start())
    yield VLLMHandle(url=m.url, model=str(model_dir), model_dir=model_dir, managed=m, max_loras=cfg.max_loras,
                     api_key=m.api_key)
    bg_loop.run(m.stop())


@dataclass
class GatewayHandle:
    server: object
    loop: _Loop

    @property
    def target(self) -> str:
        return self.server.target

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible door, e.g. http://127.0.0.1:PORT (append /v1 for the openai client)."""
        return self.server.http.url

    def run(self, coro, timeout: float | None = 600):
        return self.loop.run(coro, timeout)

    def stop(self) -> None:
        """Stop now (frees a managed vLLM's memory before the session ends)."""
        self.loop.run(self.server.stop(grace_s=1), 120)


@pytest.fixture(scope="session")
def gateway_factory(vllm_server, bg_loop, tmp_path_factory):
    from router import config
    from router.server import build

    started: list[GatewayHandle] = []

    def make(overrides: dict | None = None, *, external: bool = True) -> GatewayHandle:
        # adapters made by tests live under pytest's temp folder: the test gateways may load from it
        o = {"port": 0, "http": {"port": 0}, "classifier": {"enabled": False}, "logs": {"enabled": False},
             "registry": str(tmp_path_factory.mktemp("registry")),
             "adapter_roots": [str(tmp_path_factory.getbasetemp())]}
        for k, v in (overrides or {}).items():
            if isinstance(v, dict) and isinstance(o.get(k), dict):
                o[k] = {**o[k], **v}
            else:
                o[k] = v
        if external:
            o.setdefault("backend", {})
            o["backend"] = {"mode": "external", "url": vllm_server.url, "model": str(vllm_server.model_dir),
                            "api_key": vllm_server.api_key,
                            **o["backend"]}
        cfg = config.load(None, o)
        server = bg_loop.run(build(cfg, progress=lambda *_: None))
        h = GatewayHandle(server, bg_loop)
        started.append(h)
        return h

    yield make
    for h in started:
        try:
            bg_loop.run(h.server.stop(grace_s=1), timeout=120)
        except Exception:
            pass


@pytest.fixture(scope="session")
def gateway(gateway_factory):
    """The default test gateway: no classifier, no logs, external mode against the session vLLM."""
    return gateway_factory()


@pytest.fixture()
def client(gateway):
    from router.client import Client

    with Client(gateway.target, timeout=300) as c:
        yield c


# ------------------------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (~1 s to start): `.url(db)`, `.new_database()`, `.execute(sql)`."""
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture()
def pg_url(postgres_server):
    """A fresh, empty database on the session's PostgreSQL server, as a URL with its password; dropped after."""
    name = postgres_server.new_database()
    yield postgres_server.url(name)
    try:
        postgres_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    except Exception:  # noqa: BLE001 - the server may be gone at session end
        pass
