"""Train a classifier artifact from labeled JSONL: TF-IDF + embeddings (`combined`), embeddings or TF-IDF,
each followed by a logistic regression.

Steps: read + validate the data; hold out a stratified validation split; fit each candidate model kind on
the rest and score it on the split (`auto` keeps the better macro-F1); choose the abstain threshold on the
split's predictions (smallest threshold whose misroute rate is <= `max_misroute`); refit the chosen kind on
all the data; write a new version folder and point `current` at it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

# LORA_FILE: a fine-tuned encoder's file name in a version folder
from classifier.embed import DEFAULT_MAX_TOKENS
from classifier.finetune import LORA_FILE
from router.errors import InvalidArgument

KINDS = ("combined", "embed", "tfidf", "auto")
ENCODERS = ("base", "finetune")
EMBEDDING_KINDS = ("combined", "embed")
# Defaults chosen by 5-fold cross-validation on the seed set (docs/bench-classifier.md).
DEFAULT_C = {"embed": 3.0, "tfidf": 10.0, "combined": 10.0}
# With a fine-tuned encoder the embeddings already separate the tasks; a stronger prior calibrates better
# (validation log-loss 0.380 at C=1 vs 0.436 at C=10 on the seed's held-apart split; docs/bench-classifier.md).
FINETUNED_C = {"combined": 1.0, "embed": 1.0}
COMBINED_EMB_WEIGHT = 1.0


@dataclass
class TrainConfig:
    """One `classifier train` run."""

    data: Path  # labeled JSONL ({"text","label"} per line)
    out: Path  # artifact root: a new `<out>/<version>/` is written and `<out>/current` points at it
    model: str = "auto"  # combined | embed | tfidf | auto (pick by validation macro-F1)
    threshold: float | None = None  # fixed abstain threshold; None: choose on the validation split
    max_misroute: float = 0.02  # threshold choice: largest accepted misroute rate on the validation split
    min_threshold: float = 0.5  # never choose a threshold below this
    val_fraction: float = 0.25  # stratified validation split
    C: float | None = None  # inverse regularization of the logistic regression; None: the kind's default
    max_tokens: int = DEFAULT_MAX_TOKENS  # embedding window: only the first N wordpieces of a prompt are embedded
    quant: str = "int8"  # encoder precision: int8 (dynamic quantization, ~3x faster on CPU) | none (float32)
    # encoder: "finetune" = fine-tune MiniLM (LoRA) on the training split first (classifier.finetune);
    # "base" = the stock sentence encoder
    encoder: str = "base"
    encoder_lora: Path | None = None  # reuse this fine-tuned encoder (an encoder_lora.safetensors) instead
    finetune_epochs: int = 4
    finetune_lr: float = 5e-4
    finetune_rank: int = 16
    finetune_layers: int | None = None  # keep the encoder's first N transformer layers (None: all 6)
    version: str = ""  # version name; empty: UTC timestamp
    seed: int = 0
    extra_metadata: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.model not in KINDS:
            raise InvalidArgument(f"--model must be one of {KINDS}, got {self.model!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise InvalidArgument(f"--threshold must be in [0, 1], got {self.threshold}")
        from classifier.embed import check_max_tokens

        check_max_tokens(self.max_tokens)
        from classifier.embed import check_quant

        check_quant(self.quant)
        if self.encoder not in ENCODERS:
            raise InvalidArgument(f"--encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder_lora is not None and not Path(self.encoder_lora).is_file():
            raise InvalidArgument(f"--encoder-lora {self.encoder_lora} is not a file (an encoder_lora.safetensors "
                                  "written by `classifier train --encoder finetune`)")
        self.finetune_config().validate()
        if not 0.05 <= self.val_fraction <= 0.5:
            raise InvalidArgument("val_fraction must be in [0.05, 0.5]")
        if self.version and (not self.version.replace("-", "").replace("_", "").replace(".", "").isalnum()
                             or self.version.startswith(".")):
            raise InvalidArgument(f"--version must be letters, digits, '-', '_' or '.', got {self.version!r}")


    def finetune_config(self):
        from classifier.finetune import FinetuneConfig

        return FinetuneConfig(epochs=self.finetune_epochs, lr=self.finetune_lr, rank=self.finetune_rank,
                              max_tokens=self.max_tokens, seed=self.seed, layers=self.finetune_layers)


@dataclass
class TrainResult:
    path: Path
    metadata: dict


def make_model(kind: str, C: float | None, seed: int = 0):
    if C is None:
        C = DEFAULT_C[kind]
    if kind == "combined":
        from classifier.combined import CombinedModel

        return CombinedModel(C=C, emb_weight=COMBINED_EMB_WEIGHT, seed=seed)
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    lr = LogisticRegression(C=C, max_iter=3000, class_weight="balanced", random_state=seed)
    if kind == "embed":
        return lr
    from sklearn.feature_extraction.text import TfidfVectorizer

    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, max_features=200_000), lr)


def _take(X, idx):
    if isinstance(X, np.ndarray):
        return X[idx]
    if isinstance(X, list):
        return [X[i] for i in idx]
    return X.take(idx)


def _cached_embeddings(out: Path, ex, embedder, max_tokens: int, quant: str = "none",
                       lora: Path | None = None) -> np.ndarray:
    """Embeddings of the training texts, reused when the data's sha256, window, precision and encoder match.

    Looked up first next to the data (`<data>.embeddings.npz`, shipped for the seed set so that
    `ensure_default` is fast), then under `<out>/.embeddings/`; computed and cached there otherwise.
    """
    from classifier.embed import MODEL_ID, encoder_id

    enc = encoder_id(lora)
    for cand in (shipped_cache_path(ex.path), out / ".embeddings" / f"{ex.sha256}-{max_tokens}-{quant}-{enc}.npz"):
        if cand.is_file():
            try:
                z = np.load(cand, allow_pickle=False)
                cached_window = int(z["max_tokens"]) if "max_tokens" in z.files else 256
                cached_quant = str(z["quant"]) if "quant" in z.files else "none"
                cached_enc = str(z["encoder"]) if "encoder" in z.files else "base"
                if (str(z["sha256"]) == ex.sha256 and str(z["model"]) == MODEL_ID and cached_window == max_tokens
                        and cached_quant == quant and cached_enc == enc and z["X"].shape == (len(ex.texts), 384)):
                    return z["X"].astype(np.float32)
            except (OSError, ValueError, KeyError):
                pass
    if embedder is None:
        from classifier.embed import shared

        embedder = shared(quant, lora)
    elif (getattr(embedder, "quant", "none"), getattr(embedder, "encoder_id", "base")) != (quant, enc):
        raise InvalidArgument(f"the embedder passed in runs {getattr(embedder, 'quant', 'none')!r} with encoder "
                              f"{getattr(embedder, 'encoder_id', 'base')!r}, the training config asks for "
                              f"{quant!r} with {enc!r}")
    X = embedder.encode(ex.texts, max_tokens=max_tokens)[0]
    save_embeddings(out / ".embeddings" / f"{ex.sha256}-{max_tokens}-{quant}-{enc}.npz", X, ex.sha256, max_tokens,
                    quant, enc)
    return X


def shipped_cache_path(data: Path) -> Path:
    return Path(str(data) + ".embeddings.npz")


def save_embeddings(path: Path, X: np.ndarray, sha256: str, max_tokens: int, quant: str = "none",
                    encoder: str = "base") -> None:
    from classifier.embed import MODEL_ID

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, X=X.astype(np.float16), sha256=np.array(sha256), model=np.array(MODEL_ID),
                        max_tokens=np.array(max_tokens), quant=np.array(quant), encoder=np.array(encoder))
    os.replace(tmp, path)


def train(cfg: TrainConfig, *, embedder=None, log=print) -> TrainResult:
    from sklearn.model_selection import train_test_split

    from classifier import artifact
    from classifier.dataset import load_jsonl
    from classifier.embed import MODEL_ID
    from classifier.metrics import choose_threshold, evaluate

    cfg.validate()
    t0 = time.monotonic()
    ex = load_jsonl(cfg.data, min_per_label=4)
    tasks = ex.tasks
    kinds = ["combined", "embed", "tfidf"] if cfg.model == "auto" else [cfg.model]
    uses_emb = any(k in EMBEDDING_KINDS for k in kinds)
    idx = np.arange(len(ex.texts))
    tr, va = train_test_split(idx, test_size=cfg.val_fraction, stratify=ex.labels, random_state=cfg.seed)
    lora, encoder_meta = (_encoder(cfg, ex, tr, log) if uses_emb else (None, None))
    emb = _cached_embeddings(Path(cfg.out), ex, embedder, cfg.max_tokens, cfg.quant, lora) if uses_emb else None
    from classifier.combined import TextsAndEmbeddings

    feats = {k: {"embed": emb, "tfidf": list(ex.texts)}.get(k) if k != "combined"
             else TextsAndEmbeddings(list(ex.texts), emb) for k in kinds}
    log(f"read {len(ex.texts)} examples, {len(tasks)} tasks from {ex.path}; features in {time.monotonic() - t0:.1f} s")

    y = np.array(ex.labels)
    val = {}
    for k in kinds:
        X = feats[k]
        Xtr, Xva = _take(X, tr), _take(X, va)
        m = make_model(k, _C(cfg, k, lora), cfg.seed).fit(Xtr, y[tr])
        proba = m.predict_proba(Xva)
        classes = list(m.classes_)
        pred = [classes[i] for i in proba.argmax(1)]
        conf = proba.max(1)
        val[k] = {"pred": pred, "conf": conf, "metrics": evaluate(list(y[va]), pred, conf, tasks, 0.0)}
        log(f"  {k:<6} validation accuracy {val[k]['metrics']['accuracy']:.3f}  macro-F1 {val[k]['metrics']['macro_f1']:.3f}")
    kind = max(kinds, key=lambda k: (val[k]["metrics"]["macro_f1"], k == "combined"))
    if cfg.threshold is not None:
        threshold, how = float(cfg.threshold), "fixed by --threshold"
    else:
        threshold = choose_threshold(list(y[va]), val[kind]["pred"], val[kind]["conf"],
                                     max_misroute=cfg.max_misroute, floor=cfg.min_threshold)
        how = f"smallest >= {cfg.min_threshold} with validation misroute rate <= {cfg.max_misroute}"
    final = make_model(kind, _C(cfg, kind, lora), cfg.seed).fit(feats[kind], y)
    validation = {}
    for k in kinds:
        validation[k] = evaluate(list(y[va]), val[k]["pred"], val[k]["conf"], tasks, threshold)
    version = cfg.version or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    mini = "fine-tuned MiniLM" if lora is not None else "MiniLM"
    meta = {
        "tasks": tasks,
        "threshold": threshold,
        "threshold_rule": how,
        "kind": kind,
        "embedding_model": MODEL_ID if kind in EMBEDDING_KINDS else None,
        # embedding window: prompts are truncated to their first max_tokens wordpieces before embedding
        "max_tokens": cfg.max_tokens if kind in EMBEDDING_KINDS else None,
        "embedding_quant": cfg.quant if kind in EMBEDDING_KINDS else None,
        # the sentence encoder: stock MiniLM, or fine-tuned (LoRA factors in the version folder, merged at load)
        "encoder": encoder_meta if kind in EMBEDDING_KINDS else None,
        "classifier": f"LogisticRegression(C={_C(cfg, kind, lora)}, class_weight=balanced)" + {
            "embed": f" on {mini} embeddings",
            "tfidf": " on TF-IDF 1-2 grams",
            "combined": f" on TF-IDF word 1-2 + char_wb 2-5 grams hstacked with {COMBINED_EMB_WEIGHT} x {mini} embeddings",
        }[kind],
        "data": {"path": str(ex.path), "sha256": ex.sha256, "examples": len(ex.texts),
                 "per_task": {t: ex.labels.count(t) for t in tasks}},
        "metrics": {"validation": validation, "selected_by": "validation macro-F1" if len(kinds) > 1 else "--model"},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train_seconds": round(time.monotonic() - t0, 2),
        **cfg.extra_metadata,
    }
    extra = {LORA_FILE: lora} if lora is not None and kind in EMBEDDING_KINDS else {}
    path = artifact.write_version(Path(cfg.out), version, final, meta, extra_files=extra)
    log(f"kept {kind}; threshold {threshold:.2f}; wrote {path} in {time.monotonic() - t0:.1f} s")
    return TrainResult(path, artifact._read_metadata(path))


def _C(cfg: TrainConfig, kind: str, lora) -> float:
    if cfg.C is not None:
        return cfg.C
    return FINETUNED_C.get(kind, DEFAULT_C[kind]) if lora is not None else DEFAULT_C[kind]


def _encoder(cfg: TrainConfig, ex, tr, log) -> tuple[Path | None, dict]:
    """The encoder the embeddings come from: (LoRA file or None, its metadata).

    `--encoder finetune` fine-tunes on the training split only (never on the validation rows the threshold is
    chosen on), cached under `<out>/.encoders/` by data, split and recipe, so retraining is cheap.
    """
    import hashlib
    import json as _json

    from classifier.dataset import sha256_file
    from classifier.embed import MODEL_ID
    from classifier.finetune import finetune, read_summary

    split = {"data_sha256": ex.sha256, "val_fraction": cfg.val_fraction, "split_seed": cfg.seed}
    if cfg.encoder_lora is not None:
        lora = Path(cfg.encoder_lora)
        recipe = read_summary(lora)
        seen = recipe.get("trained_on") or {}
        # True: the encoder was fine-tuned on this data's training split, so the validation rows (threshold)
        # are unseen by it; False: another split of this data (it may have seen them); None: unknown
        unseen = (seen == split) if seen.get("data_sha256") == ex.sha256 else None
        if unseen is False:
            log("warning: the reused encoder was fine-tuned on another split of this data; the validation rows may "
                "not be held out from it and the threshold may be optimistic")
        return lora, {"base": MODEL_ID, "finetuned": True, "file": LORA_FILE, "sha256": sha256_file(lora),
                      "source": str(lora), "recipe": recipe, "validation_unseen_by_encoder": unseen}
    if cfg.encoder == "base":
        return None, {"base": MODEL_ID, "finetuned": False}
    fcfg = cfg.finetune_config()
    key = hashlib.sha256(_json.dumps([ex.sha256, cfg.val_fraction, cfg.seed, fcfg.__dict__], sort_keys=True)
                         .encode()).hexdigest()[:16]
    lora = Path(cfg.out) / ".encoders" / f"{key}.safetensors"
    if lora.is_file():
        log(f"reusing the fine-tuned encoder {lora}")
    else:
        log(f"fine-tuning the encoder on {len(tr)} training examples ({fcfg.epochs} epochs, LoRA rank {fcfg.rank})")
        finetune([ex.texts[i] for i in tr], [ex.labels[i] for i in tr], lora, fcfg, trained_on=split, log=log)
    return lora, {"base": MODEL_ID, "finetuned": True, "file": LORA_FILE, "sha256": sha256_file(lora),
                  "recipe": read_summary(lora), "validation_unseen_by_encoder": True}


def predict_file(clf, data: Path):
    """Predictions for every example of a labeled JSONL: (examples, predicted tasks, confidences)."""
    from classifier.dataset import load_jsonl

    ex = load_jsonl(data)
    preds = clf.predict_detailed(ex.texts)
    return ex, [p.task for p in preds], np.array([p.confidence for p in preds])
