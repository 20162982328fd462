"""`specialist-router` command line: one entry point, one subcommand group per package.

Each package contributes its commands through `add_commands(subparsers)` in its own `cli` module
(`classifier.cli`, `adapters.cli`, `training.cli`, `router.logs.cli`), and each command is a plain
function `main(args) -> int` so `python -m ...` and the console script run the same code.
Errors a user can fix exit with status 2 and a one-line message, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module -> provides add_commands(subparsers)
COMMAND_MODULES = ("router.commands", "classifier.cli", "adapters.cli", "router.logs.cli", "training.cli")


class UserError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specialist-router", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name and mod.startswith(exc.name):
                continue  # that package is not built yet
            raise
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # user-fixable errors carry their own message
        from router.errors import is_user_error

        if is_user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
