"""Typed configuration of one training run.

Precedence: dataclass defaults < profile (`quick | standard | full`) < `--config file.yaml` <
environment (`SPECIALIST_ROUTER_TRAIN__FIELD`, e.g. `SPECIALIST_ROUTER_TRAIN__MAX_STEPS=50`) < CLI flags.
Every field is documented with `metadata["help"]`; `validate()` checks the cross-field rules.
Nothing here imports torch: the device must be chosen before torch is loaded (`training.device`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from classifier import GENERAL
from convlog.store import redact_url
from core import config
from core.config import setting as _f
from core.envs import TRAIN_PREFIX
from core.errors import ConfigError
from training import device as gpu
from training.device import apply_device

__all__ = ["PROFILES", "TrainConfig", "apply_device", "load"]

DEFAULT_TASKS = ("code", "math", "writing", "translation", "summarization", "extraction", GENERAL)
REPORT_TO = ("none", "tensorboard")  # experiment trackers the trainer may log to (none: only report.json, loss.png)

# Step budgets and shapes per profile. `quick` fits in <= 20 min wall on a 2-core CPU including data prep
# and evaluation (measured: see docs/bench-training.md); `standard` and `full` are meant for a GPU.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"max_steps": 72, "batch_size": 4, "grad_accum": 1, "max_seq_len": 512, "learning_rate": 5e-4,
              "save_steps": 24, "eval_steps": 24, "eval_max_records": 32, "forgetting_max_records": 8},
    "standard": {"max_steps": 600, "batch_size": 8, "grad_accum": 2, "max_seq_len": 1024, "save_steps": 100,
                 "eval_steps": 100, "eval_max_records": 256, "forgetting_max_records": 64},
    "full": {"max_steps": 3000, "batch_size": 16, "grad_accum": 2, "max_seq_len": 2048, "save_steps": 250,
             "eval_steps": 250, "eval_max_records": 1024, "forgetting_max_records": 256},
}


@dataclass
class TrainConfig:
    """One run: select + filter the task's logs, train a LoRA specialist, evaluate, gate, register, deploy."""

    # what
    task: str = _f("", "Task to build a specialist for; must be one of `tasks`.")
    tasks: list = _f(list(DEFAULT_TASKS), "Known task set (the classifier's). Other tasks' data measures forgetting.")
    profile: str = _f("quick", "Step budget and shapes: quick (CPU, <= 20 min), standard, full (GPU).",
                      choices=("quick", "standard", "full"))
    # where
    db: str = _f("", "Log store: a SQLite file or a postgresql:// URL (the gateway's logs.url); empty: "
                     "<data dir>/logs/router.sqlite3.")
    since: str = _f("", "Only logs created at/after this time (ISO 8601 like 2025-01-31T00:00 or unix seconds).")
    until: str = _f("", "Only logs created before this time (ISO 8601 or unix seconds).")
    sources: list = _f([], "Only these log sources (live, import); empty: all.")
    run_dir: str = _f("", "Run folder (checkpoints, report.json, loss.png); empty: <data dir>/runs/<task>-<UTC time>.")
    resume: bool = _f(False, "Continue the run in an existing run_dir from its last checkpoint.")
    base_model: str = _f("", "Base model HF folder; empty: the prepared embedded default (SmolLM2-135M-Instruct).",
                         flag="--model")
    served_fingerprint: str = _f("", "Weights fingerprint of the model the gateway serves; when set, a different base is refused. "
                                     "Empty: checked against the production adapter's manifest instead.")
    registry: str = _f("", "Adapter registry root; empty: <data dir>/adapters.")
    # device / backend
    device: str = _f("cpu", "cpu | cuda | cuda:N: the N-th GPU visible to this process (the N-th entry of an inherited "
                            "CUDA_VISIBLE_DEVICES, else physical GPU N); training sees only that GPU.")
    serving_gpus: str = _f("", "GPUs that serve the model (CUDA_VISIBLE_DEVICES entries as the host numbers them, e.g. "
                               "0 or 0,1); a device that is one of them is refused. Empty: no check.")
    backend: str = _f("auto", "Trainer: auto (unsloth on CUDA when installed, else peft) | peft | unsloth.",
                      choices=("auto", "peft", "unsloth"))
    load_in_4bit: bool = _f(False, "QLoRA: load the base model in 4-bit for training (unsloth backend on CUDA; the "
                                   "adapter is still saved in 16-bit PEFT format).")
    num_threads: int = _f(2, "CPU threads for torch (torch.set_num_threads); 0 keeps torch's default.")
    # data filters
    min_confidence: float = _f(0.8, "Keep only records whose classifier confidence is >= this.")
    min_records: int = _f(16, "Refuse to train with fewer records than this after filtering.")
    near_dup_threshold: float = _f(0.85, "Jaccard similarity (MinHash, word 3-shingles) above which records are near-duplicates.")
    minhash_perm: int = _f(64, "MinHash permutations (more: more exact, slower).")
    pii: str = _f("mask", "PII scrubbing of training text with the shared policy: mask | off.", choices=("mask", "off"))
    min_completion_tokens: int = _f(2, "Drop answers shorter than this many tokens.")
    max_prompt_tokens: int = _f(0, "Drop records whose prompt is longer than this many tokens; 0: max_seq_len - min_completion_tokens.")
    trim_history: bool = _f(True, "A too-long multi-turn record keeps its system prompt, its last user turn and as many of the latest earlier turns as fit, instead of being dropped.")
    eval_fraction: float = _f(0.1, "Share of conversations held out for evaluation (split by request id hash).")
    min_eval_records: int = _f(4, "At least this many held-out records (taken from train when the fraction gives fewer).")
    seed: int = _f(1234, "Seed for the split salt, MinHash and training.")
    # LoRA / optimisation
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    target_modules: list = _f([], "Modules to adapt; empty: attention + MLP projections (attention only for GPT-OSS).")
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule.", choices=("cosine", "constant_with_warmup", "linear"))
    warmup_ratio: float = _f(0.05, "Share of steps spent warming up (0.03-0.1 is usual).")
    max_steps: int = _f(60, "Optimizer steps (set by the profile).")
    batch_size: int = _f(4, "Sequences per device step (lower it on out-of-memory).")
    grad_accum: int = _f(1, "Gradient accumulation steps (effective batch = batch_size * grad_accum).")
    max_seq_len: int = _f(384, "Longest training sequence in tokens (prompt + answer); longer records are trimmed (trim_history) or dropped.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    group_by_length: bool = _f(True, "Batch sequences of similar length together (random groups, less padding: faster steps).")
    save_steps: int = _f(20, "Save a checkpoint every N steps (resume continues from the last one).")
    eval_steps: int = _f(20, "Evaluate the held-out loss every N steps (overfitting watch).")
    eval_on_start: bool = _f(True, "Also evaluate at step 0 (the base model's held-out loss: the reference line of the loss plot).")
    logging_steps: int = _f(1, "Log the train loss every N steps.")
    save_total_limit: int = _f(2, "Checkpoints kept in the run dir.")
    report_to: str = _f("none", "Also send the train/eval metrics to: none | tensorboard (event files under "
                                "<run dir>/checkpoints/runs/; needs `pip install 'specialist-router[tensorboard]'`).",
                        choices=REPORT_TO)
    target_loss: float = _f(0.0, "Stop early once the train loss (running mean of 5) is <= this; 0: off.")
    overfit_patience: int = _f(2, "Warn (and stop when stop_on_overfit) after this many evaluations with rising eval loss.")
    stop_on_overfit: bool = _f(False, "Stop training when eval loss keeps rising for overfit_patience evaluations.")
    # gate
    eval_max_records: int = _f(32, "Held-out records of the task used by the gate.")
    forgetting_max_records: int = _f(8, "Held-out records per other task used to measure forgetting.")
    margin: float = _f(0.01, "Relative margin: candidate loss must be <= (1 - margin) * base loss and * production loss.")
    forgetting_bound: float = _f(0.02, "Max relative loss increase on other tasks' data vs the base model.")
    register: bool = _f(True, "Register a candidate that passes the gate (alias `candidate`).")
    deploy: bool = _f(False, "After a passed gate, call AdminService.DeployAdapter on the running gateway.")
    gateway: str = _f("127.0.0.1:50051", "Gateway address for --deploy.")
    token_env: str = _f("SPECIALIST_ROUTER_TOKEN", "Environment variable holding the bearer token for --deploy.")

    def validate(self) -> "TrainConfig":
        if not self.task:
            raise ConfigError("no task given; pass --task (one of: " + ", ".join(self.tasks) + ")")
        if self.task not in self.tasks:
            raise ConfigError(f"unknown task {self.task!r}; known tasks: {', '.join(self.tasks)} "
                              "(set `tasks` in the config file for a custom task set)")
        if self.task == GENERAL:
            specialists = ", ".join(t for t in self.tasks if t != GENERAL)
            raise ConfigError(f"task {GENERAL!r} never gets a specialist: the gateway answers general prompts (and "
                              f"the classifier's abstentions) with the base model, so an adapter trained for it would "
                              f"never be routed; pick a specialist task ({specialists})")
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"report_to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.report_to == "tensorboard" and not any(importlib.util.find_spec(m) for m in ("tensorboard",
                                                                                          "tensorboardX")):
            raise ConfigError("report_to tensorboard needs the tensorboard package: "
                              "pip install 'specialist-router[tensorboard]' (or set report_to none)")
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        gpu.resolve(self.device, gpu.inherited())  # cuda:N must name a GPU visible to this process
        gpu.check_serving(self.device, self.serving_gpus, gpu.inherited())
        if self.backend not in ("auto", "peft", "unsloth"):
            raise ConfigError(f"backend must be auto, peft or unsloth, got {self.backend!r}")
        if self.pii not in ("mask", "off"):
            raise ConfigError(f"pii must be mask or off, got {self.pii!r}")
        if self.lr_scheduler not in ("cosine", "constant_with_warmup", "linear"):
            raise ConfigError("lr_scheduler must be cosine, constant_with_warmup or linear")
        for name in ("max_steps", "batch_size", "grad_accum", "max_seq_len", "lora_r", "lora_alpha", "save_steps",
                     "eval_steps", "logging_steps", "min_records", "minhash_perm"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ConfigError("min_confidence must be within [0, 1]")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError("eval_fraction must be within (0, 1)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("warmup_ratio must be within [0, 1)")
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise ConfigError("near_dup_threshold must be within (0, 1]")
        if self.margin < 0 or self.forgetting_bound < 0:
            raise ConfigError("margin and forgetting_bound must be >= 0")
        if self.max_prompt_tokens and self.max_prompt_tokens >= self.max_seq_len:
            raise ConfigError("max_prompt_tokens must be < max_seq_len")
        return self

    def effective_max_prompt_tokens(self) -> int:
        return self.max_prompt_tokens or max(1, self.max_seq_len - self.min_completion_tokens)

    def to_dict(self) -> dict:
        """The settings as written to a run's config.json / report.json (a store URL without its password)."""
        d = dataclasses.asdict(self)
        d["db"] = redact_url(self.db)
        return d


def load(config_file: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """defaults < profile < YAML file < environment < overrides (CLI flags), then validate."""
    file_data: dict = config.read_yaml_mapping(config_file) if config_file else {}
    env = config.env_overrides(TRAIN_PREFIX)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    profile = str(overrides.get("profile") or env.get("profile") or file_data.get("profile") or "quick")
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    layers = [{"profile": profile}, PROFILES[profile], file_data, env, overrides]
    cfg = TrainConfig()
    for layer in layers:
        config.apply(cfg, layer)
    return cfg.validate()
