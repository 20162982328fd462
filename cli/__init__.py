"""`specialist-router` command line: one entry point, one module per command group.

`cli.gateway` (serve, demo, model), `cli.classifier`, `cli.adapters`, `cli.logs` and `cli.train` each add their
commands with `add_commands(subparsers)`; each command is a plain function `main(args) -> int`, so
`python -m cli ...` and the console script run the same code. Settings flags are derived from the typed
configs (`core.config`), so `--help` shows the true defaults.

Errors: a `core.errors.UserError` exits with status 2 and one line saying what to fix; a `ServiceError`
(unavailable, deadline) with status 1 and one line; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from cli import adapters, classifier, gateway, logs, train
from cli import loop as loop_cmd
from core.errors import ServiceError, UserError

COMMAND_MODULES = (gateway, classifier, adapters, logs, train, loop_cmd)


def _version() -> str:
    try:
        return version("specialist-router")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specialist-router", description=(
        "Serve per-task LoRA specialists on one base model, route every prompt to the right one, and build "
        "better specialists from the traffic."))
    parser.add_argument("--version", action="version", version=f"specialist-router {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
