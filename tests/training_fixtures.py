"""Log records and training configs for the training tests (real SQLite stores, real small runs).

`math_records` answer in a fixed format ("SUM: a + b = c. DONE.") a real LoRA learns in a few steps;
`translation_records` are another task's data, for the forgetting measure.
"""
from __future__ import annotations

import random

from convlog.schema import LogRecord
from convlog.store import open_store
from training import config as training_config

T0 = 1_700_000_000.0


def rec(rid, prompt, answer, task="math", **kw) -> LogRecord:
    base = dict(request_id=rid, created_at=T0 + kw.pop("dt", 0), messages=[{"role": "user", "content": prompt}],
                response_text=answer, task=task, confidence=kw.pop("confidence", 0.95), finish_reason="stop")
    base.update(kw)
    return LogRecord(**base)


NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
WORDS = ["apple", "river", "mountain", "window", "garden", "yellow", "teacher", "bridge", "morning", "library",
         "forest", "kitchen", "ocean", "pencil", "winter", "castle", "rabbit", "candle", "silver", "harbor"]
FR = ["pomme", "rivière", "montagne", "fenêtre", "jardin", "jaune", "professeur", "pont", "matin", "bibliothèque",
      "forêt", "cuisine", "océan", "crayon", "hiver", "château", "lapin", "bougie", "argent", "port"]


def math_records(n, prefix="m", seed=0):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rnd.randint(1, 60), rnd.randint(1, 60)
        out.append(rec(f"{prefix}{i}", f"Compute {a} + {b}.", f"SUM: {a} + {b} = {a + b}. DONE.", dt=i))
    return out


def translation_records(n, prefix="t"):
    return [rec(f"{prefix}{i}", f"Translate '{WORDS[i % 20]}' to French.", f"FR: {FR[i % 20]}", task="translation", dt=i)
            for i in range(n)]


def cfg_for(tmp_path, **kw):
    base = {"task": "math", "db": str(tmp_path / "logs.sqlite3"), "registry": str(tmp_path / "registry"),
            "min_records": 4, "pii": "mask", "num_threads": 2}
    base.update(kw)
    return training_config.load(None, base)


def fill_store(tmp_path):
    with open_store(tmp_path / "logs.sqlite3") as s:
        s.write_many(math_records(14) + translation_records(12))


def fast_cfg(tmp_path, run, **kw):
    base = dict(run_dir=str(tmp_path / run), max_steps=12, learning_rate=1e-3, batch_size=4, max_seq_len=128,
                warmup_ratio=0.0, lr_scheduler="constant_with_warmup", save_steps=6, eval_steps=6,
                eval_fraction=0.2, eval_max_records=8, forgetting_max_records=4, min_eval_records=3, pii="off")
    base.update(kw)
    return cfg_for(tmp_path, **base)
