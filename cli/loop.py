"""`specialist-router loop`: the controller that retrains, canaries and promotes or rolls back specialists.

`loop` runs until stopped; `loop run-once` does one pass; `loop status` shows each task's production, canary,
training run and last decision; `loop pause|resume [TASK]` stop and restart automatic decisions (all tasks without
TASK); `loop cancel TASK` ends a live canary, production unchanged. A person's `adapters deploy|rollback` during a
canary wins: the loop cancels the canary at its next pass.
"""
from __future__ import annotations

import argparse
import signal
import sys

from cli.output import emit_json, json_command
from core import config
from core.envs import LOOP_PREFIX
from loop import config as loop_config
from loop.config import LoopConfig
from loop.controller import Controller, set_paused


def _controller(args, *, quiet: bool = False) -> Controller:
    cfg = loop_config.load(getattr(args, "config", None), config.overrides_from_args(args))
    echo = (lambda *a: print(*a, file=sys.stderr)) if quiet else (lambda *a: print(*a, flush=True))
    return Controller(cfg, echo=echo)


def run_main(args) -> int:
    c = _controller(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"[loop] managing {', '.join(c.tasks()) or 'no tasks yet'}; state in {c.state_dir}", flush=True)
    c.run_forever()
    return 0


@json_command
def run_once_main(args) -> int:
    c = _controller(args, quiet=args.json)
    c.acquire()
    try:
        events = c.run_once()
    finally:
        c.release()
    if args.json:
        emit_json(args, events)
    return 0


@json_command
def status_main(args) -> int:
    st = _controller(args, quiet=True).status()
    if args.json:
        emit_json(args, st)
        return 0
    p = st["paused"]
    print(f"state: {st['state_dir']}" + ("  (ALL PAUSED)" if p["all"] else ""))
    for task, t in st["tasks"].items():
        flags = " [paused]" if task in p["tasks"] else ""
        canary = t["canary"]
        line = f"{task}{flags}: production {t['production'] or '-'}, candidate {t['candidate'] or '-'}"
        if canary:
            line += f", canary v{canary['version']} at {canary['share']:.0%}"
        if t["training"]:
            line += f", training {'running' if t['training']['alive'] else 'stopped'} ({t['training']['run_dir']})"
        print(line)
        last = t.get("last")
        if last:
            print(f"    last: {last.get('event')} {('- ' + str(last.get('reason'))) if last.get('reason') else ''}")
    return 0


def pause_main(args) -> int:
    c = _controller(args, quiet=True)
    p = set_paused(c.state_dir, args.task, True)
    print(f"paused: {'all tasks' if p['all'] else ', '.join(p['tasks'])}")
    return 0


def resume_main(args) -> int:
    c = _controller(args, quiet=True)
    p = set_paused(c.state_dir, args.task, False)
    print("paused: " + ("all tasks" if p["all"] else (", ".join(p["tasks"]) or "none")))
    return 0


def cancel_main(args) -> int:
    c = _controller(args, quiet=True)
    c.registry.end_canary(args.task, "cancelled", reason=args.reason)
    print(f"canary of {args.task} cancelled; production unchanged")
    return 0


def _common(p) -> None:
    # SUPPRESS: a subcommand's own flag must not reset one given before it (`loop --config F status`)
    p.add_argument("--config", default=argparse.SUPPRESS,
                   help=f"YAML config file; its `loop:` section (defaults < file < env {LOOP_PREFIX}* < flags)")
    config.add_flags(p, LoopConfig)


def add_commands(sub) -> None:
    p = sub.add_parser("loop", help="retrain, canary and promote or roll back specialists with no person in the loop",
                       description=__doc__.splitlines()[0])
    _common(p)
    p.set_defaults(func=run_main)
    lsub = p.add_subparsers(dest="loop_cmd", metavar="SUBCOMMAND")
    q = lsub.add_parser("run-once", help="one pass over the tasks, then exit")
    q.add_argument("--json", action="store_true", help="print the pass's events as JSON on stdout")
    _common(q)
    q.set_defaults(func=run_once_main)
    q = lsub.add_parser("status", help="production, canary, training run and last decision per task")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    _common(q)
    q.set_defaults(func=status_main)
    for name, fn, what in (("pause", pause_main, "stop automatic runs and decisions"),
                           ("resume", resume_main, "resume automatic runs and decisions")):
        q = lsub.add_parser(name, help=f"{what} for TASK (all tasks without TASK)")
        q.add_argument("task", nargs="?", default=None)
        _common(q)
        q.set_defaults(func=fn)
    q = lsub.add_parser("cancel", help="end TASK's live canary; production unchanged")
    q.add_argument("task")
    q.add_argument("--reason", default="cancelled by an operator")
    _common(q)
    q.set_defaults(func=cancel_main)
