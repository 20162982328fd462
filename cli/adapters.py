"""`specialist-router adapters ...`: the registry on disk, and deploys through the running gateway.

Registry-only commands (no gateway needed): `list`, `show`, `register`, `promote`, `validate`.
Gateway commands (AdminService over gRPC): `deploy`, `rollback`, `retire`, `loaded`, `load`, `unload`.
Every command takes `--json` for scripts (only JSON on stdout); each is a plain `main(args) -> int`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import basemodel
from adapters.registry import Registry
from adapters.validation import base_weight_shapes, validate_adapter
from cli.output import emit_json, err, json_command
from cli.remote import add_gateway_flags, client_from
from core.errors import InvalidArgument, NotFound, UserError

# ------------------------------------------------------------------------------------------- helpers

def _registry(args):
    return Registry(args.registry or None)


def _emit(args, data, table=None) -> None:
    """--json: data as JSON on stdout; else the rich table (or data pretty-printed)."""
    if getattr(args, "json", False) or table is None:
        emit_json(args, data, sort_keys=True)
        return
    Console().print(table)


def _table(title: str, columns: list[str], rows: list[list]):
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    return t


def _version_dict(av) -> dict:
    return {"task": av.task, "version": av.version, "name": av.name, "path": str(av.path), "manifest": av.manifest}


# --------------------------------------------------------------------------------- registry commands

def list_main(args) -> int:
    reg = _registry(args)
    rows = []
    for task in reg.tasks():
        aliases = reg.aliases(task)
        rows.append({"task": task, "production": aliases["production"], "candidate": aliases["candidate"],
                     "versions": [v.version for v in reg.versions(task)]})
    table = _table(f"adapters in {reg.root}", ["task", "production", "candidate", "versions"],
                   [[r["task"], r["production"] or "-", r["candidate"] or "-", ", ".join(r["versions"])] for r in rows])
    _emit(args, {"registry": str(reg.root), "generation": reg.generation(), "tasks": rows}, table)
    return 0


def show_main(args) -> int:
    reg = _registry(args)
    aliases = reg.aliases(args.task)
    history = reg.history(args.task)
    if args.version:
        av = reg.get(args.task, args.version)
        data = {**_version_dict(av), "aliases": [a for a, v in aliases.items() if v == av.version],
                "history": [h for h in history if h.get("from") == av.version or h.get("to") == av.version]}
        if args.json:
            _emit(args, data)
            return 0
        m = av.manifest
        con = Console()
        rows = [["name", av.name], ["path", av.path], ["aliases", ", ".join(data["aliases"]) or "-"],
                ["base", f"{m.get('base_model_id')} ({m.get('base_fingerprint', '')[:23]}...)"],
                ["rank / alpha", f"{m.get('rank')} / {m.get('alpha')}"],
                ["target modules", ", ".join(av.target_modules)], ["parent", m.get("parent") or "-"],
                ["data fingerprint", m.get("data_fingerprint") or "-"], ["created", m.get("created_at")],
                ["metrics", json.dumps(m.get("metrics") or {}, sort_keys=True)]]
        rows += [[f"file {k}", v[:16] + "..."] for k, v in sorted((m.get("files") or {}).items())]
        con.print(_table(av.name, ["field", "value"], rows))
    else:
        versions = reg.versions(args.task)
        if not versions and not history:
            raise NotFound(f"task {args.task!r} is not in the registry {reg.root}; "
                           f"`specialist-router adapters list` shows the registered tasks")
        canary = reg.canary(args.task)
        data = {"task": args.task, "aliases": aliases, "canary": canary,
                "versions": [_version_dict(v) for v in versions], "history": history}
        if args.json:
            _emit(args, data)
            return 0
        con = Console()
        con.print(_table(f"{args.task} versions", ["version", "aliases", "rank", "base", "metrics", "created"],
                         [[v.version, ", ".join(a for a, x in aliases.items() if x == v.version) or "-", v.rank,
                           v.manifest.get("base_model_id"), json.dumps(v.manifest.get("metrics") or {}, sort_keys=True),
                           v.manifest.get("created_at")] for v in versions]))
        if canary:
            con.print(f"live canary: version {canary['version']} takes {canary['share']:.0%} of {args.task}'s routed "
                      f"traffic (production {canary.get('production') or 'base'})")
    if not args.json:
        con.print(_table(f"{args.task} alias history", ["time", "alias", "from", "to", "actor", "reason"],
                         [[h.get("time"), h.get("alias"), h.get("from") or "-", h.get("to") or "-", h.get("actor"),
                           escape(_why(h))] for h in history]))
    return 0


def _why(h: dict) -> str:
    """The reason of a history line; a canary's end adds its outcome and the evidence's key counts."""
    why = str(h.get("reason") or "")
    ev = h.get("evidence") or {}
    if h.get("outcome"):
        why = f"{h['outcome']}: {why}"
    if ev.get("candidate"):
        c, p = ev["candidate"], ev.get("production") or {}
        why += (f" | candidate {c.get('bad')}/{c.get('requests')} bad, production {p.get('bad')}/{p.get('requests')} "
                f"bad, P(worse) {ev.get('p_worse')}")
    return why


def register_main(args) -> int:
    metrics = None
    if args.metrics:
        text = Path(args.metrics[1:]).read_text() if args.metrics.startswith("@") else args.metrics
        try:
            metrics = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"--metrics is not valid JSON ({exc}); pass e.g. '{{\"eval_loss\": 1.2}}' "
                                  "or @metrics.json") from exc
        if not isinstance(metrics, dict):
            raise InvalidArgument("--metrics must be a JSON object, e.g. '{\"eval_loss\": 1.2}'")
    # the prepared embedded default unless --model names a folder (prepared now on first use, as `serve` does)
    base_dir = Path(args.model).expanduser() if args.model else basemodel.prepare(progress=err)
    if not base_dir.is_dir():
        raise InvalidArgument(f"--model {args.model} is not a local model folder; pass the folder the "
                              "adapter was trained on (its weights are fingerprinted)")
    base_id = args.model_id
    if not base_id:
        try:
            base_id = basemodel.read_manifest(base_dir).get("model_id") or str(base_dir)
        except UserError:
            base_id = str(base_dir)
    reg = _registry(args)
    av = reg.register(args.task, args.peft_dir, base_model_id=base_id, base_fingerprint=basemodel.fingerprint(base_dir),
                      data_fingerprint=args.data_fingerprint or "", metrics=metrics, parent=args.parent or None,
                      base_shapes=base_weight_shapes(base_dir))
    if args.alias:
        reg.set_alias(av.task, args.alias, av.version, reason=args.reason or "register")
    if args.json:
        _emit(args, _version_dict(av))
    else:
        print(f"registered {av.name} at {av.path}" + (f" (alias {args.alias})" if args.alias else ""))
    return 0


def promote_main(args) -> int:
    reg = _registry(args)
    version = None if args.version in ("none", "-") else args.version
    before = reg.aliases(args.task)[args.alias]
    reg.set_alias(args.task, args.alias, version, reason=args.reason or "promote")
    data = {"task": args.task, "alias": args.alias, "from": before, "to": version, "generation": reg.generation()}
    if args.json:
        _emit(args, data)
    else:
        print(f"{args.task}: {args.alias} {before or '-'} -> {version or '-'}"
              + ("  (registry only; the gateway follows on its next poll, or run `adapters deploy`)"
                 if args.alias == "production" else ""))
    return 0


def validate_main(args) -> int:
    fp = None
    if args.model:
        if not Path(args.model).expanduser().is_dir():
            raise InvalidArgument(f"--model {args.model} is not a local model folder; pass the base model folder "
                                  "to compare fingerprints with")
        fp = basemodel.fingerprint(Path(args.model).expanduser())
    servable = args.servable_modules.split(",") if args.servable_modules else None
    info = validate_adapter(args.path, base_fingerprint=fp, base_model_id=args.model_id,
                            max_lora_rank=args.max_lora_rank, servable_modules=servable)
    if args.json:
        _emit(args, info)
    else:
        print(f"ok: {args.path} is a servable LoRA (rank {info['rank']}, modules {', '.join(info['target_modules'])})")
    return 0


# ---------------------------------------------------------------------------------- gateway commands

def deploy_main(args) -> int:
    with client_from(args) as c:
        r = c.deploy(args.task, args.version or None, timeout=args.timeout)
    if args.json:
        _emit(args, r.as_dict())
    else:
        print(f"deployed {r.adapter} for task {r.task} (was {r.previous_version or 'base'}; "
              f"switched in {r.swap_ms:.0f} ms)")
    return 0


def rollback_main(args) -> int:
    with client_from(args) as c:
        r = c.rollback(args.task, timeout=args.timeout)
    if args.json:
        _emit(args, r.as_dict())
    else:
        print(f"rolled back task {r.task} to {r.adapter}")
    return 0


def retire_main(args) -> int:
    with client_from(args) as c:
        r = c.retire(args.task, timeout=args.timeout)
    if args.json:
        _emit(args, r.as_dict())
    else:
        print(f"retired task {r.task}'s specialist (was version {r.previous_version or '-'}); the base model answers it")
    return 0


def loaded_main(args) -> int:
    with client_from(args) as c:
        r = c.list_adapters(timeout=args.timeout)
    data = {"adapters": [dataclasses.asdict(a) for a in r.loaded], "routes": r.routes,
            "replicas": [dataclasses.asdict(x) for x in r.replicas]}
    table = _table(f"adapters loaded in {args.gateway}",
                   ["name", "task", "version", "routed", "in flight", "replicas", "path"],
                   [[a.name, a.task, a.version, "yes" if a.routed else "no", a.in_flight, ",".join(a.replicas) or "-",
                     a.path] for a in r.loaded])
    _emit(args, data, table)
    if not args.json:
        routes = ", ".join(f"{t} -> {a}" for t, a in sorted(r.routes.items())) or "none (the base model answers all)"
        print(f"routes: {routes}")
        for x in r.replicas:
            state = "up" if x.up else f"DOWN ({x.last_error or 'not answering'})"
            print(f"replica {x.name} {x.url}: {state}, {x.in_flight} in flight, holds "
                  f"{', '.join(x.adapters) or 'no adapter'} ({x.loads} loads, {x.unloads} unloads, "
                  f"{x.failovers} failovers, {x.restarts} restarts)")
    return 0


def load_main(args) -> int:
    path = str(Path(args.path).expanduser().absolute())  # the gateway resolves links itself
    with client_from(args) as c:
        info = c.load_adapter(args.name, path, timeout=args.timeout)
    if args.json:
        _emit(args, dataclasses.asdict(info))
    else:
        print(f"loaded {info.name} from {info.path}; send requests with adapter={info.name!r} (not routed to a task)")
    return 0


def unload_main(args) -> int:
    with client_from(args) as c:
        c.unload_adapter(args.name, timeout=args.timeout)
    if args.json:
        _emit(args, {"unloaded": args.name})
    else:
        print(f"unloaded {args.name}")
    return 0


# -------------------------------------------------------------------------------------------- parser

def add_commands(subparsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    reg = argparse.ArgumentParser(add_help=False)
    reg.add_argument("--registry", default="", help="registry root (default: <data dir>/adapters, "
                                                    "data dir from $SPECIALIST_ROUTER_HOME)")
    gw = argparse.ArgumentParser(add_help=False)
    add_gateway_flags(gw)

    p = subparsers.add_parser("adapters", help="LoRA specialist registry: list, register, promote, deploy",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="adapters_command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("list", parents=[common, reg], help="tasks with their production/candidate versions")
    s.set_defaults(func=list_main)

    s = sub.add_parser("show", parents=[common, reg], help="a task's versions and alias history, or one manifest")
    s.add_argument("task")
    s.add_argument("version", nargs="?", default="")
    s.set_defaults(func=show_main)

    s = sub.add_parser("register", parents=[common, reg], help="validate a PEFT folder and add it as the next version")
    s.add_argument("task")
    s.add_argument("peft_dir")
    s.add_argument("--model", default=None,
                   help="base model folder the adapter was trained on (default: the prepared SmolLM2)")
    s.add_argument("--model-id", default="", help="base model id recorded in the manifest (default: from the model "
                                                  "folder)")
    _old_spellings(s)
    s.add_argument("--metrics", default="", help="JSON object of evaluation metrics, or @file.json")
    s.add_argument("--data-fingerprint", default="", help="fingerprint of the training data")
    s.add_argument("--parent", default="", help="version this one derives from / replaces")
    s.add_argument("--alias", choices=["candidate", "production"], default=None,
                   help="also point this alias at the new version (registry only)")
    s.add_argument("--reason", default="", help="recorded in the alias history")
    s.set_defaults(func=register_main)

    s = sub.add_parser("promote", parents=[common, reg],
                       help="move an alias to a version in the registry (no gateway call; use deploy to serve it)")
    s.add_argument("task")
    s.add_argument("version", help="version number, or 'none' to clear the alias")
    s.add_argument("--alias", choices=["candidate", "production"], required=True)
    s.add_argument("--reason", default="", help="recorded in the alias history")
    s.set_defaults(func=promote_main)

    s = sub.add_parser("validate", parents=[common], help="check a PEFT folder is servable, without registering it")
    s.add_argument("path")
    s.add_argument("--model", default=None, help="base model folder to compare fingerprints with")
    s.add_argument("--model-id", default=None, help="base model id (picks servable modules: gpt-oss vs Llama-like)")
    _old_spellings(s)
    s.add_argument("--max-lora-rank", type=int, default=None, help="the server's --max-lora-rank")
    s.add_argument("--servable-modules", default="", help="comma-separated module names the engine serves")
    s.set_defaults(func=validate_main)

    s = sub.add_parser("deploy", parents=[common, gw],
                       help="gateway: validate, load and route a version (default: the candidate)")
    s.add_argument("task")
    s.add_argument("version", nargs="?", default="")
    s.set_defaults(func=deploy_main)

    s = sub.add_parser("rollback", parents=[common, gw], help="gateway: deploy the previous production version")
    s.add_argument("task")
    s.set_defaults(func=rollback_main)

    s = sub.add_parser("retire", parents=[common, gw], help="gateway: stop routing the task to a specialist")
    s.add_argument("task")
    s.set_defaults(func=retire_main)

    s = sub.add_parser("loaded", parents=[common, gw], help="gateway: adapters it serves, which vLLM replica holds each, the routes")
    s.set_defaults(func=loaded_main)

    s = sub.add_parser("load", parents=[common, gw],
                       help="gateway: load a PEFT folder under a name (not routed; use it with adapter=NAME)")
    s.add_argument("name", help="the name requests use (adapter=NAME, model=NAME over HTTP)")
    s.add_argument("path", help="PEFT folder inside a folder the gateway loads from (its adapter roots)")
    s.set_defaults(func=load_main)

    s = sub.add_parser("unload", parents=[common, gw], help="gateway: unload an adapter loaded with `load`")
    s.add_argument("name")
    s.set_defaults(func=unload_main)

    for action in sub.choices.values():  # --json: only JSON on stdout (cli.output)
        action.set_defaults(func=json_command(action.get_default("func")))


def _old_spellings(s: argparse.ArgumentParser) -> None:
    """--base-model / --base-model-id: the old spellings of --model / --model-id, accepted but not shown."""
    s.add_argument("--base-model", dest="model", default=None, help=argparse.SUPPRESS)
    s.add_argument("--base-model-id", dest="model_id", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
