"""Settings of the loop controller, declared once (the `loop:` section of the config file; environment
`SPECIALIST_ROUTER_LOOP__FIELD`; flags of `specialist-router loop`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from convlog.store import is_store_url
from core import config, paths
from core.config import setting as _s
from core.envs import LOOP_PREFIX
from core.errors import ConfigError

PER_TASK_KEYS = ("min_new_records", "min_interval_h", "negative_feedback_rate", "device", "profile", "train_set",
                 "canary_share")


@dataclass
class LoopConfig:
    """The loop: when to retrain a task, where, and how a candidate is judged on live traffic."""

    tasks: list = _s([], "Tasks the loop manages; empty: every task with a registry folder or logged traffic, "
                         "except general (never routed to a specialist).")
    registry: str = _s("", "Adapter registry root (shared with the gateways); empty: <data dir>/adapters.")
    db: str = _s("", "Log store the gateways write: a SQLite file or a postgresql:// URL; empty: "
                     "<data dir>/logs/router.sqlite3.")
    state_dir: str = _s("", "Loop state (runs, pause flags, decisions); empty: <data dir>/loop.")
    poll_s: float = _s(30.0, "Seconds between two passes over the tasks.")
    # triggers
    min_new_records: int = _s(200, "Retrain when at least this many answered requests of the task arrived since the "
                                   "production specialist's data cutoff.")
    min_interval_h: float = _s(6.0, "At least this many hours between two training runs of one task.")
    negative_feedback_rate: float = _s(0.3, "Also retrain when the production specialist's negative-feedback rate over "
                                            "its last `feedback_window` rated requests reaches this (0: off).")
    feedback_window: int = _s(50, "Rated requests the negative-feedback trigger looks at (at least 20 needed).")
    # training
    device: str = _s("cpu", "Training device (cpu, cuda:N as in `train --device`): the spare GPU in production, "
                            "never the serving one.")
    profile: str = _s("quick", "Training profile (train --profile).", choices=("quick", "standard", "full"))
    train_set: list = _s([], "Extra training settings as KEY=VALUE (train --set), e.g. ['max_steps=24'].")
    max_attempts: int = _s(3, "Retries of a crashed or killed training run (resumed from its last checkpoint).")
    # canary
    canary_share: float = _s(0.2, "Share of the task's routed traffic the candidate gets during its canary.")
    min_samples: int = _s(30, "Candidate requests needed before a promote decision.")
    min_rollback: int = _s(5, "Candidate requests needed before an early rollback.")
    margin: float = _s(0.05, "Allowed rise of the bad-answer rate (absolute) for 'not worse'.")
    confidence: float = _s(0.95, "Posterior probability a decision needs.")
    max_latency_ratio: float = _s(1.5, "Roll back when the candidate's TTFT median exceeds production's by this "
                                       "factor.")
    max_hours: float = _s(24.0, "Canary window: roll back when still undecided after this long.")
    per_task: dict = _s({}, f"Per-task overrides of {', '.join(PER_TASK_KEYS)}, e.g. {{code: {{profile: standard}}}}.")

    def validate(self) -> "LoopConfig":
        if not 0.0 < self.canary_share <= 1.0:
            raise ConfigError(f"loop.canary_share must be within (0, 1], got {self.canary_share}")
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"loop.confidence must be within [0.5, 1), got {self.confidence}")
        for name in ("min_new_records", "min_samples", "min_rollback", "max_attempts", "feedback_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"loop.{name} must be >= 1, got {getattr(self, name)}")
        if self.poll_s <= 0 or self.max_hours <= 0 or self.margin < 0:
            raise ConfigError("loop.poll_s and loop.max_hours must be > 0 and loop.margin >= 0")
        if "general" in self.tasks:
            raise ConfigError("loop.tasks contains 'general': general prompts always go to the base model, so a "
                              "specialist for it would never serve; remove it")
        for task, over in self.per_task.items():
            bad = set(over or {}) - set(PER_TASK_KEYS)
            if bad:
                raise ConfigError(f"loop.per_task.{task} has unknown keys {sorted(bad)}: use {', '.join(PER_TASK_KEYS)}")
        return self

    def for_task(self, task: str, key: str):
        return (self.per_task.get(task) or {}).get(key, getattr(self, key))

    def registry_root(self) -> Path:
        return Path(self.registry).expanduser() if self.registry else paths.registry_dir()

    def db_path(self) -> Path | str:
        """The log store: a SQLite file, or a `postgresql://` URL as the gateways' `logs.url`."""
        if is_store_url(self.db):
            return self.db
        return Path(self.db).expanduser() if self.db else paths.logs_db()

    def db_exists(self) -> bool:
        db = self.db_path()
        return isinstance(db, str) or db.is_file()

    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser() if self.state_dir else paths.data_dir() / "loop"


def load(config_file: str | None = None, overrides: dict | None = None) -> LoopConfig:
    """defaults < the `loop:` section of the config file < SPECIALIST_ROUTER_LOOP__* < flags."""
    return config.load(LoopConfig, config_file=config_file, env_prefix=LOOP_PREFIX, overrides=overrides,
                       section_of_file="loop")
