"""training/: data filters on a real SQLite log store, completion-only labels, real LoRA steps on SmolLM2-135M,
the evaluation gate, resume from a checkpoint and the run-dir guard."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from training_fixtures import NUMBERS, T0, cfg_for, fast_cfg, fill_store, math_records, rec  # noqa: E402

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument  # noqa: E402
from training import config as training_config  # noqa: E402
from training import data as logdata  # noqa: E402


@pytest.fixture
def store(tmp_path):
    from convlog.store import open_store

    s = open_store(tmp_path / "logs.sqlite3")
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------------------
# data filters (real SQLite store through the logs API)

def test_each_filter_counts_what_it_drops(tmp_path, store):
    from transformers import AutoTokenizer

    import basemodel as model
    from training.format import token_counter

    good = [rec(f"g{i}", f"What is {NUMBERS[i]} times {NUMBERS[i + 1]} in a short sentence?",
                f"{NUMBERS[i].title()} times {NUMBERS[i + 1]} is {i * (i + 1)}, computed by repeated addition.", dt=i)
            for i in range(8)]
    recs = good + [
        rec("other", "Translate cat to French", "chat", task="translation"),
        rec("old", "Compute 99 + 1 please now", "It is one hundred exactly.", dt=-10_000),
        rec("fail", "Compute 5 + 5 for me", "", status="error", finish_reason="error"),
        rec("cut", "Compute 6 + 6 for me", "Twelve, because six and", finish_reason="length"),
        rec("unsure", "Compute 7 + 7 for me", "Fourteen in total.", confidence=0.3),
        rec("neg", "Compute 8 + 8 for me", "Seventeen, clearly.", ),
        rec("fixed", "Compute 9 + 9 for me", "Nineteen, I think."),
        rec("empty", "Compute 10 + 10 for me", "   "),
        rec("refuse", "Compute 11 + 11 for me", "I'm sorry, but I can't help with that request."),
        rec("asai", "Compute 12 + 12 for me", "As an AI language model, I do not do sums."),
        rec("pii", "Email the total of 2 + 2 to jane.doe@example.com", "The total of two and two is four; sent it."),
        rec("dup", good[0].messages[0]["content"].upper(), good[0].response_text),  # exact duplicate after normalizing
        rec("near", good[1].messages[0]["content"], good[1].response_text + " Yes."),  # near duplicate
        rec("long", "Add these: " + " + ".join(str(i) for i in range(400)), "A big number."),
    ]
    store.write_many(recs)
    store.add_feedback("neg", 1, comment="wrong")
    store.add_feedback("fixed", 2, correction="Nine plus nine is eighteen.")

    cfg = cfg_for(tmp_path, since=str(T0 - 100), max_seq_len=256, min_eval_records=2)
    tok = AutoTokenizer.from_pretrained(str(model.prepare()))
    records, feedback = logdata.load_logs(cfg)
    # the store applied the task + time window; feed everything to also exercise the in-memory selection
    train, held, report = logdata.filter_records(recs, feedback, cfg, token_count=token_counter(tok))
    dropped = report.dropped_by()
    assert dropped == {"select": 2, "failed_or_truncated": 2, "low_confidence": 1, "negative_feedback": 1,
                       "empty": 1, "refusal": 2, "exact_duplicate": 1, "near_duplicate": 1, "too_long": 1}, dropped
    assert {r.request_id for r in records} == {r.request_id for r in recs if r.task == "math" and r.request_id != "old"}
    kept = {e.request_id: e for e in train + held}
    assert set(kept) == {f"g{i}" for i in range(8)} | {"fixed", "pii"}
    assert kept["fixed"].completion == "Nine plus nine is eighteen." and report.corrected == 1
    assert "jane.doe@example.com" not in json.dumps(kept["pii"].row()) and report.pii_scrubbed == 1
    assert report.train + report.eval == 10 and len(held) >= 2
    # deterministic split by request id
    train2, held2, _ = logdata.filter_records(recs, feedback, cfg, token_count=token_counter(tok))
    assert [e.request_id for e in held2] == [e.request_id for e in held]
    assert report.steps[0].records_in == len(recs)


def test_long_multi_turn_record_keeps_its_latest_turns(tmp_path):
    """A conversation too long for max_seq_len loses its oldest exchanges (system prompt and last user turn
    kept) instead of being dropped; a single turn that cannot fit is still dropped, and trim_history: false
    restores the plain drop."""
    from transformers import AutoTokenizer

    import basemodel as model
    from training.format import token_counter

    tok = AutoTokenizer.from_pretrained(str(model.prepare()))
    history = [{"role": "system", "content": "You are a terse calculator."}]
    for i in range(12):
        history += [{"role": "user", "content": f"Compute {i} + {i}, and explain the steps at some length please, "
                                                f"with the reasoning written out for a student."},
                    {"role": "assistant", "content": f"{i} + {i} = {2 * i}. " + "Adding a number to itself doubles it. " * 4}]
    multi = rec("multi", "", "SUM: 20 + 20 = 40. DONE.", dt=1)
    multi.messages = history + [{"role": "user", "content": "Now compute 20 + 20."}]
    single = rec("single", "Add these: " + " + ".join(str(i) for i in range(400)), "A big number.", dt=2)
    recs = math_records(6) + [multi, single]
    count = token_counter(tok)
    assert count(multi.messages, multi.response_text)[1] > 256  # it does not fit as logged

    cfg = cfg_for(tmp_path, pii="off", max_seq_len=256, min_eval_records=1)
    train, held, report = logdata.filter_records(recs, {}, cfg, token_count=count)
    kept = {e.request_id: e for e in train + held}
    assert "multi" in kept and "single" not in kept and report.history_trimmed == 1
    m = kept["multi"]
    assert m.prompt[0]["role"] == "system" and m.prompt[1]["role"] == "user"
    assert m.prompt[-1]["content"] == "Now compute 20 + 20."
    assert 3 <= len(m.prompt) < len(multi.messages)  # some, not all, earlier turns kept: the newest ones
    assert m.prompt[-3:-1] == multi.messages[-3:-1]
    p_tokens, total = count(m.prompt, m.completion)
    assert total <= 256 and p_tokens <= cfg.effective_max_prompt_tokens()
    assert report.dropped_by().get("too_long") == 1 and report.to_dict()["history_trimmed"] == 1

    cfg_off = cfg_for(tmp_path, pii="off", max_seq_len=256, min_eval_records=1, trim_history=False)
    train, held, report = logdata.filter_records(recs, {}, cfg_off, token_count=count)
    assert {e.request_id for e in train + held} == {f"m{i}" for i in range(6)} and report.dropped_by()["too_long"] == 2


def test_too_few_records_says_which_filter(tmp_path):
    cfg = cfg_for(tmp_path, min_records=5, pii="off")
    recs = math_records(3) + [rec("x", "Compute 1 + 1", "I'm sorry, but I can't do that.")]
    _, _, report = logdata.filter_records(recs, {}, cfg)
    msg = logdata.too_few_message(report, cfg.min_records)
    assert "only 3 usable records" in msg and "refusal removed 1" in msg and "4 records in" in msg


def test_config_precedence_and_bad_input(tmp_path, monkeypatch):
    f = tmp_path / "t.yaml"
    f.write_text("profile: quick\nlearning_rate: 0.001\nbatch_size: 2\nmax_steps: 7\n")
    monkeypatch.setenv("SPECIALIST_ROUTER_TRAIN__BATCH_SIZE", "3")
    cfg = training_config.load(f, {"task": "code", "max_steps": 9})
    assert (cfg.learning_rate, cfg.batch_size, cfg.max_steps, cfg.lora_r, cfg.lora_alpha) == (0.001, 3, 9, 16, 32)
    with pytest.raises(InvalidArgument, match="unknown task 'sql'"):
        training_config.load(None, {"task": "sql"})
    assert training_config.load(None, {"task": "sql", "tasks": "[sql, code]"}).task == "sql"
    with pytest.raises(InvalidArgument, match="device"):
        training_config.load(None, {"task": "code", "device": "gpu0"})


def test_cli_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from cli import build_parser; p = build_parser(); "
            "a = p.parse_args(['train', '--task', 'code', '--device', 'cuda:1']); "
            "from cli.train import config_from_args; c = config_from_args(a); "
            "from training.config import apply_device; apply_device(c.device); "
            "import os; print('torch' in sys.modules, os.environ['CUDA_VISIBLE_DEVICES'])")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}  # nothing inherited: cuda:1 is GPU 1
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == ["False", "1"]


# ---------------------------------------------------------------------------------------------------------
# completion-only labels: which tokens are trained on

def test_trainer_trains_only_on_completion_tokens(tmp_path):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    import basemodel as model
    from training.backends import TrainJob, _sft_config
    from training.format import IGNORE, tokenize_row

    mdir = str(model.prepare())
    tok = AutoTokenizer.from_pretrained(mdir)
    rows = [e.row() for e in logdata.filter_records(math_records(4), {}, cfg_for(tmp_path, pii="off"))[0]
            + logdata.filter_records(math_records(4), {}, cfg_for(tmp_path, pii="off"))[1]]
    cfg = cfg_for(tmp_path, max_steps=1)
    job = TrainJob(cfg, mdir, rows, [], tmp_path / "ck", tmp_path / "ad")
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32),
                         args=_sft_config(job, on_cuda=False),
                         train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]),
                         processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    for row, ex in zip(rows, trainer.train_dataset):
        ids, labels = ex["input_ids"], ex["labels"]
        mine = tokenize_row(tok, row)
        assert ids == mine["input_ids"] and labels == mine["labels"]  # evaluation scores what training optimised
        n_prompt = sum(1 for x in labels if x == IGNORE)
        prompt_text = tok.decode(ids[:n_prompt])
        trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
        assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        assert row["prompt"][0]["content"] in prompt_text and prompt_text.endswith("<|im_start|>assistant\n")
        assert trained.startswith(row["completion"][0]["content"]) and "user" not in trained
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()  # padding is never trained on


# ---------------------------------------------------------------------------------------------------------
# real training runs (SmolLM2-135M, a few LoRA steps)

@pytest.mark.slow
def test_train_gate_register_then_refuse_worse_and_resume(tmp_path):
    import training
    from adapters.registry import Registry

    fill_store(tmp_path)
    # 1. a real run: loss falls, the gate passes, the adapter becomes the candidate
    # (overfitting 11 toy sums at lr 1e-3 really does raise the translation loss: the forgetting check is loosened here)
    rep = training.run(fast_cfg(tmp_path, "run1", forgetting_bound=5.0), show_progress=False)
    assert rep.train["steps"] == 12
    assert rep.train["final_loss"] < rep.train["first_loss"] * 0.7, rep.train
    assert rep.gate["passed"] and rep.status == "promoted", rep.gate
    assert rep.gate["candidate_loss"] < rep.gate["base_loss"]
    assert set(rep.gate["forgetting_by_task"]) == {"translation"}
    run1 = tmp_path / "run1"
    assert (run1 / "report.json").is_file() and (run1 / "loss.png").stat().st_size > 1000
    assert json.loads((run1 / "report.json").read_text())["adapter"] == rep.adapter
    reg = Registry(tmp_path / "registry")
    cand = reg.candidate("math")
    assert cand is not None and cand.name == rep.adapter
    assert cand.manifest["metrics"]["eval_loss"] == pytest.approx(rep.gate["candidate_loss"])
    reg.set_alias("math", "production", cand.version, reason="test")

    # 2. an existing run dir is refused without --resume
    with pytest.raises(AlreadyExists, match="--resume"):
        training.run(fast_cfg(tmp_path, "run1"), show_progress=False)

    # 3. interrupted run, then resume: continues from the last checkpoint (a barely trained adapter)
    weak = dict(learning_rate=1e-6, save_steps=2, eval_steps=100)
    with pytest.raises(KeyboardInterrupt):
        _interrupting_run(fast_cfg(tmp_path, "run2", max_steps=4, **weak), stop_after=3)
    assert (tmp_path / "run2" / "checkpoints" / "checkpoint-2").is_dir()
    rep2 = training.run(fast_cfg(tmp_path, "run2", max_steps=4, resume=True, **weak), show_progress=False)
    assert rep2.train["resumed_from"].endswith("checkpoint-2") and rep2.train["steps"] == 4

    # 4. ... and the gate refuses it: not better than production (nor the base) by the margin; nothing registered
    assert not rep2.gate["passed"] and rep2.status == "rejected"
    assert rep2.gate["production"] == cand.name
    assert any("production" in r for r in rep2.gate["reasons"]) and any("base model" in r for r in rep2.gate["reasons"])
    assert reg.candidate("math").version == cand.version and len(reg.versions("math")) == 1


def _interrupting_run(cfg, stop_after: int):
    """A run whose training is interrupted (KeyboardInterrupt, like Ctrl-C) after `stop_after` steps."""
    import training
    from training.monitor import LossMonitor

    orig = LossMonitor.on_step_end

    def on_step_end(self, args, state, control, **kw):
        orig(self, args, state, control, **kw)
        if state.global_step >= stop_after:
            raise KeyboardInterrupt

    LossMonitor.on_step_end = on_step_end
    try:
        training.run(cfg, show_progress=False)
    finally:
        LossMonitor.on_step_end = orig


def test_too_few_records_refused_with_counts(tmp_path):
    import training

    fill_store(tmp_path)
    with pytest.raises(FailedPrecondition, match=r"only \d+ usable records for task 'math'.*low_confidence removed 14"):
        training.run(fast_cfg(tmp_path, "run3", min_confidence=0.99, min_records=4), show_progress=False)
    assert json.loads((tmp_path / "run3" / "report.json").read_text())["status"] == "too_few_records"
