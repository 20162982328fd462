"""The loop controller: per task, trigger -> supervised training child -> canary -> promote or roll back.

One pass (`run_once`) over the managed tasks does, for each task that is not paused:
1. a live canary: judge it from the log store (`loop.judge`) and end it (`promoted` moves production in the same
   registry step; `rolled_back`); a production alias moved by a person during the canary cancels it (the
   override wins);
2. a training run in progress (a child process in its own session, so a killed loop does not kill it): wait; when
   it ended, read its report: a candidate that passed the gate starts a canary; a rejected one waits for new
   data; a crashed, killed or failed run is retried from its last checkpoint (`train --resume`), at most
   `max_attempts` times;
3. otherwise check the triggers (new records since the data cutoff, negative feedback on production) and start a
   run, one per device at a time.

Nothing here touches what serves except through the registry (canary start/end, alias moves), which the gateways
apply with their zero-downtime deploy path. State (`state.json`: runs, cutoffs, last decisions) and pause flags
(`paused.json`, written by `loop pause`) live in the state folder; one controller holds `loop.lock` at a time.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from adapters.registry import Registry
from convlog.store import open_store
from core.errors import FailedPrecondition, NotFound
from core.files import atomic_write_json
from loop import judge as judge_mod
from loop.config import LoopConfig

GENERAL = "general"


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def paused(state_dir: Path) -> dict:
    """{"all": bool, "tasks": [...]}: what `loop pause` set."""
    data = _read_json(state_dir / "paused.json", {})
    return {"all": bool(data.get("all")), "tasks": sorted(set(data.get("tasks") or []))}


def set_paused(state_dir: Path, task: str | None, on: bool) -> dict:
    """Pause or resume one task (or all with task=None); takes effect at the loop's next pass."""
    state_dir.mkdir(parents=True, exist_ok=True)
    p = paused(state_dir)
    tasks = set(p["tasks"])
    if task is None:
        p["all"] = on
        if not on:
            tasks.clear()
    elif on:
        tasks.add(task)
    else:
        tasks.discard(task)
    p["tasks"] = sorted(tasks)
    atomic_write_json(state_dir / "paused.json", p)
    return p


