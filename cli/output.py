"""Output rules every command follows: with `--json`, stdout carries the JSON document and nothing else.

`json_command(main)` wraps a command: when `args.json` is set, everything the command, a progress bar or a
library prints while it runs goes to stderr (stdout is redirected there), and `emit_json(args, data)` writes the
document to the real stdout. `echo(args)` is the command's own progress printer: stderr with --json, stdout
otherwise. `err(*a)` prints to stderr.
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
from typing import Any, Callable

_REAL_STDOUT = "_json_stdout"


def json_command(fn: Callable[[Any], int]) -> Callable[[Any], int]:
    """`fn(args)` with stdout sent to stderr while it runs when `args.json` is set (see the module doc)."""

    @functools.wraps(fn)
    def main(args) -> int:
        if not getattr(args, "json", False):
            return fn(args)
        setattr(args, _REAL_STDOUT, sys.stdout)
        with contextlib.redirect_stdout(sys.stderr):
            return fn(args)

    return main


def emit_json(args, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """The command's JSON document on the real stdout (one line when indent is None: JSON Lines)."""
    out = getattr(args, _REAL_STDOUT, None) or sys.stdout
    print(json.dumps(data, indent=indent, sort_keys=sort_keys, default=str, ensure_ascii=False), file=out, flush=True)


def err(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def echo(args) -> Callable[..., None]:
    """Progress lines: stderr with --json (stdout holds only the document), stdout otherwise."""
    return err if getattr(args, "json", False) else print
