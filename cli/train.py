"""`specialist-router train`: build a LoRA specialist for one task from the logs.

Every `training.TrainConfig` setting is a flag here (derived from its declaration). Nothing this module imports
loads torch: `--device` is applied (CUDA_VISIBLE_DEVICES) before the pipeline loads it.
"""
from __future__ import annotations

import sys

from cli.output import emit_json, json_command
from cli.remote import gateway_client
from core import config, envs
from core.errors import InvalidArgument
from training import device as gpu
from training.config import TrainConfig, load


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("train", help="train, evaluate and (if better) register a task's LoRA specialist",
                              description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file with any setting below (defaults < profile < file < "
                                    f"{envs.TRAIN_PREFIX}* < flags)")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting by its YAML key, e.g. --set batch_size=2 (repeatable)")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print only the run report as JSON on stdout (progress and "
                                                       "logs go to stderr)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="apply the settings and --device, print them and the CUDA_VISIBLE_DEVICES the run would get "
                        "(JSON), and stop: no logs read, nothing trained")
    p.add_argument("--token", default=None, help="bearer token for --deploy (default: the variable token_env "
                                                  "names, $SPECIALIST_ROUTER_TOKEN)")
    config.add_flags(p, TrainConfig)
    config.add_hidden_alias(p, "--base-model", "base_model")  # deprecated spelling of --model
    p.set_defaults(func=json_command(main))


def config_from_args(args) -> TrainConfig:
    overrides = config.overrides_from_args(args)
    for item in args.set_ or []:
        if "=" not in item:
            raise InvalidArgument(f"--set {item!r}: expected KEY=VALUE, e.g. --set batch_size=2")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v
    return load(args.config, overrides)


def deploy_through_gateway(cfg: TrainConfig, token: str | None = None):
    """`train --deploy`: the SDK's AdminService.DeployAdapter on the running gateway (its errors as one-line CLI
    errors). Token: `token`, else the variable `cfg.token_env` names."""
    def deploy(task: str, version: str) -> dict:
        tok = token if token is not None else envs.get_configured(cfg.token_env)
        with gateway_client(cfg.gateway, tok, timeout=None) as client:
            return client.deploy(task, version).as_dict()
    return deploy


def dry_run(cfg: TrainConfig) -> dict:
    """What `train` would run with: the settings and the GPU environment, applied exactly as run() applies it."""
    inherited = gpu.inherited()
    visible = gpu.apply_device(cfg.device)  # the same call run() makes before torch loads
    gpus = gpu.visible(visible)
    return {"device": cfg.device, "inherited_cuda_visible_devices": inherited, "cuda_visible_devices": visible,
            "gpus": "all" if gpus is None else gpus, "torch_imported": "torch" in sys.modules, "config": cfg.to_dict()}


def main(args) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        emit_json(args, dry_run(cfg))  # stdout even under --json (json_command sends prints to stderr)
        return 0
    from training.pipeline import run  # lazy: loads torch, which must follow apply_device() inside run()

    echo = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    report = run(cfg, echo=echo, show_progress=not args.no_progress, deploy=deploy_through_gateway(cfg, args.token))
    if args.json:
        emit_json(args, report.to_dict())
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
