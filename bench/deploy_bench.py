"""Deploy/rollback under load, and mixed-adapter throughput (issue: adapter registry and deployment).

  .venv/bin/python bench/deploy_bench.py [--cycles 20] [--concurrency 8] [--json-out FILE]

1. Starts vLLM (managed, --max-loras 2 --max-cpu-loras 4) and a gateway process on a fresh registry holding
   `code` v1 and v2 plus 5 other tasks' specialists (real peft LoRAs on the real base, non-zero weights).
2. Under continuous load (concurrency 8, requests cycling over all tasks and the base model) it runs N
   cycles of deploy code v2 / rollback to v1 and reports failed requests (must be 0) and the swap time:
   deploy call start -> first request answered by the new version, p50/p99.
3. Throughput at concurrency 8: base only vs requests rotating over 1, 2 and 6 adapters (6 > 2 GPU slots and
   > 4 CPU slots, so vLLM swaps adapters in and out).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TASKS = ["code", "math", "writing", "translation", "summarization", "extraction"]
PROMPTS = ["Write a SQL query that counts users per day.", "What is 17 * 23?", "Draft a short thank-you email.",
           "Translate 'good night' into German.", "Summarize: the meeting moved to Friday.", "Extract the date: due 3 May."]


def pct(xs, q):
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")


async def main(args) -> dict:
    import grpc
    from gateway_bench import start_gateway, wait_gateway
    from lora_fixtures import make_lora

    from adapters.registry import Registry
    from basemodel import fingerprint, prepare
    from router.config import BackendConfig
    from router.managed import ManagedVLLM, free_port
    from router.v1 import router_pb2 as pb
    from router.v1 import router_pb2_grpc as pbg

    model = prepare()
    work = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
    reg = Registry(work / "registry")
    fp = fingerprint(model)
    kw = dict(base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct", base_fingerprint=fp)
    reg.register("code", make_lora(model, work / "code-v1", seed=1), **kw)
    reg.register("code", make_lora(model, work / "code-v2", seed=2), **kw)
    for i, t in enumerate(TASKS[1:]):
        reg.register(t, make_lora(model, work / f"{t}-v1", seed=10 + i), **kw)
    for t in TASKS:
        reg.set_alias(t, "production", "1", reason="bench setup")
    managed = ManagedVLLM(BackendConfig(max_loras=2, max_cpu_loras=4, max_model_len=2048), str(model))
    await managed.start()
    port = free_port()
    os.environ["SPECIALIST_ROUTER__REGISTRY"] = str(reg.root)
    # the managed vLLM runs --scheduling-policy priority (BackendConfig's default for managed): the gateway's smoke
    # test may jump the queue; --no-priority keeps it in line with user traffic, for comparison
    os.environ["SPECIALIST_ROUTER__BACKEND__PRIORITY"] = "off" if args.no_priority else "on"
    proc = start_gateway(managed.url, str(model), port, classifier=False, logs=False, data_dir=work,
                         api_key=managed.api_key)
    target = f"127.0.0.1:{port}"
    result: dict = {}
    try:
        await wait_gateway(target)
        async with grpc.aio.insecure_channel(target) as ch:
            stub, admin = pbg.RouterServiceStub(ch), pbg.AdminServiceStub(ch)

            async def one(task: str, i: int) -> tuple[float, str]:
                req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=PROMPTS[i % len(PROMPTS)])],
                                         sampling=pb.SamplingParams(max_tokens=args.max_tokens, temperature=0),
                                         task=task if task != "base" else "", adapter="base" if task == "base" else "")
                r = await stub.Generate(req, timeout=600)
                return time.perf_counter(), r.adapter, r.usage.completion_tokens

            # ---- 1) deploy/rollback cycles under load
            failures, served = [], []
            stop = asyncio.Event()

            async def worker(w: int) -> None:
                i = w
                while not stop.is_set():
                    task = (TASKS + ["base"])[i % (len(TASKS) + 1)]
                    i += 1
                    try:
                        served.append(await one(task, i))
                    except grpc.aio.AioRpcError as e:
                        failures.append(f"{e.code().name}: {e.details()}")

            workers = [asyncio.create_task(worker(w)) for w in range(args.concurrency)]
            swaps, calls = [], []
            for cyc in range(args.cycles):
                for version in ("2", "1"):
                    t0 = time.perf_counter()
                    r = await admin.DeployAdapter(pb.DeployAdapterRequest(task="code", version=version), timeout=600)
                    calls.append((time.perf_counter() - t0) * 1000)  # validate, load, smoke, switch
                    while True:  # first request answered by the new version after the call started
                        hits = [t for t, a, _ in served if a == r.adapter and t >= t0]
                        if hits:
                            swaps.append((min(hits) - t0) * 1000)
                            break
                        await asyncio.sleep(0.05)
                print(f"[deploy-bench] cycle {cyc + 1}/{args.cycles}: swap {swaps[-2]:.0f} / {swaps[-1]:.0f} ms "
                      f"(deploy call {calls[-2]:.0f} / {calls[-1]:.0f} ms), "
                      f"requests {len(served)}, failed {len(failures)}", flush=True)
            stop.set()
            await asyncio.gather(*workers)
            result["cycles"] = dict(deploys=len(swaps), requests=len(served), failed=len(failures),
                                    failures=failures[:5], swap_ms_p50=pct(swaps, 50), swap_ms_p99=pct(swaps, 99),
                                    deploy_call_ms_p50=pct(calls, 50), deploy_call_ms_p99=pct(calls, 99),
                                    priority=not args.no_priority)

            # ---- 2) throughput: base-only vs rotating over 1, 2, 6 adapters
            async def throughput(tasks: list[str], n: int) -> float:
                sem = asyncio.Semaphore(args.concurrency)
                toks = 0

                async def go(i):
                    nonlocal toks
                    async with sem:
                        toks += (await one(tasks[i % len(tasks)], i))[2]
                t0 = time.perf_counter()
                await asyncio.gather(*(go(i) for i in range(n)))
                return toks / (time.perf_counter() - t0)

            tp = {}
            mixes = [("base", ["base"]), ("1 adapter", TASKS[:1]), ("2 adapters", TASKS[:2]), ("6 adapters", TASKS)]
            for name, tasks in [] if args.skip_throughput else mixes:
                tp[name] = await throughput(tasks, args.requests)
                print(f"[deploy-bench] {name:<11} {tp[name]:.1f} tok/s", flush=True)
            result["throughput_tok_s"] = tp
            result["throughput_ratio_vs_base"] = {k: v / tp["base"] for k, v in tp.items()} if tp else {}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        await managed.stop()
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--requests", type=int, default=48, help="requests per throughput measurement")
    p.add_argument("--no-priority", action="store_true", help="smoke tests queue like user traffic")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--json-out")
    asyncio.run(main(p.parse_args()))
