"""`python bench/soak_bench.py --minutes 30`: a bounded soak of one gateway (its own process, managed vLLM, logs
and classifier on) under mixed traffic, with deploys, rollbacks and one kill -9 of the engine.

Traffic (4 client threads, SDK): classifier-routed unary requests, streams, streams cancelled after their first
chunk, requests pinned to a task's specialist, requests with a deadline too short to finish. Every 45 s a deploy
or a rollback of one of two tasks; at 40 % of the run the vLLM child is killed with SIGKILL (the gateway
restarts it and reloads its adapters).

Reported: requests by outcome; failures by status, split into expected (DEADLINE_EXCEEDED of the short-deadline
requests, CANCELLED of the cancelled streams, UNAVAILABLE while the engine restarts) and unexpected (any other);
p50/p99 end-to-end latency per minute and the drift from the first to the last full minute; the gateway's RSS
sampled every 5 s and its growth trend (least-squares slope after the first two minutes, MB per 10 minutes).
Goal: 0 unexpected failures, no memory growth trend. Bounded: it stops by itself after --minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPTS = ["Write a Python function that reverses a string.", "What is 17 times 23?",
           "Write a haiku about autumn.", "Translate 'good morning' to French.",
           "Summarize: the meeting moved to Tuesday because the room was booked.", "Tell me a fun fact."]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def engine_groups(gateway_pid: int) -> list[int]:
    """Process groups of the gateway's children that run in a group of their own: the managed vLLM."""
    out = subprocess.run(["pgrep", "-P", str(gateway_pid)], capture_output=True, text=True).stdout.split()
    groups = set()
    for p in map(int, out):
        try:
            if os.getpgid(p) != os.getpgid(gateway_pid):
                groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    return sorted(groups)


