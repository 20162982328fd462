"""The classifier's fitted model as data, not code: numbers in safetensors, the rest in JSON.

An artifact used to hold a pickle (`model.joblib`), and unpickling runs whatever the file says: an admin who
could point `ReloadClassifier` at a folder could run code on the gateway host. This format cannot: loading
reads arrays (safetensors) and plain JSON (vocabularies, hyper-parameters) and rebuilds the scikit-learn
objects from them. Supported models are exactly what `classifier.train` fits:

- `embed`: `LogisticRegression` (coef_, intercept_, classes_);
- `tfidf`: `Pipeline(TfidfVectorizer, LogisticRegression)`;
- `combined`: `CombinedModel` (word and char `TfidfVectorizer`s + `LogisticRegression`).

Files: `model.safetensors` (arrays, float64) and `model.json` (kind, classes, vocabularies, parameters).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from classifier.combined import CombinedModel
from core.errors import FailedPrecondition

ARRAYS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
FILES = (ARRAYS_FILE, SPEC_FILE)
# the TfidfVectorizer parameters train.py sets or relies on; everything else keeps scikit-learn's default
_TFIDF_PARAMS = ("analyzer", "ngram_range", "sublinear_tf", "lowercase", "norm", "use_idf", "smooth_idf",
                 "max_features", "min_df", "max_df", "token_pattern", "strip_accents", "binary")


def _tfidf_spec(v, prefix: str, arrays: dict) -> dict:
    arrays[f"{prefix}.idf"] = np.ascontiguousarray(v.idf_, dtype=np.float64)
    params = {k: getattr(v, k) for k in _TFIDF_PARAMS}
    params["ngram_range"] = list(params["ngram_range"])
    return {"params": params, "vocabulary": {t: int(i) for t, i in v.vocabulary_.items()}}


def _tfidf_from(spec: dict, prefix: str, arrays: dict):
    # lazy: scikit-learn costs ~1.5 s to import; only loading a TF-IDF model needs it here
    from sklearn.feature_extraction.text import TfidfVectorizer

    params = dict(spec["params"])
    params["ngram_range"] = tuple(params["ngram_range"])
    v = TfidfVectorizer(**params)
    v.vocabulary_ = {str(t): int(i) for t, i in spec["vocabulary"].items()}
    v.fixed_vocabulary_ = False
    v.idf_ = arrays[f"{prefix}.idf"]
    return v


def _lr_spec(lr, prefix: str, arrays: dict) -> dict:
    arrays[f"{prefix}.coef"] = np.ascontiguousarray(lr.coef_, dtype=np.float64)  # safetensors writes C order
    arrays[f"{prefix}.intercept"] = np.ascontiguousarray(lr.intercept_, dtype=np.float64)
    return {"classes": [str(c) for c in lr.classes_], "C": float(lr.C)}


def _lr_from(spec: dict, prefix: str, arrays: dict):
    # lazy: scikit-learn costs ~1.5 s to import; only loading a model needs it here
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=spec["C"])
    lr.coef_ = arrays[f"{prefix}.coef"]
    lr.intercept_ = arrays[f"{prefix}.intercept"]
    lr.classes_ = np.asarray(spec["classes"])
    lr.n_features_in_ = lr.coef_.shape[1]
    lr.n_iter_ = np.zeros(1, dtype=np.int32)
    return lr


def save(model, kind: str, folder: Path) -> list[str]:
    """Write `model` (of `kind`) into `folder`; returns the file names written."""
    arrays: dict[str, np.ndarray] = {}
    if kind == "embed":
        spec = {"lr": _lr_spec(model, "lr", arrays)}
    elif kind == "tfidf":
        tfidf, lr = model.steps[0][1], model.steps[-1][1]
        spec = {"tfidf": _tfidf_spec(tfidf, "tfidf", arrays), "lr": _lr_spec(lr, "lr", arrays)}
    elif kind == "combined":
        spec = {"word": _tfidf_spec(model.word_, "word", arrays), "char": _tfidf_spec(model.char_, "char", arrays),
                "lr": _lr_spec(model.lr_, "lr", arrays), "emb_weight": float(model.emb_weight),
                "seed": int(model.seed)}
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    save_file(arrays, str(Path(folder) / ARRAYS_FILE))
    (Path(folder) / SPEC_FILE).write_text(json.dumps({"kind": kind, **spec}, ensure_ascii=False), encoding="utf-8")
    return list(FILES)


def load(folder: Path, kind: str, fix: str):
    """Rebuild the model of `kind` from `folder`. Reads only arrays and JSON: nothing in the files can run."""
    folder = Path(folder)
    try:
        arrays = load_file(str(folder / ARRAYS_FILE))
        spec = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
        if spec.get("kind") != kind:
            raise ValueError(f"{SPEC_FILE} holds a {spec.get('kind')!r} model, the metadata says {kind!r}")
        lr = _lr_from(spec["lr"], "lr", arrays)
        if kind == "embed":
            return lr
        if kind == "tfidf":
            # lazy: scikit-learn costs ~1.5 s to import; only loading a TF-IDF model needs it here
            from sklearn.pipeline import make_pipeline

            return make_pipeline(_tfidf_from(spec["tfidf"], "tfidf", arrays), lr)
        if kind == "combined":
            m = CombinedModel(C=lr.C, emb_weight=float(spec["emb_weight"]), seed=int(spec.get("seed", 0)))
            m.word_, m.char_ = _tfidf_from(spec["word"], "word", arrays), _tfidf_from(spec["char"], "char", arrays)
            m.lr_, m.classes_ = lr, lr.classes_
            return m
        raise ValueError(f"unknown model kind {kind!r}")
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise FailedPrecondition(f"classifier model in {folder} cannot be read ({exc}): {fix}") from None
