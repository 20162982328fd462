"""Is the classifier limited by its data or by its model? Two measurements on held-out set 2 (real traffic).

Run: .venv/bin/python bench/classifier_ceiling.py [--folds 2] [--work /tmp/ceiling] [--out /tmp/ceiling.json]

1. *Heads* (seconds): on the shipped fine-tuned encoder's embeddings of the seed set (96 wordpieces, int8), fit
   other heads than the default logistic regression (C sweep, unbalanced, +length/symbol features, MLP, kNN),
   and the default head with held-out-2 rows added to its training data (K-fold over held-out 2: each fold is
   scored by a head that saw the other folds). Scored on both held-out sets.
2. *Encoder + head with real-traffic data* (~10 min per fine-tune on 2 cores): fine-tune the encoder with the
   default recipe (`classifier.finetune`) on the whole seed set (the reference), and once per fold on the seed set
   plus the other folds of held-out 2; fit the default head on the same rows; score the fold. Both arms are
   scored on the same rows, so the difference is what in-distribution labeled data buys.

This is an experiment on the held-out set, so nothing here chooses a shipped model: it answers whether labeling
more real traffic would move the accuracy goal. Fine-tuned encoders are cached in `--work`
(`seed-only.safetensors`, `fold<k>of<K>.safetensors`); delete them to fine-tune again.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RARE = ("summarization", "translation", "extraction")  # too few held-out-2 rows to stratify on alone


def _score(y, p) -> dict:
    from sklearn.metrics import f1_score

    y, p = np.asarray(y), np.asarray(p)
    return {"accuracy": round(float(np.mean(y == p)), 4), "macro_f1": round(float(f1_score(y, p, average="macro")), 4),
            "n": int(len(y))}


def _shape_features(texts: list[str]) -> np.ndarray:
    """Cheap features the embedding window cannot see: length, line count, code-symbol and non-ASCII share."""
    rows = []
    for t in texts:
        n = max(len(t), 1)
        rows.append([np.log1p(len(t)) / 8, np.log1p(t.count("\n") + 1) / 5,
                     5 * sum(c in "{}();=<>[]_/\\#$*" for c in t) / n, sum(ord(c) > 127 for c in t) / n,
                     float("```" in t), float(len(t) > 400)])
    return np.array(rows)


def _lr(C=1.0, balanced=True):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=3000, class_weight="balanced" if balanced else None)


def heads(seed, held, emb, folds) -> dict:
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier

    Xs, ys = emb.encode(list(seed.texts))[0], np.array(seed.labels)
    H = {n: (emb.encode(list(ex.texts))[0], np.array(ex.labels), list(ex.texts)) for n, ex in held.items()}
    out = {}

    def run(name, model, fx=lambda X, texts: X):
        model.fit(fx(Xs, list(seed.texts)), ys)
        out[name] = {n: _score(y, model.predict(fx(X, texts))) for n, (X, y, texts) in H.items()}
        print(name, out[name], flush=True)

    for C in (0.3, 1.0, 3.0):
        run(f"lr C={C} balanced{' (default)' if C == 1.0 else ''}", _lr(C))
    run("lr C=1 unbalanced", _lr(1.0, balanced=False))
    run("lr C=1 + shape features", _lr(), lambda X, texts: np.hstack([X, _shape_features(texts)]))
    run("mlp 256", MLPClassifier((256,), alpha=1e-3, max_iter=300, early_stopping=True, random_state=0))
    run("knn 15 cosine", KNeighborsClassifier(15, weights="distance", metric="cosine"))
    X2, y2, _ = H["heldout_real2"]
    pred = np.empty(len(y2), dtype=object)
    for tr, te in folds:
        m = _lr().fit(np.vstack([Xs, X2[tr]]), np.concatenate([ys, y2[tr]]))
        pred[te] = m.predict(X2[te])
    out["lr C=1 + other held-out-2 folds in training"] = {"heldout_real2": _score(y2, pred.astype(str))}
    print("head with held-out-2 folds", out["lr C=1 + other held-out-2 folds in training"], flush=True)
    return out


def encoders(seed, held, folds, work: Path) -> dict:
    from classifier.embed import DEFAULT_MAX_TOKENS, Embedder
    from classifier.finetune import FinetuneConfig, finetune

    h1, h2 = held["heldout_real"], held["heldout_real2"]
    y2 = np.array(h2.labels)

    def fit(name, texts, labels):
        f = work / f"{name}.safetensors"
        if not f.is_file():
            t0 = time.monotonic()
            finetune(texts, labels, f, FinetuneConfig(threads=2), log=lambda m: print(name, m, flush=True))
            print(f"{name}: fine-tuned in {time.monotonic() - t0:.0f} s", flush=True)
        emb = Embedder(quant="int8", lora=f)
        head = _lr().fit(emb.encode(texts, max_tokens=DEFAULT_MAX_TOKENS)[0], np.array(labels))
        return lambda xs: head.predict(emb.encode(list(xs), max_tokens=DEFAULT_MAX_TOKENS)[0])

    ref = fit("seed-only", list(seed.texts), list(seed.labels))
    ref2, ref1 = ref(h2.texts), ref(h1.texts)
    out = {"seed-only encoder": {"heldout_real": _score(h1.labels, ref1), "heldout_real2": _score(y2, ref2)},
           "folds": []}
    pred = np.empty(len(y2), dtype=object)
    for k, (tr, te) in enumerate(folds):
        f = fit(f"fold{k}of{len(folds)}", list(seed.texts) + [h2.texts[i] for i in tr], list(seed.labels) + [h2.labels[i] for i in tr])
        pred[te] = f([h2.texts[i] for i in te])
        row = {"fold": k, "rows": int(len(te)), "with_heldout2_rows": _score(y2[te], pred[te].astype(str)),
               "seed_only": _score(y2[te], ref2[te]), "heldout_real": _score(h1.labels, f(h1.texts))}
        out["folds"].append(row)
        print(row, flush=True)
    out["with other held-out-2 folds (encoder + head)"] = {"heldout_real2": _score(y2, pred.astype(str))}
    out["paired"] = {"with_right_only": int(np.sum((pred == y2) & (ref2 != y2))),
                     "seed_only_right_only": int(np.sum((pred != y2) & (ref2 == y2)))}
    print(out["with other held-out-2 folds (encoder + head)"], out["paired"], flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/classifier-ceiling"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--heads-only", action="store_true", help="skip the fine-tunes (part 2)")
    args = ap.parse_args(argv)
    import torch
    from sklearn.model_selection import StratifiedKFold

    import classifier
    from classifier.dataset import load_jsonl
    from classifier.embed import Embedder

    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    seed = load_jsonl(ROOT / "classifier/data/seed.jsonl")
    held = {p.stem: load_jsonl(p) for p in classifier.heldout_paths()}
    y2 = np.array(held["heldout_real2"].labels)
    strata = np.where(np.isin(y2, RARE), "rare", y2)
    folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=0).split(np.zeros(len(y2)), strata))
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "folds": args.folds,
              "heads": heads(seed, held, Embedder(quant="int8", lora=classifier.shipped_encoder_path()), folds)}
    if not args.heads_only:
        result["encoders"] = encoders(seed, held, folds, args.work)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
