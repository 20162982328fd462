"""`run(cfg) -> RunReport`: data -> train -> evaluate -> gate -> register -> (deploy), all in one run dir.

Run dir layout: `config.json`, `data/{train,eval,other}.jsonl` + `data/report.json` (frozen at the first
attempt so a resumed run trains on the same rows), `checkpoints/checkpoint-N/`, `adapter/` (final PEFT
folder), `report.json`, `loss.png`. An existing run dir is only ever continued (`resume`), never overwritten.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import basemodel
from adapters.registry import Registry
from adapters.validation import base_weight_shapes
from core import paths
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.files import atomic_write_json
from training import data as logdata
from training import evaluate as gate_eval
from training.backends import TrainJob, select_backend
from training.config import TrainConfig, apply_device
from training.format import token_counter

# (task, version) -> what the gateway answered; `train --deploy` passes the SDK's admin call
Deploy = Callable[[str, str], dict]


@dataclass
class RunReport:
    task: str
    run_dir: str
    status: str = "started"  # started | too_few_records | trained | rejected | promoted | deployed | failed
    message: str = ""
    base_model: str = ""
    base_fingerprint: str = ""
    data: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    adapter: str = ""  # registry name (e.g. code@3) when registered
    deploy: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def save(self, run_dir: Path) -> Path:
        p = Path(run_dir) / "report.json"
        atomic_write_json(p, self.to_dict())
        return p


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_checkpoint(ckpt_dir: Path) -> str | None:
    if not ckpt_dir.is_dir():
        return None
    cks = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
           and (p / "trainer_state.json").is_file()]
    return str(max(cks, key=lambda p: int(p.name.split("-")[-1]))) if cks else None


def resolve_run_dir(cfg: TrainConfig) -> Path:
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir).expanduser().resolve()
    else:
        run_dir = paths.runs_dir() / f"{cfg.task}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.resume:
            raise AlreadyExists(f"run dir {run_dir} already exists; pass --resume to continue it from its last "
                                "checkpoint, or choose another --run-dir (it is never overwritten)")
        if not (run_dir / "data" / "train.jsonl").is_file():
            raise FailedPrecondition(f"run dir {run_dir} is not a training run (no data/train.jsonl); "
                                     "choose another --run-dir")
    elif cfg.resume:
        raise NotFound(f"--resume: run dir {run_dir} does not exist; drop --resume to start a new run")
    return run_dir


def prepare_data(cfg: TrainConfig, tokenizer, echo=print):
    """(train rows, eval rows, {other task: eval rows}, DataReport, data fingerprint)."""
    count = token_counter(tokenizer)
    records, feedback = logdata.load_logs(cfg)
    train, held, report = logdata.filter_records(records, feedback, cfg, token_count=count)
    echo(f"[data] {cfg.task}: {report.summary()}")
    if report.kept < cfg.min_records or not train:
        raise FailedPrecondition(logdata.too_few_message(report, cfg.min_records))
    others: dict[str, list] = {}
    for t in cfg.tasks:
        if t == cfg.task:
            continue
        recs, fb = logdata.load_logs(cfg, task=t)
        if not recs:
            continue
        _, o_held, _ = logdata.filter_records(recs, fb, cfg, token_count=count, task=t)
        if o_held:
            others[t] = [e.row() for e in o_held[: cfg.forgetting_max_records]]
    return [e.row() for e in train], [e.row() for e in held], others, report, logdata.data_fingerprint(train + held)


def run(cfg: TrainConfig, *, echo=print, show_progress: bool = True, deploy: Deploy | None = None) -> RunReport:
    """One run end to end. `deploy` (with `cfg.deploy`) is called with (task, version) after a passed gate."""
    cfg.validate()
    if cfg.deploy and deploy is None:
        raise InvalidArgument("deploy is on but no deploy function was given: pass run(cfg, deploy=...) (the CLI "
                              "passes the SDK's AdminService call), or set deploy: false")
    apply_device(cfg.device)  # before torch is imported
    run_dir = resolve_run_dir(cfg)
    report = RunReport(task=cfg.task, run_dir=str(run_dir), config=cfg.to_dict())
    t_start = time.perf_counter()
    try:
        return _run(cfg, run_dir, report, echo, show_progress, t_start, deploy)
    except Exception as exc:
        if run_dir.is_dir():
            report.status = report.status if report.status == "too_few_records" else "failed"
            report.message = report.message or f"{type(exc).__name__}: {exc}"
            report.timings_s["total"] = round(time.perf_counter() - t_start, 2)
            report.save(run_dir)
        raise


def _run(cfg, run_dir: Path, report: RunReport, echo, show_progress: bool, t_start: float,
         deploy: Deploy | None) -> RunReport:
    model_dir = str(Path(cfg.base_model).expanduser()) if cfg.base_model else str(basemodel.prepare(progress=echo))
    fp = basemodel.fingerprint(Path(model_dir))
    report.base_model, report.base_fingerprint = model_dir, fp
    registry = Registry(cfg.registry or None)
    production = registry.production(cfg.task)
    served = cfg.served_fingerprint
    if not served and production is not None:
        served = production.manifest.get("base_fingerprint", "")
    if served and served != fp:
        raise FailedPrecondition(f"base model mismatch: {model_dir} has fingerprint {fp} but the served model "
                                 f"{'(production ' + production.name + ')' if production is not None and not cfg.served_fingerprint else ''}"
                                 f" has {served}; train on the served base (--config base_model: <its folder>)")

    if cfg.device != "cpu" and cfg.backend in ("auto", "unsloth"):
        try:  # unsloth patches transformers/trl/peft only when it is imported before them (unsloth docs)
            import unsloth  # noqa: F401  # lazy: CUDA only (its import raises without a GPU)
        except Exception:  # noqa: BLE001 - absent or no GPU: select_backend reports it and falls back to peft
            pass
    # lazy: these import transformers and torch, which must load after apply_device() (run() calls it first)
    from transformers import AutoTokenizer

    from training.monitor import LossMonitor, plot_losses  # lazy: imports transformers (see above)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_dir = run_dir / "data"
    t0 = time.perf_counter()
    if cfg.resume and (data_dir / "train.jsonl").is_file():
        train_rows, eval_rows = _read_jsonl(data_dir / "train.jsonl"), _read_jsonl(data_dir / "eval.jsonl")
        others = json.loads((data_dir / "other.json").read_text())
        saved = json.loads((data_dir / "report.json").read_text())
        report.data, data_fp = saved["data"], saved["fingerprint"]
        echo(f"[data] resuming with the frozen split: {len(train_rows)} train / {len(eval_rows)} eval")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        try:
            train_rows, eval_rows, others, data_report, data_fp = prepare_data(cfg, tokenizer, echo)
        except FailedPrecondition as exc:
            report.status, report.message = "too_few_records", str(exc)
            raise
        report.data = data_report.to_dict()
        data_dir.mkdir(exist_ok=True)
        _write_jsonl(data_dir / "train.jsonl", train_rows)
        _write_jsonl(data_dir / "eval.jsonl", eval_rows)
        (data_dir / "other.json").write_text(json.dumps(others, ensure_ascii=False))
        (data_dir / "report.json").write_text(json.dumps({"data": report.data, "fingerprint": data_fp}, indent=2))
    report.timings_s["data"] = round(time.perf_counter() - t0, 2)
    report.save(run_dir)

    # train -----------------------------------------------------------------------------------------------

    monitor = LossMonitor(cfg, show_progress=show_progress, echo=echo)
    resume_from = last_checkpoint(run_dir / "checkpoints") if cfg.resume else None
    if cfg.resume:
        echo(f"[train] resuming from {resume_from}" if resume_from else "[train] no checkpoint yet: starting at step 0")
    # the in-training eval (overfitting watch) scores the same capped held-out set as the gate, not all of it
    job = TrainJob(cfg, model_dir, train_rows, eval_rows[: cfg.eval_max_records], run_dir / "checkpoints", run_dir / "adapter",
                   resume_from=resume_from, callbacks=[monitor])
    backend = select_backend(cfg, echo=echo)
    t0 = time.perf_counter()
    out = backend.train(job)
    report.timings_s["train"] = round(time.perf_counter() - t0, 2)
    hist_train = [(h["step"], h["loss"]) for h in out.log_history if "loss" in h]
    hist_eval = [(h["step"], h["eval_loss"]) for h in out.log_history if "eval_loss" in h]
    report.train = {"backend": out.backend, "steps": out.steps, "seconds": round(out.seconds, 2),
                    "seconds_per_step": round(out.seconds / max(1, out.steps - _step_of(resume_from)), 3),
                    "train_tokens": out.train_tokens, "target_modules": out.target_modules,
                    "resumed_from": resume_from or "", "stopped_reason": monitor.stopped_reason,
                    "first_loss": hist_train[0][1] if hist_train else None,
                    "final_loss": hist_train[-1][1] if hist_train else None,
                    "eval_losses": hist_eval, "train_losses": hist_train}
    report.warnings.extend(monitor.warnings)
    plot_losses(run_dir / "loss.png", hist_train, hist_eval, f"{cfg.task}: LoRA r={cfg.lora_r} ({cfg.profile})")
    report.status = "trained"
    report.save(run_dir)

    # evaluate + gate -------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    gate = gate_eval.evaluate(cfg, model_dir, str(out.adapter_dir), eval_rows, others,
                      production_dir=gate_eval.peft_dir_of(production) if production is not None else None,
                      production_name=production.name if production is not None else "", echo=echo)
    report.timings_s["evaluate"] = round(time.perf_counter() - t0, 2)
    report.gate = gate.to_dict()
    if not gate.passed:
        report.status = "rejected"
        report.message = "gate failed: " + "; ".join(gate.reasons)
        echo(f"[gate] REJECTED: {'; '.join(gate.reasons)}")
    else:
        echo(f"[gate] passed: candidate {gate.candidate_loss:.4f} vs base {gate.base_loss:.4f}"
             + (f" vs production {gate.production_loss:.4f}" if gate.production_loss is not None else "")
             + f", forgetting {gate.forgetting:+.2%}")
        if cfg.register:
            metrics = {"eval_loss": gate.candidate_loss, "base_eval_loss": gate.base_loss,
                       "production_eval_loss": gate.production_loss, "forgetting": gate.forgetting,
                       "train_records": len(train_rows), "eval_records": len(eval_rows), "steps": out.steps,
                       "run_dir": str(run_dir)}
            v = registry.register(cfg.task, str(out.adapter_dir), base_model_id=_model_id(model_dir),
                                  base_fingerprint=fp, data_fingerprint=data_fp, metrics=metrics,
                                  parent=production.version if production is not None else None,
                                  base_shapes=base_weight_shapes(model_dir))
            registry.set_alias(cfg.task, "candidate", v.version, reason=f"training run {run_dir.name}: gate passed")
            report.adapter, report.status = v.name, "promoted"
            echo(f"[gate] registered {v.name} as {cfg.task} candidate")
            if cfg.deploy and deploy is not None:
                report.deploy = deploy(cfg.task, v.version)
                report.status = "deployed"
                echo(f"[deploy] {report.deploy.get('adapter') or v.name} is serving {cfg.task}")
    report.timings_s["total"] = round(time.perf_counter() - t_start, 2)
    report.save(run_dir)
    return report


def _step_of(ckpt: str | None) -> int:
    return int(ckpt.rsplit("-", 1)[-1]) if ckpt else 0


def _model_id(model_dir: str) -> str:
    try:
        m = Path(model_dir) / basemodel.MANIFEST
        if m.is_file():
            return json.loads(m.read_text()).get("model_id") or model_dir
        return json.loads((Path(model_dir) / "config.json").read_text()).get("_name_or_path") or model_dir
    except (OSError, ValueError):
        return model_dir
