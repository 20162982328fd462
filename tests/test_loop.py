"""The loop controller: triggers, supervised training, canary split in the gateways, live judgement, automatic
promote / rollback, pause, kill -9 recovery. Real registry, real SQLite log, real vLLM, real training steps."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from adapters.registry import Registry
from basemodel import fingerprint
from convlog.sharegpt import first_turn_prompts
from convlog.store import open_store
from loop import judge
from loop.config import LoopConfig
from loop.controller import Controller, set_paused
from router.client import Client

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CT = "canarycode"  # a task name no other test registers: the session vLLM is shared


# ------------------------------------------------------------------------------------------ the rule itself
def test_degenerate_answers_are_recognised():
    assert judge.degenerate("", "stop") == "empty"
    assert judge.degenerate("Sure <|im_start|>assistant", "stop") == "template_marker"
    assert judge.degenerate("``` " * 60, "length") == "repetition"
    assert judge.degenerate("the cat sat on the mat " * 20, "length") == "repetition"
    assert judge.degenerate("the cat sat on the mat " * 20, "stop") == ""  # a finished answer may repeat itself
    salad = "aedia Ayurvediao cafeter struggiao Wucceediliencyostering respectivelyChannelTyp splitext aughed"
    assert judge.degenerate(salad, "length") == "gibberish"  # what a LoRA with large random weights answered
    from convlog.sharegpt import iter_conversations

    answers = [m["content"] for c in iter_conversations(limit=300) for m in c.messages if m["role"] == "assistant"]
    flagged = [a for a in answers if judge.degenerate(a, "stop")]
    assert len(answers) > 300 and len(flagged) / len(answers) < 0.02  # real answers are rarely flagged


def _arm(name, n, bad, ttft=100.0):
    a = judge.Arm(name, n=n, bad=bad, degenerate=bad)
    a.ttft_ms = [ttft] * n
    return a


def test_rule_rolls_back_early_and_promotes_only_with_evidence():
    rule = judge.Rule(min_samples=30, min_rollback=5, margin=0.05, confidence=0.95)
    assert judge.judge(_arm("c", 6, 6), _arm("p", 6, 0), rule, age_hours=0).decision == "rollback"
    assert judge.judge(_arm("c", 4, 4), _arm("p", 4, 0), rule, age_hours=0).decision == "wait"  # < min_rollback
    assert judge.judge(_arm("c", 10, 0), _arm("p", 10, 0), rule, age_hours=0).decision == "wait"  # < min_samples
    assert judge.judge(_arm("c", 100, 1), _arm("p", 100, 1), rule, age_hours=0).decision == "promote"
    assert judge.judge(_arm("c", 100, 1, ttft=400), _arm("p", 100, 1), rule, age_hours=0).decision == "rollback"
    assert judge.judge(_arm("c", 12, 1), _arm("p", 12, 1), rule, age_hours=30).decision == "rollback"  # window over


# ------------------------------------------------------------------------------------------ pause / triggers
def test_pause_is_honoured_and_triggers_count_new_records(tmp_path, capsys):
    from training_fixtures import math_records

    with open_store(tmp_path / "logs.sqlite3") as s:
        s.write_many(math_records(12))
    cfg = LoopConfig(tasks=["math"], db=str(tmp_path / "logs.sqlite3"), registry=str(tmp_path / "registry"),
                     state_dir=str(tmp_path / "loop"), min_new_records=10, min_interval_h=0).validate()
    ctl = Controller(cfg, echo=lambda *a: None)
    set_paused(ctl.state_dir, "math", True)
    assert ctl.run_once() == [{"task": "math", "event": "paused"}]
    assert not (tmp_path / "loop" / "runs").exists()
    set_paused(ctl.state_dir, None, True)  # all paused, task flag kept
    set_paused(ctl.state_dir, "math", False)
    assert ctl.run_once() == [{"task": "math", "event": "paused"}]
    set_paused(ctl.state_dir, None, False)
    assert ctl._trigger("math", ctl._task_state("math")).startswith("12 new records")
    ctl._task_state("math")["cutoff"] = time.time()  # data already used: nothing new
    assert ctl._trigger("math", ctl._task_state("math")) == ""
    from cli import main

    flags = ["--tasks", '["math"]', "--db", cfg.db, "--registry", cfg.registry, "--state-dir", cfg.state_dir]
    assert main(["loop", "pause", "math", *flags]) == 0
    capsys.readouterr()
    assert main(["loop", "run-once", "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out) == [{"task": "math", "event": "paused"}]
    assert main(["loop", "status", "--json", *flags]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["paused"]["tasks"] == ["math"] and st["tasks"]["math"]["canary"] is None
    assert main(["loop", "resume", *flags]) == 0
    second = Controller(cfg, echo=lambda *a: None)
    ctl.acquire()
    try:
        with pytest.raises(Exception, match="another loop controller"):
            second.acquire()
    finally:
        ctl.release()


def test_general_is_refused_as_a_loop_task():
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="general"):
        LoopConfig(tasks=["general"]).validate()


def test_a_person_moving_production_during_a_canary_wins(model_dir, make_lora, tmp_path):
    reg = Registry(tmp_path / "registry")
    fp = fingerprint(model_dir)
    for seed in (31, 32, 33):
        reg.register("code", make_lora(model_dir, tmp_path / f"l{seed}", seed=seed), base_model_id=SMOL,
                     base_fingerprint=fp)
    reg.set_alias("code", "production", "1")
    reg.start_canary("code", "2", share=0.3, reason="test")
    with open_store(tmp_path / "logs.sqlite3"):
        pass
    cfg = LoopConfig(tasks=["code"], db=str(tmp_path / "logs.sqlite3"), registry=str(tmp_path / "registry"),
                     state_dir=str(tmp_path / "loop")).validate()
    ctl = Controller(cfg, echo=lambda *a: None)
    assert ctl.run_once() == []  # no traffic yet: the canary waits
    reg.set_alias("code", "production", "3", reason="adapters deploy code 3 (a person)")
    events = ctl.run_once()
    assert [e["event"] for e in events] == ["canary_cancelled"]
    assert reg.canary("code") is None and reg.aliases("code")["production"] == "3"
    assert [h for h in reg.history("code") if h.get("alias") == "canary"][-1]["outcome"] == "cancelled"


# ------------------------------------------------------------------------------------------ live canary
@pytest.fixture(scope="module")
def canary_setup(gateway_factory, model_dir, tmp_path_factory, make_lora):
    d = tmp_path_factory.mktemp("canary")
    reg = Registry(d / "registry")
    fp = fingerprint(model_dir)
    good = make_lora(model_dir, d / "good", seed=21, lora_alpha=1)  # scale 1/8: answers like the base model
    broken = make_lora(model_dir, d / "broken", seed=22, lora_alpha=2048)  # scale 256: garbage
    reg.register(CT, good, base_model_id=SMOL, base_fingerprint=fp)
    reg.register(CT, broken, base_model_id=SMOL, base_fingerprint=fp)
    reg.set_alias(CT, "production", "1", reason="test setup")
    o = {"registry": str(d / "registry"), "deploy": {"registry_poll_s": 0.2},
         "logs": {"enabled": True, "path": str(d / "logs.sqlite3")}}
    gws = [gateway_factory(o), gateway_factory(o)]  # two replicas sharing one registry (and here one log)
    return d, reg, gws


def test_two_gateways_apply_the_same_split_and_a_broken_candidate_is_rolled_back(canary_setup, poll, capsys,
                                                                                monkeypatch):
    d, reg, gws = canary_setup
    reg.start_canary(CT, "2", share=0.5, reason="test: broken candidate")
    for g in gws:
        poll(lambda g=g: CT in g.server.table.canaries, timeout_s=120, what="the gateway to apply the canary")
    prompts = [p for p in first_turn_prompts(200, max_chars=300)][:60]
    clients = [Client(g.target, timeout=300) for g in gws]
    try:
        # the split is the same on both replicas (a hash of the request), and a retry lands on the same version
        for p in prompts[:6]:
            picks = {c.generate(p, task=CT, max_tokens=4).adapter for c in clients for _ in range(2)}
            assert len(picks) == 1, picks
        cfg = LoopConfig(tasks=[CT], db=str(d / "logs.sqlite3"), registry=str(d / "registry"),
                         state_dir=str(d / "loop"), min_samples=30, min_rollback=5).validate()
        ctl = Controller(cfg, echo=lambda *a: None)
        sent = failed = served_by_canary = 0
        outcome = None
        for i, p in enumerate(prompts[6:]):
            try:
                r = clients[i % 2].generate(p, task=CT, max_tokens=48, temperature=0)
                served_by_canary += r.adapter == f"{CT}@2"
                assert r.route.reason in ("canary", "task_override")
            except Exception:
                failed += 1
            sent += 1
            events = ctl.run_once()
            done = [e for e in events if e.get("event", "").startswith("canary_")]
            if done:
                outcome = done[0]
                break
    finally:
        for c in clients:
            c.close()
    assert outcome is not None and outcome["event"] == "canary_rolled_back", (sent, served_by_canary, outcome)
    assert failed == 0 and sent <= 50
    assert reg.aliases(CT)["production"] == "1" and reg.canary(CT) is None
    last = [h for h in reg.history(CT) if h.get("alias") == "canary"][-1]
    ev = last["evidence"]
    assert last["outcome"] == "rolled_back" and "clearly worse" in last["reason"]
    assert ev["candidate"]["requests"] >= 5 and ev["candidate"]["degenerate"] >= 1 and ev["p_worse"] >= 0.95
    assert ev["candidate"]["bad_rate"] > ev["production"]["bad_rate"]
    for g in gws:
        poll(lambda g=g: CT not in g.server.table.canaries, timeout_s=60, what="the canary to end in the gateway")
    with Client(gws[0].target, timeout=300) as c:
        assert {c.generate(p, task=CT, max_tokens=1).adapter for p in prompts[:8]} == {f"{CT}@1"}
    st = ctl.status()["tasks"][CT]
    assert st["last"]["event"] == "canary_rolled_back" and st["production"] == "1"
    from cli import main

    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "300")  # a wide terminal: the history table's cells do not wrap
    assert main(["adapters", "show", CT, "--registry", str(d / "registry")]) == 0
    out = capsys.readouterr().out  # the history says why
    assert "rolled_back: clearly worse" in out and "P(worse)" in out


# ------------------------------------------------------------------------------------------ end to end
def _loop_proc(cfg_file, home, repo_root):
    env = dict(os.environ, SPECIALIST_ROUTER_HOME=str(home))
    return subprocess.Popen([sys.executable, "-m", "cli", "loop", "--config", str(cfg_file)], cwd=repo_root,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(home / "loop.log", "ab"))


def _state(d):
    try:
        return json.loads((d / "loop" / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"tasks": {}}


@pytest.mark.slow
def test_loop_end_to_end_with_kill9_during_training(gateway_factory, model_dir, tmp_path, poll, repo_root):
    """ShareGPT conversations in the log -> the loop trains (killed -9 with its child mid-run, then restarted:
    production untouched, the run resumes) -> gate -> canary at share 1.0 -> promoted -> served, no restart."""
    from cli.logs import load_classifier
    from convlog.sharegpt_import import import_sharegpt

    db = tmp_path / "logs.sqlite3"
    with open_store(db) as store:
        counts = import_sharegpt(store, limit=1500, classify=load_classifier())
    with open_store(db) as store:
        n_code = store.stats()["by_task"].get("code", 0)
    assert n_code >= 40, counts
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(json.dumps({
        "backend": {"max_loras": 4}, "loop": {
            "tasks": ["code"], "db": str(db), "registry": str(tmp_path / "registry"),
            "state_dir": str(tmp_path / "loop"), "poll_s": 1, "min_new_records": 40, "min_interval_h": 0,
            "canary_share": 1.0, "min_samples": 8, "min_rollback": 5, "margin": 0.2,
            "train_set": ["max_steps=24", "batch_size=2", "max_seq_len=256", "learning_rate=5e-4", "save_steps=6",
                          "eval_steps=12", "eval_max_records=8", "forgetting_max_records=4", "forgetting_bound=5.0",
                          f"base_model={model_dir}", "num_threads=1", "min_records=8"]}}))
    gw = gateway_factory({"registry": str(tmp_path / "registry"), "deploy": {"registry_poll_s": 0.5},
                          "logs": {"enabled": True, "path": str(db)}})
    home = tmp_path / "home"
    home.mkdir()
    loop = _loop_proc(cfg_file, home, repo_root)
    try:
        poll(lambda: (_state(tmp_path)["tasks"].get("code") or {}).get("run"), timeout_s=120,
             what="the loop to start a training run")
        run = _state(tmp_path)["tasks"]["code"]["run"]
        poll(lambda: any((tmp_path / "loop" / "runs").rglob("checkpoint-*/trainer_state.json")), timeout_s=900,
             what="the first complete training checkpoint")
        os.killpg(loop.pid, signal.SIGKILL)  # the loop ...
        os.killpg(int(run["pid"]), signal.SIGKILL)  # ... and its training child, mid-run
        loop.wait(30)
        assert Registry(tmp_path / "registry").aliases("code")["production"] is None  # production untouched
        report = os.path.join(run["run_dir"], "report.json")
        assert not os.path.isfile(report) or json.loads(open(report).read()).get("status") not in ("promoted",
                                                                                                 "rejected")
        loop = _loop_proc(cfg_file, home, repo_root)
        poll(lambda: Registry(tmp_path / "registry").canary("code") is not None, timeout_s=1500,
             what="the resumed run to pass the gate and start a canary")
        st = _state(tmp_path)["tasks"]["code"]
        assert st["last"]["event"] == "canary_started"
        log = open(run["run_dir"] + ".log").read()
        assert "[train] resuming from" in log and "checkpoint-" in log  # the retry continued from the checkpoint
        version = Registry(tmp_path / "registry").canary("code")["version"]
        poll(lambda: "code" in gw.server.table.canaries, timeout_s=120, what="the gateway to apply the canary")
        prompts = [p for p in first_turn_prompts(300, max_chars=300)]
        failed = 0
        with Client(gw.target, timeout=300) as c:
            for p in prompts[:40]:
                try:
                    r = c.generate(p, task="code", max_tokens=32, temperature=0)
                    assert r.adapter == f"code@{version}" and r.route.reason == "canary"
                except AssertionError:
                    if Registry(tmp_path / "registry").canary("code") is None:
                        break  # decided while this request was routed
                    raise
                except Exception:
                    failed += 1
                if Registry(tmp_path / "registry").canary("code") is None:
                    break
            poll(lambda: Registry(tmp_path / "registry").canary("code") is None, timeout_s=60,
                 what="the loop to decide")
        reg = Registry(tmp_path / "registry")
        last = [h for h in reg.history("code") if h.get("alias") == "canary"][-1]
        assert failed == 0
        assert last["outcome"] == "promoted", last
        assert reg.aliases("code")["production"] == version
        poll(lambda: gw.server.table.routes.get("code") == f"code@{version}", timeout_s=120,
             what="the gateway to serve the promoted version")
        with Client(gw.target, timeout=300) as c:
            r = c.generate(prompts[0], task="code", max_tokens=4)
            assert r.adapter == f"code@{version}" and r.route.reason == "task_override"
    finally:
        left = (_state(tmp_path)["tasks"].get("code") or {}).get("run")
        for pid in (loop.pid, int(left["pid"]) if left else None):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
