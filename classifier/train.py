"""Train a classifier artifact from labeled JSONL: TF-IDF + embeddings (`combined`), embeddings or TF-IDF,
each followed by a logistic regression.

Steps: read + validate the data; hold out a stratified validation split; fit each candidate model kind on
the rest and score it on the split (`auto` keeps the better macro-F1); choose the abstain threshold on the
split's predictions (smallest threshold whose misroute rate is <= `max_misroute`); refit the chosen kind on
all the data; write a new version folder and point `current` at it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from classifier import artifact
from classifier.combined import CombinedModel, TextsAndEmbeddings
from classifier.dataset import load_jsonl, seed_path, shipped_encoder_path
from classifier.embed import DEFAULT_MAX_TOKENS, MODEL_ID, check_max_tokens, check_quant, encoder_id, shared
from classifier.encoder_lora import LORA_FILE, read_summary
from classifier.finetune import FinetuneConfig, finetune
from classifier.metrics import choose_threshold, evaluate
from core.config import setting as _s
from core.errors import InvalidArgument
from core.files import atomic_path, sha256_file
from core.paths import classifier_dir

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
class ClassifierTrainConfig:
    """One `classifier train` run (CLI flags, YAML keys and `SPECIALIST_ROUTER_CLASSIFIER__*` come from here)."""

    data: Path | None = _s(None, "Labeled JSONL ({'text','label'} per line); empty: the shipped seed set.")
    out: Path | None = _s(None, "Artifact root: a new <out>/<version>/ is written and <out>/current points at it; "
                                "empty: <data dir>/classifier.")
    model: str = _s("", "embed: logistic regression on the MiniLM embeddings; combined: TF-IDF word+char n-grams "
                        "stacked with the embeddings; tfidf: TF-IDF only; auto: the best on the validation split; "
                        "empty: embed with a fine-tuned encoder, combined with the stock one.",
                    choices=("",) + KINDS, flag="--kind")
    threshold: float | None = _s(None, "Fixed abstain threshold in [0, 1]; empty: chosen on the validation split.")
    max_misroute: float = _s(0.02, "Threshold choice: the largest accepted misroute rate on the validation split.")
    min_threshold: float = _s(0.5, "Never choose a threshold below this.")
    val_fraction: float = _s(0.25, "Stratified validation split.")
    C: float | None = _s(None, "Inverse regularization of the logistic regression; empty: the kind's default.",
                         flag="--C")
    max_tokens: int = _s(DEFAULT_MAX_TOKENS, "Embedding window: only the first N wordpieces of a prompt are embedded "
                                             "(8..256).")
    quant: str = _s("int8", "Encoder precision: int8 (dynamic quantization, ~3x faster on CPU) or none (float32).",
                    choices=("int8", "none"))
    encoder: str = _s("auto", "finetune: fine-tune MiniLM (LoRA) on the training split first (best accuracy; ~2 min "
                              "per 1,000 examples on 2 CPU cores); base: the stock encoder (fast); auto: the shipped "
                              "fine-tuned encoder on the seed set, finetune on other data.",
                      choices=("auto",) + ENCODERS)
    encoder_lora: Path | None = _s(None, "Reuse this fine-tuned encoder (an encoder_lora.safetensors from an "
                                         "artifact) instead of fine-tuning.")
    finetune_epochs: int = _s(4, "Encoder fine-tuning epochs.")
    finetune_lr: float = _s(5e-4, "Encoder fine-tuning learning rate.")
    finetune_rank: int = _s(16, "Encoder LoRA rank.")
    finetune_layers: int | None = _s(None, "Keep only the encoder's first N transformer layers (1..6; empty: all 6): "
                                           "less compute per prompt, usually some accuracy lost.")
    version: str = _s("", "Version folder name; empty: UTC timestamp.", flag="--artifact-version")
    seed: int = _s(0, "Seed for the split and the fits.")
    extra_metadata: dict = _s({}, "Extra fields recorded in the artifact's metadata.json.", flag=False)

    def resolved(self) -> "ClassifierTrainConfig":
        """A copy with the contextual defaults filled in (data, out, encoder, model)."""
        data = Path(self.data) if self.data else seed_path()
        lora, encoder = self.encoder_lora, self.encoder
        if lora is not None and encoder == "base":
            raise InvalidArgument("--encoder base and --encoder-lora contradict each other: pass one of them")
        if encoder == "auto":
            if lora is None and data.resolve() == seed_path().resolve():
                lora = shipped_encoder_path()  # the seed set's fine-tuned encoder ships with the package
            encoder = "finetune"
        model = self.model or ("combined" if encoder == "base" and lora is None else "embed")
        return dataclasses.replace(self, data=data, out=Path(self.out) if self.out else classifier_dir(),
                                   encoder_lora=lora, encoder=encoder, model=model)

    def validate(self) -> None:
        if self.model and self.model not in KINDS:
            raise InvalidArgument(f"--kind must be one of {KINDS}, got {self.model!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise InvalidArgument(f"--threshold must be in [0, 1], got {self.threshold}")

        check_max_tokens(self.max_tokens)

        check_quant(self.quant)
        if self.encoder not in ("auto",) + ENCODERS:
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
        return CombinedModel(C=C, emb_weight=COMBINED_EMB_WEIGHT, seed=seed)
    # lazy: scikit-learn costs ~1.5 s to import; only fitting and scoring need it
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    lr = LogisticRegression(C=C, max_iter=3000, class_weight="balanced", random_state=seed)
    if kind == "embed":
        return lr
    # lazy: scikit-learn costs ~1.5 s to import; only fitting and scoring need it
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
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, X=X.astype(np.float16), sha256=np.array(sha256), model=np.array(MODEL_ID),
                            max_tokens=np.array(max_tokens), quant=np.array(quant), encoder=np.array(encoder))


def train(cfg: ClassifierTrainConfig, *, embedder=None, log=print) -> TrainResult:
    # lazy: scikit-learn costs ~1.5 s to import; only fitting and scoring need it
    from sklearn.model_selection import train_test_split

    cfg = cfg.resolved()
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
        "metrics": {"validation": validation, "selected_by": "validation macro-F1" if len(kinds) > 1 else "--kind"},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train_seconds": round(time.monotonic() - t0, 2),
        **cfg.extra_metadata,
    }
    extra = {LORA_FILE: lora} if lora is not None and kind in EMBEDDING_KINDS else {}
    path = artifact.write_version(Path(cfg.out), version, final, meta, extra_files=extra)
    log(f"kept {kind}; threshold {threshold:.2f}; wrote {path} in {time.monotonic() - t0:.1f} s")
    return TrainResult(path, artifact._read_metadata(path))


def _C(cfg: ClassifierTrainConfig, kind: str, lora) -> float:
    if cfg.C is not None:
        return cfg.C
    return FINETUNED_C.get(kind, DEFAULT_C[kind]) if lora is not None else DEFAULT_C[kind]


def _encoder(cfg: ClassifierTrainConfig, ex, tr, log) -> tuple[Path | None, dict]:
    """The encoder the embeddings come from: (LoRA file or None, its metadata).

    `--encoder finetune` fine-tunes on the training split only (never on the validation rows the threshold is
    chosen on), cached under `<out>/.encoders/` by data, split and recipe, so retraining is cheap.
    """

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
    key = hashlib.sha256(json.dumps([ex.sha256, cfg.val_fraction, cfg.seed, fcfg.__dict__], sort_keys=True)
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

    ex = load_jsonl(data)
    preds = clf.predict_detailed(ex.texts)
    return ex, [p.task for p in preds], np.array([p.confidence for p in preds])
