"""Classifier benchmark: held-out quality (embed vs TF-IDF) and CPU latency/throughput of the embed model.

Run: .venv/bin/python bench/classifier_bench.py [--out docs/bench-classifier.json]

- trains both kinds on the seed set (the same recipe as `classifier train`) into a temp dir,
- scores them on classifier/data/heldout_real.jsonl (accuracy, macro-F1, misroute and fallback rates at
  each artifact's own threshold),
- single-prompt latency p50/p99 of `Classifier.predict_detailed([text])` for prompts of ~16..512 tokens,
  with torch threads = 1 and = 2, and batch throughput (batches of 32 real prompts).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quality(tmp: Path, embedder) -> dict:
    import classifier
    from classifier.metrics import evaluate
    from classifier.train import TrainConfig, predict_file, train

    out = {}
    for kind in ("embed", "tfidf"):
        t0 = time.monotonic()
        train(TrainConfig(data=classifier.seed_path(), out=tmp / kind, model=kind), embedder=embedder, log=lambda *a: None)
        train_s = time.monotonic() - t0
        clf = classifier.load(tmp / kind)
        clf._embedder = embedder
        ex, pred, conf = predict_file(clf, classifier.heldout_path())
        m = evaluate(ex.labels, pred, conf, clf.tasks, clf.threshold)
        r = m["routing"]
        out[kind] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "threshold": clf.threshold,
                     "misroute_rate": r["misroute_rate"], "fallback_rate": r["fallback_rate"],
                     "routed_precision": r["routed_precision"], "n": m["n"], "train_s": round(train_s, 1),
                     "per_class_f1": {t: round(c["f1"], 3) for t, c in m["per_class"].items()}}
    return out


def prompts_of_tokens(tokenizer, base: list[str], n_tokens: int, count: int) -> list[str]:
    text = " ".join(base)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for i in range(count):
        start = (i * 37) % max(1, len(ids) - n_tokens)
        out.append(tokenizer.decode(ids[start:start + n_tokens]))
    return out


def latency(clf, tokenizer, base: list[str], threads: int, sizes=(16, 64, 128, 256, 512), reps: int = 200) -> dict:
    import torch

    torch.set_num_threads(threads)
    res = {}
    for n in sizes:
        texts = prompts_of_tokens(tokenizer, base, n, reps)
        for t in texts[:10]:  # warm-up
            clf.predict_detailed([t])
        ts = []
        for t in texts:
            t0 = time.perf_counter()
            clf.predict_detailed([t])
            ts.append((time.perf_counter() - t0) * 1000)
        res[n] = {"p50_ms": round(float(np.percentile(ts, 50)), 2), "p99_ms": round(float(np.percentile(ts, 99)), 2)}
    return res


def throughput(clf, texts: list[str], threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    clf.predict_detailed(texts[:32])
    t0 = time.perf_counter()
    for s in range(0, len(texts), 32):
        clf.predict_detailed(texts[s:s + 32])
    return len(texts) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument("--reps", type=int, default=200, help="single-prompt calls per size")
    args = ap.parse_args()
    import torch

    import classifier
    from classifier.embed import Embedder
    from router.sharegpt import first_turn_prompts

    torch.set_num_threads(2)
    embedder = Embedder()
    with tempfile.TemporaryDirectory() as d:
        q = quality(Path(d), embedder)
        clf = classifier.load(Path(d) / "embed")
        clf._embedder = embedder
        base = first_turn_prompts(400, min_chars=200)
        lat = {th: latency(clf, embedder.tokenizer, base, th, reps=args.reps) for th in (1, 2)}
        real = first_turn_prompts(512)
        tput = {th: round(throughput(clf, real, th), 1) for th in (1, 2)}
    result = {"quality": q, "latency_ms": lat, "throughput_prompts_per_s": tput,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
