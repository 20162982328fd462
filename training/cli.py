"""`specialist-router train`: build a LoRA specialist for one task from the logs.

This module must not import torch: `--device` is applied (CUDA_VISIBLE_DEVICES) before anything loads it.
"""
from __future__ import annotations

import argparse
import json


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("train", help="train, evaluate and (if better) register a task's LoRA specialist",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", help="task to specialise (code, math, writing, translation, summarization, extraction, general)")
    p.add_argument("--profile", choices=["quick", "standard", "full"], help="step budget: quick (CPU, <= 20 min), standard, full")
    p.add_argument("--device", help="cpu | cuda | cuda:N (set before torch is imported)")
    p.add_argument("--backend", choices=["auto", "peft", "unsloth"], help="trainer backend")
    p.add_argument("--deploy", action="store_true", default=None, help="deploy through the gateway after a passed gate")
    p.add_argument("--gateway", help="gateway address for --deploy (default 127.0.0.1:50051)")
    p.add_argument("--config", help="YAML file with any TrainConfig field (see docs/training.md)")
    p.add_argument("--db", help="log store SQLite file (default <data dir>/logs/router.sqlite3)")
    p.add_argument("--since", help="only logs at/after this time (ISO 8601 or unix seconds)")
    p.add_argument("--until", help="only logs before this time (ISO 8601 or unix seconds)")
    p.add_argument("--run-dir", dest="run_dir", help="run folder (default <data dir>/runs/<task>-<time>)")
    p.add_argument("--resume", action="store_true", default=None, help="continue an existing --run-dir from its last checkpoint")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="override the profile's step budget")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field, e.g. --set batch_size=2 --set margin=0.02 (repeatable)")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run report as JSON")
    p.set_defaults(func=main)


def config_from_args(args):
    from router.errors import InvalidArgument

    from .config import load

    overrides = {k: getattr(args, k, None) for k in ("task", "profile", "device", "backend", "deploy", "gateway",
                                                     "db", "since", "until", "run_dir", "resume", "max_steps")}
    for item in args.set_ or []:
        if "=" not in item:
            raise InvalidArgument(f"--set {item!r}: expected KEY=VALUE, e.g. --set batch_size=2")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v
    return load(args.config, overrides)


def main(args) -> int:
    cfg = config_from_args(args)
    from .pipeline import run  # imports no torch at module level; run() applies the device first

    report = run(cfg, show_progress=not args.no_progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        g = report.gate
        print(f"run dir: {report.run_dir}")
        print(f"data:    {report.data.get('train')} train / {report.data.get('eval')} eval "
              f"(of {report.data.get('records_in')} records; dropped {report.data.get('dropped_by')})")
        print(f"train:   {report.train.get('steps')} steps in {report.train.get('seconds')} s, "
              f"loss {report.train.get('first_loss')} -> {report.train.get('final_loss')}")
        if g:
            prod = f", production {g['production_loss']:.4f}" if g.get("production_loss") is not None else ""
            print(f"gate:    candidate {g['candidate_loss']:.4f} vs base {g['base_loss']:.4f}{prod}, "
                  f"forgetting {g['forgetting']:+.2%} -> {'PASSED' if g['passed'] else 'REJECTED'}")
        for w in report.warnings:
            print(f"warning: {w}")
        print(f"result:  {report.status}" + (f" ({report.adapter})" if report.adapter else "")
              + (f": {report.message}" if report.message else ""))
    return 0 if report.status in ("promoted", "deployed", "trained") else 1
