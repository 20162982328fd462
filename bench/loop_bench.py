"""`python bench/loop_bench.py`: the loop controller's figures, on the embedded default.

1. `--rollback`: a broken candidate (a real LoRA with large random weights, registered directly) goes into a canary
   at `--share` of the task's traffic beside a healthy production specialist; real ShareGPT prompts are sent one by
   one through the gateway and the loop judges after each. Reported: requests until the rollback, how many of them
   the candidate answered (users who saw its answers), failed requests.
2. `--promotion`: real ShareGPT conversations imported into an empty log store; the loop (as its own process, the
   `quick` profile unless `--set` overrides) triggers a training run, the candidate passes the gate, goes into a
   canary at `--share` and is promoted once `--min-samples` live requests of each arm are judged; `--clients`
   users send the task's live traffic meanwhile (default 1, one request at a time). Reported: seconds from the
   trigger to the canary start (training + gate) and to the promotion.
3. `--canary-throughput`: gateway throughput with a canary active vs without, side by side: production
   specialists for three tasks, 8 concurrent clients sending real ShareGPT first turns over the three tasks and the
   base model (32 new tokens, greedy); rounds alternate between no canary and a canary of `code` at `--share`
   (started and ended in the registry between rounds, applied by the gateway's poll). Reported: tokens/s per mode
   and the ratio canary / no canary.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # lora_fixtures: a real PEFT LoRA with random weights


def _gateway(registry: Path, db: Path, url: str, model: str, api_key: str):
    from router import config
    from router.server import build

    cfg = config.load(None, {"port": 0, "http": {"enabled": False}, "classifier": {"enabled": False},
                             "registry": str(registry), "deploy": {"registry_poll_s": 0.5},
                             "logs": {"enabled": True, "path": str(db)},
                             "backend": {"mode": "external", "url": url, "model": model, "api_key": api_key}})
    return build(cfg, progress=lambda *_: None)


def rollback(args, work: Path, url: str, model: str, api_key: str) -> dict:
    from lora_fixtures import make_lora

    from adapters.registry import Registry
    from basemodel import fingerprint
    from convlog.sharegpt import first_turn_prompts
    from loop.config import LoopConfig
    from loop.controller import Controller
    from router.client import Client

    work.mkdir(parents=True, exist_ok=True)
    reg = Registry(work / "registry")
    fp = fingerprint(model)
    smol = "HuggingFaceTB/SmolLM2-135M-Instruct"
    reg.register("code", make_lora(model, work / "good", seed=21, lora_alpha=1), base_model_id=smol, base_fingerprint=fp)
    reg.register("code", make_lora(model, work / "broken", seed=22, lora_alpha=2048), base_model_id=smol,
                 base_fingerprint=fp)
    reg.set_alias("code", "production", "1", reason="bench")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = asyncio.run_coroutine_threadsafe(_gateway(work / "registry", work / "logs.sqlite3", url, model, api_key),
                                              loop).result(600)
    try:
        reg.start_canary("code", "2", share=args.share, reason="bench: broken candidate")
        deadline = time.monotonic() + 300
        while "code" not in server.table.canaries and time.monotonic() < deadline:
            time.sleep(0.2)
        ctl = Controller(LoopConfig(tasks=["code"], db=str(work / "logs.sqlite3"), registry=str(work / "registry"),
                                    state_dir=str(work / "loop")).validate(), echo=lambda *a: None)
        sent = failed = by_candidate = 0
        outcome = None
        with Client(server.target, timeout=300) as c:
            for p in first_turn_prompts(1000, max_chars=400):
                try:
                    r = c.generate(p, task="code", max_tokens=args.max_tokens, temperature=0)
                    by_candidate += r.adapter == "code@2"
                except Exception:
                    failed += 1
                sent += 1
                done = [e for e in ctl.run_once() if str(e.get("event", "")).startswith("canary_")]
                if done or sent >= args.max_requests:
                    outcome = done[0] if done else None
                    break
        return {"share": args.share, "requests_until_decision": sent, "answered_by_candidate": by_candidate,
                "failed": failed, "outcome": outcome and outcome["event"], "rule": outcome and outcome.get("reason"),
                "evidence": outcome and outcome.get("evidence")}
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace_s=1), loop).result(120)


def promotion(args, work: Path, url: str, model: str, api_key: str) -> dict:
    from adapters.registry import Registry
    from cli.logs import load_classifier
    from convlog.sharegpt import first_turn_prompts
    from convlog.sharegpt_import import import_sharegpt
    from convlog.store import open_store
    from router.client import Client

    work.mkdir(parents=True, exist_ok=True)
    db = work / "logs.sqlite3"
    t0 = time.perf_counter()
    with open_store(db) as store:
        imported = import_sharegpt(store, limit=args.conversations, classify=load_classifier(), progress=False)
    import_s = time.perf_counter() - t0
    cfg = work / "config.yaml"
    cfg.write_text(json.dumps({"loop": {
        "tasks": ["code"], "db": str(db), "registry": str(work / "registry"), "state_dir": str(work / "loop"),
        "poll_s": 2, "min_new_records": 50, "min_interval_h": 0, "canary_share": args.share,
        "min_samples": args.min_samples, "profile": "quick",
        "train_set": [f"base_model={model}", *args.set]}}))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = asyncio.run_coroutine_threadsafe(_gateway(work / "registry", db, url, model, api_key), loop).result(600)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "loop", "--config", str(cfg)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(work / "loop.log", "wb"))
    reg = Registry(work / "registry")
    try:
        t_trigger = time.perf_counter()  # the loop's first pass triggers at once: the data is already there
        while not any(h.get("alias") == "canary" for h in reg.history("code")):
            if proc.poll() is not None:
                raise RuntimeError(f"the loop exited; see {work / 'loop.log'}")
            time.sleep(2)
        t_canary = time.perf_counter()
        hist = [h for h in reg.history("code") if h.get("alias") == "canary" and h.get("outcome")]
        prompts = iter(first_turn_prompts(4000, max_chars=400))
        lock = threading.Lock()
        sent = [0]

        def client() -> None:  # live traffic for the task: `--clients` users, one request after another each
            with Client(server.target, timeout=300) as c:
                while not done.is_set():
                    with lock:
                        text = next(prompts)
                        sent[0] += 1
                    c.generate(text, task="code", max_tokens=args.max_tokens, temperature=0)

        done = threading.Event()
        users = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
        for u in users:
            u.start()
        while not hist:
            time.sleep(1)
            hist = [h for h in reg.history("code") if h.get("alias") == "canary" and h.get("outcome")]
        t_end = time.perf_counter()
        done.set()
        for u in users:
            u.join(300)
        state = json.loads((work / "loop" / "state.json").read_text())
        return {"imported": imported.__dict__ if hasattr(imported, "__dict__") else str(imported),
                "import_s": round(import_s, 1), "trigger_to_canary_s": round(t_canary - t_trigger, 1),
                "trigger_to_decision_s": round(t_end - t_trigger, 1), "clients": args.clients,
                "requests_during_canary": sent[0], "outcome": hist[-1]["outcome"],
                "rule": hist[-1]["reason"], "production": reg.aliases("code")["production"],
                "last": state["tasks"]["code"]["last"]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        asyncio.run_coroutine_threadsafe(server.stop(grace_s=1), loop).result(120)


def canary_throughput(args, work: Path, url: str, model: str, api_key: str) -> dict:
    from lora_fixtures import make_lora

    from adapters.registry import Registry
    from basemodel import fingerprint
    from convlog.sharegpt import first_turn_prompts
    from router.client import AsyncClient, GatewayError, RetryPolicy

    work.mkdir(parents=True, exist_ok=True)
    reg = Registry(work / "registry")
    kw = dict(base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct", base_fingerprint=fingerprint(model))
    tasks = ["code", "math", "writing"]
    for i, t in enumerate(tasks):
        reg.register(t, make_lora(model, work / f"{t}-1", seed=200 + i), **kw)
        reg.set_alias(t, "production", "1", reason="bench setup")
    reg.register("code", make_lora(model, work / "code-2", seed=210), **kw)  # the canary version
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = asyncio.run_coroutine_threadsafe(_gateway(work / "registry", work / "logs.sqlite3", url, model, api_key),
                                              loop).result(600)
    prompts = first_turn_prompts(args.rounds * args.requests + 50, max_chars=400)
    mix = tasks + ["base"]

    async def one_round(batch: list[tuple[str, str]]) -> tuple[int, float, int, int]:
        queue, tokens, errors, canary = list(reversed(batch)), 0, 0, 0

        async def worker():
            nonlocal tokens, errors, canary
            async with AsyncClient(server.target, timeout=600, retry=RetryPolicy(attempts=1)) as c:
                while queue:
                    task, text = queue.pop()
                    try:
                        r = await c.generate([{"role": "user", "content": text}], max_tokens=32, temperature=0,
                                             **({"adapter": "base"} if task == "base" else {"task": task}))
                        tokens += r.usage.completion_tokens
                        canary += r.route.reason == "canary"
                    except GatewayError:
                        errors += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(8)))
        return tokens, time.perf_counter() - t0, errors, canary

    def wait_for(active: bool) -> None:
        deadline = time.monotonic() + 300
        while ("code" in server.table.canaries) != active:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not apply the canary change within 300 s")
            time.sleep(0.2)

    per = {"no canary": [0, 0.0, 0, 0], "canary": [0, 0.0, 0, 0]}
    try:
        asyncio.run(one_round([(mix[i % 4], prompts[i]) for i in range(8)]))  # warm-up
        k = 8
        for rnd in range(args.rounds):
            batch = [(mix[(k + i) % 4], prompts[k + i]) for i in range(args.requests)]
            k += args.requests
            for mode in (("no canary", "canary") if rnd % 2 == 0 else ("canary", "no canary")):
                live = reg.canary("code") is not None
                if mode == "canary" and not live:
                    reg.start_canary("code", "2", args.share, reason="bench")
                elif mode == "no canary" and live:
                    reg.end_canary("code", "cancelled", reason="bench")
                wait_for(mode == "canary")
                res = asyncio.run(one_round(batch))
                per[mode] = [a + b for a, b in zip(per[mode], res)]
                print(f"round {rnd} {mode:10} {res[0] / res[1]:6.1f} tok/s, {res[2]} errors, {res[3]} canary answers",
                      flush=True)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace_s=1), loop).result(120)
    out = {m: dict(tok_s=v[0] / v[1], errors=v[2], canary_answers=v[3]) for m, v in per.items()}
    out["ratio_canary_over_none"] = out["canary"]["tok_s"] / out["no canary"]["tok_s"]
    out["share"] = args.share
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rollback", action="store_true")
    p.add_argument("--promotion", action="store_true")
    p.add_argument("--canary-throughput", action="store_true")
    p.add_argument("--clients", type=int, default=1, help="concurrent users sending the task's traffic (--promotion)")
    p.add_argument("--rounds", type=int, default=4, help="rounds per mode (--canary-throughput)")
    p.add_argument("--requests", type=int, default=48, help="requests per round (--canary-throughput)")
    p.add_argument("--share", type=float, default=0.2, help="canary share (the loop's default)")
    p.add_argument("--max-requests", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--conversations", type=int, default=3000, help="ShareGPT conversations imported (--promotion)")
    p.add_argument("--min-samples", type=int, default=30)
    p.add_argument("--set", action="append", default=[], help="extra train settings KEY=VALUE")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    from basemodel import prepare
    from router.config import BackendConfig
    from router.managed import ManagedVLLM

    model = str(prepare())
    managed = ManagedVLLM(BackendConfig(max_model_len=2048, max_loras=4), model)
    asyncio.run(managed.start())
    out = {}
    try:
        with tempfile.TemporaryDirectory() as d:
            if args.rollback:
                out["rollback"] = rollback(args, Path(d) / "rollback", managed.url, model, managed.api_key)
                print(json.dumps(out["rollback"], indent=2, default=str), flush=True)
            if args.canary_throughput:
                out["canary_throughput"] = canary_throughput(args, Path(d) / "canary-tp", managed.url, model,
                                                             managed.api_key)
                print(json.dumps(out["canary_throughput"], indent=2, default=str), flush=True)
            if args.promotion:
                out["promotion"] = promotion(args, Path(d) / "promotion", managed.url, model, managed.api_key)
                print(json.dumps(out["promotion"], indent=2, default=str), flush=True)
    finally:
        asyncio.run(managed.stop())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
