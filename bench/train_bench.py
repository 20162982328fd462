"""Training throughput of the `quick` profile on this machine: seconds/step, tokens/s, peak RSS.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_bench.py --steps 6 [--seq-len 384 --batch-size 4 --device cpu]

Rows are synthetic chat turns padded to about --seq-len tokens with the base chat template (worst case for the
profile: every sequence at the length limit). Step 1 (warm-up) is excluded from the per-step time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    from training.config import apply_device, load

    over = {"task": "code", "device": a.device, "max_steps": a.steps, "eval_steps": 10_000, "save_steps": 10_000}
    if a.seq_len:
        over["max_seq_len"] = a.seq_len
    if a.batch_size:
        over["batch_size"] = a.batch_size
    cfg = load(None, over)
    apply_device(cfg.device)
    from transformers import AutoTokenizer, TrainerCallback

    import basemodel as model
    from training.backends import TrainJob, select_backend
    from training.format import tokenize_row

    mdir = str(model.prepare())
    tok = AutoTokenizer.from_pretrained(mdir)
    filler = "def add(a, b):\n    return a + b  # sum of two numbers\n"
    rows = []
    for i in range(cfg.batch_size * (a.steps + 1)):
        ans = filler * 200
        row = {"prompt": [{"role": "user", "content": f"Write helper number {i} in Python."}],
               "completion": [{"role": "assistant", "content": ans}]}
        ids = tokenize_row(tok, row)["input_ids"]
        keep = tok.decode(tok(ans)["input_ids"][: cfg.max_seq_len - (len(ids) - len(tok(ans)["input_ids"])) - 2])
        row["completion"][0]["content"] = keep
        rows.append(row)

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as d:
        job = TrainJob(cfg, mdir, rows, [], Path(d) / "ck", Path(d) / "ad", callbacks=[Timer()])
        out = select_backend(cfg).train(job)
    steady = times[1:] or times
    sps = sum(steady) / len(steady)
    tokens_per_step = out.train_tokens / len(rows) * cfg.batch_size * cfg.grad_accum
    res = {"device": cfg.device, "threads": cfg.num_threads, "batch_size": cfg.batch_size, "max_seq_len": cfg.max_seq_len,
           "steps": out.steps, "seconds_per_step": round(sps, 3), "first_step_s": round(times[0], 3),
           "tokens_per_step": round(tokens_per_step), "tokens_per_s": round(tokens_per_step / sps, 1),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