def slope_per_10min(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 3:
        return 0.0
    xs, ys = [t for t, _ in samples], [m for _, m in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs) or 1.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 600


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--json-out", help="write the figures as JSON here")
    args = ap.parse_args(argv)

    import grpc
    from lora_fixtures import make_lora

    from adapters.registry import Registry
    from basemodel import fingerprint, prepare
    from router.client import Client, GatewayError, RetryPolicy
    from router.managed import free_port

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    model = prepare()
    reg = Registry(work / "registry")
    kw = dict(base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct", base_fingerprint=fingerprint(model))
    for task, seed in (("code", 1), ("math", 3)):
        reg.register(task, make_lora(model, work / f"{task}-v1", seed=seed), **kw)
        reg.register(task, make_lora(model, work / f"{task}-v2", seed=seed + 1), **kw)
        reg.set_alias(task, "production", "1", reason="soak setup")
    port = free_port()
    env = dict(os.environ, SPECIALIST_ROUTER__REGISTRY=str(reg.root),
               SPECIALIST_ROUTER__LOGS__PATH=str(work / "logs.sqlite3"),
               SPECIALIST_ROUTER__BACKEND__MAX_LORAS="2", SPECIALIST_ROUTER__BACKEND__MAX_CPU_LORAS="4")
    gw = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), "--http-port", "0", "--log-level", "WARNING"],
                          env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                          stderr=open(work / "gateway.log", "wb"))
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            with Client(target, timeout=10, retry=RetryPolicy(attempts=1)) as c:
                c.generate("hi", max_tokens=1)
            break
        except GatewayError:
            if time.monotonic() > deadline or gw.poll() is not None:
                raise SystemExit(f"the gateway did not start; see {work / 'gateway.log'}")
            time.sleep(2)
    print(f"[soak] gateway {target} up (work dir {work}); running {args.minutes:g} min", flush=True)

    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    kill_at = t0 + 0.4 * args.minutes * 60
    outcomes: Counter = Counter()
    failures: Counter = Counter()
    unexpected: list[str] = []
    lat = defaultdict(list)  # minute -> e2e seconds of OK requests
    mem: list[tuple[float, float]] = []
    restart_window = [None, None]  # (kill time, first OK after it)
    lock = threading.Lock()

    def record(kind: str, ok: bool, code=None, message: str = "", started: float = 0.0) -> None:
        now = time.monotonic()
        with lock:
            outcomes[(kind, "ok" if ok else code.name)] += 1
            if ok:
                lat[int((started - t0) // 60)].append(now - started)
                if restart_window[0] is not None and restart_window[1] is None and started > restart_window[0]:
                    restart_window[1] = now
                return
            failures[code.name] += 1
            expected = (kind == "short_deadline" and code == grpc.StatusCode.DEADLINE_EXCEEDED) or \
                (kind == "cancel" and code == grpc.StatusCode.CANCELLED) or \
                (code == grpc.StatusCode.UNAVAILABLE and restart_window[0] is not None and
                 (restart_window[1] is None or started < restart_window[1]))
            if not expected:
                unexpected.append(f"{kind}: {code.name}: {message[:200]}")

    def client_loop(i: int) -> None:
        rnd = random.Random(i)
        with Client(target, timeout=120) as c:
            while time.monotonic() < end:
                kind = rnd.choice(["routed", "stream", "cancel", "specialist", "short_deadline"])
                p = rnd.choice(PROMPTS)
                s = time.monotonic()
                try:
                    if kind == "routed":
                        c.generate(p, max_tokens=args.max_tokens, temperature=0)
                    elif kind == "stream":
                        list(c.stream(p, max_tokens=args.max_tokens))
                    elif kind == "cancel":
                        it = c.stream(p, max_tokens=args.max_tokens)
                        next(it)
                        it.close()
                    elif kind == "specialist":
                        c.generate(p, task=rnd.choice(["code", "math"]), max_tokens=args.max_tokens)
                    else:
                        c.generate(p, max_tokens=200, timeout=0.3)
                    record(kind, True, started=s)
                except GatewayError as e:
                    record(kind, False, e.code, e.message, s)
                except StopIteration:
                    record(kind, True, started=s)

    def control_loop() -> None:
        rnd = random.Random(99)
        with Client(target, timeout=600) as c:
            next_swap = time.monotonic() + 45
            while time.monotonic() < end:
                now = time.monotonic()
                if restart_window[0] is None and now >= kill_at:
                    vllm = engine_groups(gw.pid)  # the managed vLLM, its engine workers with it
                    for g in vllm:
                        os.killpg(g, signal.SIGKILL)
                    with lock:
                        restart_window[0] = time.monotonic()
                    print(f"[soak] killed the engine ({vllm}) at {now - t0:.0f} s", flush=True)
                if now >= next_swap:
                    task = rnd.choice(["code", "math"])
                    try:
                        prod = c.list_adapters().routes.get(task, "")
                        c.deploy(task, "2" if prod.endswith("@1") else "1")
                        outcomes[("deploy", "ok")] += 1
                    except GatewayError as e:
                        outcomes[("deploy", e.code.name)] += 1
                        if restart_window[0] is None or restart_window[1] is not None:
                            unexpected.append(f"deploy: {e.code.name}: {e.message[:200]}")
                    next_swap = now + 45
                with lock:
                    mem.append((now - t0, rss_mb(gw.pid)))
                time.sleep(5)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
    threads.append(threading.Thread(target=control_loop))
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.killpg(gw.pid, signal.SIGTERM)
        try:
            gw.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(gw.pid, signal.SIGKILL)

    minutes = sorted(m for m in lat if (m + 1) * 60 <= args.minutes * 60 and len(lat[m]) >= 5)

    def p(q, xs):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    per_min = {m: {"n": len(lat[m]), "p50_ms": round(p(0.5, lat[m]), 1), "p99_ms": round(p(0.99, lat[m]), 1)}
               for m in minutes}
    steady = [(t, m) for t, m in mem if t >= 120]
    result = {
        "minutes": args.minutes, "clients": args.clients,
        "requests": sum(n for (k, _), n in outcomes.items() if k != "deploy"),
        "outcomes": {f"{k}:{s}": n for (k, s), n in sorted(outcomes.items())},
        "failures_by_status": dict(failures), "unexpected_failures": len(unexpected),
        "unexpected_examples": unexpected[:10],
        "engine_restart_s": round(restart_window[1] - restart_window[0], 1) if all(restart_window) else None,
        "latency_per_minute": per_min,
        "p99_drift_ms": round(per_min[minutes[-1]]["p99_ms"] - per_min[minutes[0]]["p99_ms"], 1) if minutes else None,
        "rss_mb_first_last": [round(mem[0][1], 1), round(mem[-1][1], 1)] if mem else None,
        "rss_slope_mb_per_10min": round(slope_per_10min(steady), 2),
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0 if not unexpected else 1


if __name__ == "__main__":
    sys.exit(main())