def _alive(pid: int, run_dir: str) -> bool:
    """The training child still runs (the pid is ours: its command line names the run folder)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if stat[0] == "Z":  # exited, not yet reaped by its parent
            return False
    except (OSError, IndexError):
        return False
    return run_dir.encode() in cmd


class Controller:
    def __init__(self, cfg: LoopConfig, *, echo=print):
        self.cfg = cfg
        self.echo = echo
        self.registry = Registry(cfg.registry_root())
        self.state_dir = cfg.state_path()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state = _read_json(self.state_dir / "state.json", {"tasks": {}})
        self._lock_fd: int | None = None
        self._children: dict[int, subprocess.Popen] = {}

    # ------------------------------------------------------------------------------------------ plumbing
    def acquire(self) -> None:
        """One controller per state folder: a second one is refused (it would start duplicate runs)."""
        fd = os.open(self.state_dir / "loop.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FailedPrecondition(f"another loop controller holds {self.state_dir / 'loop.lock'}: run one per "
                                     "registry (stop the other, or point this one at another --state-dir)") from None
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _save(self) -> None:
        atomic_write_json(self.state_dir / "state.json", self.state)

    def _task_state(self, task: str) -> dict:
        return self.state["tasks"].setdefault(task, {"cutoff": None, "last_run_at": 0.0, "run": None,
                                                     "attempts": 0, "last": None})

    def _note(self, task: str, event: str, **detail) -> dict:
        ev = {"time": time.time(), "task": task, "event": event, **detail}
        self._task_state(task)["last"] = ev
        self.echo(f"[loop] {task}: {event}" + (f" ({detail.get('reason')})" if detail.get("reason") else ""))
        return ev

    def tasks(self) -> list[str]:
        if self.cfg.tasks:
            return list(self.cfg.tasks)
        found = set(self.registry.tasks())
        if self.cfg.db_exists():
            with open_store(self.cfg.db_path()) as store:
                found |= set((store.stats().get("by_task") or {}).keys())
        return sorted(t for t in found if t and t != GENERAL)

    # ------------------------------------------------------------------------------------------ one pass
    def run_once(self) -> list[dict]:
        events = []
        p = paused(self.state_dir)
        for task in self.tasks():
            if p["all"] or task in p["tasks"]:
                events.append({"task": task, "event": "paused"})
                continue
            try:
                ev = self.step(task)
            except (FailedPrecondition, NotFound) as exc:
                ev = self._note(task, "error", reason=str(exc))
            if ev:
                events.append(ev)
            self._save()
        return events

    def run_forever(self) -> None:
        self.acquire()
        try:
            while True:
                try:
                    self.run_once()
                except Exception as exc:  # noqa: BLE001 - e.g. a busy or unreachable store: try again next pass
                    self.echo(f"[loop] pass failed: {type(exc).__name__}: {exc}; retrying in {self.cfg.poll_s:.0f} s")
                time.sleep(self.cfg.poll_s)
        finally:
            self.release()

    def step(self, task: str) -> dict | None:
        canary = self.registry.canary(task)
        if canary is not None:
            return self._judge(task, canary)
        st = self._task_state(task)
        if st["run"]:
            return self._supervise(task, st)
        why = self._trigger(task, st)
        if why:
            return self._start_run(task, st, why, resume=False)
        return None

    # ------------------------------------------------------------------------------------------ triggers
    def _cutoff(self, task: str, st: dict) -> float:
        if st.get("cutoff") is not None:
            return float(st["cutoff"])
        prod = self.registry.production(task)
        if prod is None:
            return 0.0
        return _manifest_time(prod.manifest)

    def _trigger(self, task: str, st: dict) -> str:
        cfg = self.cfg
        if time.time() - float(st.get("last_run_at") or 0) < float(cfg.for_task(task, "min_interval_h")) * 3600:
            return ""
        if not cfg.db_exists():
            return ""
        cutoff = self._cutoff(task, st)
        need = int(cfg.for_task(task, "min_new_records"))
        prod = self.registry.production(task)
        n, rated, negative = 0, [], 0
        with open_store(cfg.db_path()) as store:
            ids = []
            for r in store.iter_records(task=task, since=cutoff, status="ok"):
                n += 1
                if prod is not None and r.adapter == prod.name:
                    ids.append(r.request_id)
            if n >= need:
                return f"{n} new records since the data cutoff (>= {need})"
            rate = float(cfg.for_task(task, "negative_feedback_rate"))
            if rate > 0 and ids:
                fb = store.feedback_for(ids[-5000:])
                rated = [fb[i][-1].rating for i in ids if i in fb][-cfg.feedback_window:]
                negative = sum(1 for x in rated if x <= 2)
                if len(rated) >= 20 and negative / len(rated) >= rate:
                    return f"negative feedback on {prod.name}: {negative}/{len(rated)} >= {rate:.0%}"
        return ""

    # ------------------------------------------------------------------------------------------ training
    def _device_busy(self, device: str) -> bool:
        for t, s in self.state["tasks"].items():
            run = s.get("run")
            if run and run.get("device") == device and _alive(int(run["pid"]), run["run_dir"]):
                return True
        return False

    def _start_run(self, task: str, st: dict, why: str, *, resume: bool) -> dict | None:
        cfg = self.cfg
        device = str(cfg.for_task(task, "device"))
        if self._device_busy(device):
            return None  # one run per device: this task waits for the next pass
        run = st["run"] if resume else None
        if run is None:
            cutoff = time.time()
            run_dir = self.state_dir / "runs" / f"{task}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(cutoff))}"
            run = {"run_dir": str(run_dir), "cutoff": cutoff, "device": device, "trigger": why,
                   "started_at": time.time()}
        Path(run["run_dir"]).parent.mkdir(parents=True, exist_ok=True)  # the run folder itself is train's to create
        cmd = [sys.executable, "-m", "cli", "train", "--task", task, "--profile", str(cfg.for_task(task, "profile")),
               "--device", device, "--db", str(cfg.db_path()), "--registry", str(cfg.registry_root()),
               "--until", f"{run['cutoff']:.6f}", "--run-dir", run["run_dir"], "--no-progress", "--json",
               "--no-deploy"]
        for kv in cfg.for_task(task, "train_set") or []:
            cmd += ["--set", str(kv)]
        if resume:
            cmd.append("--resume")
        out = open(run["run_dir"] + ".json", "wb")  # the child's report on stdout
        err = open(run["run_dir"] + ".log", "ab")  # its progress and logs, every attempt appended
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=str(Path(__file__).resolve().parents[1]))
        finally:
            out.close()
            err.close()
        self._children[proc.pid] = proc
        run["pid"] = proc.pid
        st["run"] = run
        return self._note(task, "training_started", reason=why, run_dir=run["run_dir"], pid=proc.pid,
                          attempt=st.get("attempts", 0) + 1, resume=resume)

    def _supervise(self, task: str, st: dict) -> dict | None:
        run = st["run"]
        child = self._children.get(int(run["pid"]))
        if child is not None:
            child.poll()  # reap it if it ended
        if _alive(int(run["pid"]), run["run_dir"]):
            return None
        self._children.pop(int(run["pid"]), None)
        report = _read_json(Path(run["run_dir"]) / "report.json", {})
        status = report.get("status")
        if status in ("promoted", "deployed") and report.get("adapter"):
            version = str(report["adapter"]).rsplit("@", 1)[1]
            st.update(run=None, attempts=0, cutoff=run["cutoff"], last_run_at=time.time())
            share = float(self.cfg.for_task(task, "canary_share"))
            self.registry.start_canary(task, version, share, reason=f"loop: run {Path(run['run_dir']).name} passed the "
                                                                    f"offline gate ({run['trigger']})")
            return self._note(task, "canary_started", version=version, share=share, run_dir=run["run_dir"],
                              reason=f"{report['adapter']} passed the gate")
        if status == "rejected":
            st.update(run=None, attempts=0, cutoff=run["cutoff"], last_run_at=time.time())
            return self._note(task, "candidate_rejected", reason=report.get("message", ""), run_dir=run["run_dir"])
        st["attempts"] = int(st.get("attempts") or 0) + 1
        if st["attempts"] >= self.cfg.max_attempts:
            st.update(run=None, attempts=0, last_run_at=time.time())
            return self._note(task, "training_failed", reason=f"gave up after {self.cfg.max_attempts} attempts "
                                                              f"(last status {status or 'no report'})",
                              run_dir=run["run_dir"])
        return self._start_run(task, st, run["trigger"], resume=True)

    # ------------------------------------------------------------------------------------------ canary
    def _judge(self, task: str, canary: dict) -> dict | None:
        prod = self.registry.aliases(task)["production"]
        if prod != canary.get("production"):
            self.registry.end_canary(task, "cancelled", reason=f"production moved to {prod} by an operator during "
                                                               "the canary: the override wins")
            return self._note(task, "canary_cancelled", reason="production moved by an operator")
        cand_name = f"{task}@{canary['version']}"
        prod_name = f"{task}@{prod}" if prod else ""
        with open_store(self.cfg.db_path()) as store:
            records = list(store.iter_records(task=task, since=float(canary["started_at"])))
            fb = store.feedback_for([r.request_id for r in records]) if records else {}
        c, p = judge_mod.collect(records, fb, cand_name, prod_name)
        control = "concurrent"
        if p.n < self.cfg.min_samples:
            # too little production traffic in the window (a high share): production's own live answers to the
            # task from before the canary are the control instead
            start = float(canary["started_at"])
            with open_store(self.cfg.db_path()) as store:
                before = [r for r in store.iter_records(task=task, since=start - self.cfg.max_hours * 3600,
                                                        until=start, source="live")]
                fb_before = store.feedback_for([r.request_id for r in before]) if before else {}
            _, hist = judge_mod.collect(before, fb_before, cand_name, prod_name)
            if hist.n > p.n:
                p, control = hist, f"historical ({self.cfg.max_hours:g} h before the canary)"
        rule = judge_mod.Rule(min_samples=self.cfg.min_samples, min_rollback=self.cfg.min_rollback,
                              margin=self.cfg.margin, confidence=self.cfg.confidence,
                              max_latency_ratio=self.cfg.max_latency_ratio, max_hours=self.cfg.max_hours)
        v = judge_mod.judge(c, p, rule, age_hours=(time.time() - float(canary["started_at"])) / 3600)
        v.production["control"] = control
        if v.decision == "wait":
            self._task_state(task)["last"] = {"time": time.time(), "task": task, "event": "canary_waiting",
                                              "reason": v.rule, "evidence": v.evidence()}
            return None
        outcome = "promoted" if v.decision == "promote" else "rolled_back"
        self.registry.end_canary(task, outcome, reason=v.rule, evidence=v.evidence())
        return self._note(task, f"canary_{outcome}", version=canary["version"], reason=v.rule,
                          evidence=v.evidence())

    # ------------------------------------------------------------------------------------------ status
    def status(self) -> dict:
        out = {"state_dir": str(self.state_dir), "paused": paused(self.state_dir), "tasks": {}}
        for task in self.tasks():
            st = self.state["tasks"].get(task) or {}
            aliases = self.registry.aliases(task) if task in self.registry.tasks() else {}
            run = st.get("run")
            out["tasks"][task] = {
                "production": aliases.get("production"), "candidate": aliases.get("candidate"),
                "canary": self.registry.canary(task) if aliases else None,
                "training": ({**run, "alive": _alive(int(run["pid"]), run["run_dir"])} if run else None),
                "data_cutoff": st.get("cutoff"), "last_run_at": st.get("last_run_at"), "last": st.get("last")}
        return out


def _manifest_time(manifest: dict) -> float:
    """When a version was registered (its data cannot be newer), as unix seconds."""
    try:
        return dt.datetime.fromisoformat(str(manifest.get("created_at"))).timestamp()
    except ValueError:
        return 0.0
