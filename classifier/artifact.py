"""The classifier artifact: `<dir>/<version>/{model.safetensors,model.json,metadata.json}` plus `<dir>/current`.

The model is stored as data (`classifier.modelio`: arrays and JSON), never as a pickle, so loading an artifact
cannot run code. Format 1 artifacts (a `model.joblib` pickle) are refused, not unpickled.

`metadata.json` records the format version, tasks, threshold, model kind, embedding model id, metrics,
the sha256 of the training JSONL (data fingerprint), created_at and the sha256 of every other file in the
version folder; `load` verifies them before unpickling anything. `current` names the active version and is
replaced atomically and durably (`core.files.atomic_write_text`).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from classifier import modelio
from classifier.combined import TextsAndEmbeddings
from classifier.embed import shared
from core.errors import FailedPrecondition, InvalidArgument
from core.files import atomic_write_text, file_lock, publish_dir, sha256_file
from core.paths import classifier_dir

FORMAT_VERSION = 2  # 1: a pickled model.joblib (no longer read)
METADATA_FILE = "metadata.json"
CURRENT_FILE = "current"
FIX = "build it with `specialist-router classifier train` (or delete the folder to rebuild the default)"


@dataclass(frozen=True)
class Prediction:
    task: str  # the most likely task (even when abstained)
    confidence: float  # its calibrated probability
    abstained: bool  # confidence < threshold: route to the base model
    scores: dict[str, float] = field(default_factory=dict)  # probability of every task
    truncated: bool = False  # the text exceeded the embedder's limit and only its start was used


def resolve(root: str | Path) -> Path:
    """The version folder that `<root>/current` names (or root itself if it is a version folder)."""
    root = Path(root)
    if (root / METADATA_FILE).is_file():
        return root
    cur = root / CURRENT_FILE
    if not cur.is_file():
        raise FailedPrecondition(f"no classifier artifact at {root} (missing {cur}): {FIX}")
    name = cur.read_text(encoding="utf-8").strip()
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise FailedPrecondition(f"{cur} is corrupt (names {name!r}): {FIX}")
    path = root / name
    if not (path / METADATA_FILE).is_file():
        raise FailedPrecondition(f"{cur} names version {name!r} but {path / METADATA_FILE} is missing: {FIX}")
    return path


def set_current(root: Path, version: str) -> None:
    atomic_write_text(root / CURRENT_FILE, version + "\n")


def build_lock(root: Path):
    """Inter-process lock while building the default artifact (flock on `<root>/.lock`)."""
    return file_lock(Path(root) / ".lock")


def write_version(root: Path, version: str, model: object, metadata: dict,
                  extra_files: dict[str, Path] | None = None) -> Path:
    """Write `<root>/<version>/` completely in a temp folder, rename it into place, then point `current` at it.

    `extra_files` ({name in the folder: source path}) are copied in and fingerprinted like the model.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / version
    if final.exists():
        raise FailedPrecondition(f"classifier version {final} already exists; choose another --version")
    tmp = root / f".{version}.{os.getpid()}.tmp"
    tmp.mkdir()
    written = modelio.save(model, metadata["kind"], tmp)
    meta = dict(metadata)
    meta["format_version"] = FORMAT_VERSION
    meta["version"] = version
    meta["files"] = {name: sha256_file(tmp / name) for name in written}
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
        meta["files"][name] = sha256_file(tmp / name)
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    publish_dir(tmp, final)
    set_current(root, version)
    return final


def _read_metadata(path: Path) -> dict:
    mpath = path / METADATA_FILE
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FailedPrecondition(f"classifier metadata {mpath} is missing: {FIX}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FailedPrecondition(f"classifier metadata {mpath} is corrupt ({exc}): {FIX}") from None
    required = ("format_version", "tasks", "threshold", "kind", "files", "version")
    if not isinstance(meta, dict) or any(k not in meta for k in required):
        raise FailedPrecondition(f"classifier metadata {mpath} lacks one of {list(required)}: {FIX}")
    if meta["format_version"] != FORMAT_VERSION:
        old = " (a pickle, which is never loaded: it could run code)" if meta["format_version"] == 1 else ""
        raise FailedPrecondition(f"{mpath} has format version {meta['format_version']}{old}, this code reads "
                                 f"{FORMAT_VERSION}: {FIX}")
    return meta


def load(path: str | Path | None = None) -> "Classifier":
    """Load an artifact: None = the default dir's current version; a dir with `current`; or a version dir."""
    if path is None:
        path = classifier_dir()
    vpath = resolve(path)
    meta = _read_metadata(vpath)
    for name, digest in meta["files"].items():
        f = vpath / name
        if not f.is_file():
            raise FailedPrecondition(f"classifier file {f} is missing: {FIX}")
        if sha256_file(f) != digest:
            raise FailedPrecondition(f"classifier file {f} does not match its sha256 in {vpath / METADATA_FILE} "
                                     f"(corrupt or edited): {FIX}")
    enc = meta.get("encoder") or {}
    if enc.get("finetuned") and enc.get("file") not in meta["files"]:
        raise FailedPrecondition(f"{vpath / METADATA_FILE} names a fine-tuned encoder {enc.get('file')!r} that is not "
                                 f"among its files: {FIX}")
    missing = [f for f in modelio.FILES if f not in meta["files"]]
    if missing:
        raise FailedPrecondition(f"{vpath / METADATA_FILE} does not list the model files {missing}: {FIX}")
    model = modelio.load(vpath, meta["kind"], FIX)
    return Classifier(model=model, metadata=meta, path=vpath)


class Classifier:
    """A loaded artifact. `predict*` are thread-safe (the embedder serializes its forward pass)."""

    def __init__(self, *, model, metadata: dict, path: Path | None = None, embedder=None):
        self.model = model
        self.metadata = metadata
        self.path = path
        self.tasks: list[str] = list(metadata["tasks"])
        self.threshold: float = float(metadata["threshold"])
        self.version: str = str(metadata.get("version", ""))
        self.kind: str = metadata["kind"]  # "combined" | "embed" | "tfidf"
        # embedding window the model was trained with (artifacts older than the field used 256)
        self.max_tokens: int = int(metadata.get("max_tokens") or 256)
        # encoder precision the model was trained with (artifacts older than the field: float32)
        self.quant: str = str(metadata.get("embedding_quant") or "none")
        # a fine-tuned encoder's LoRA factors, in the version folder (None: the stock encoder)
        enc = metadata.get("encoder") or {}
        self.lora: Path | None = (Path(path) / enc["file"]) if enc.get("finetuned") and path is not None else None
        self._embedder = embedder
        self._embedder_lock = threading.Lock()
        classes = list(getattr(model, "classes_", []))
        if sorted(classes) != sorted(self.tasks):
            raise FailedPrecondition(f"classifier model classes {classes} differ from metadata tasks {self.tasks}: {FIX}")
        self._col = [classes.index(t) for t in self.tasks]

    @property
    def embedder(self):
        if self._embedder is None:
            with self._embedder_lock:
                if self._embedder is None:
                    self._embedder = shared(self.quant, self.lora)
        return self._embedder

    def features(self, texts: list[str]) -> tuple[object, list[bool]]:
        if self.kind == "embed":
            return self.embedder.encode(texts, max_tokens=self.max_tokens)
        if self.kind == "combined":
            emb, truncated = self.embedder.encode(texts, max_tokens=self.max_tokens)
            return TextsAndEmbeddings(list(texts), emb), truncated
        return list(texts), [False] * len(texts)

    def probabilities(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """[n, len(tasks)] probabilities in `self.tasks` order, and truncated flags."""
        _check_texts(texts)
        if not texts:
            return np.zeros((0, len(self.tasks))), []
        x, truncated = self.features(texts)
        proba = np.asarray(self.model.predict_proba(x))[:, self._col]
        return proba, truncated

    def predict_detailed(self, texts: list[str]) -> list[Prediction]:
        proba, truncated = self.probabilities(texts)
        out = []
        for row, trunc in zip(proba, truncated):
            k = int(np.argmax(row))
            conf = float(row[k])
            out.append(Prediction(task=self.tasks[k], confidence=conf, abstained=conf < self.threshold,
                                  scores={t: float(p) for t, p in zip(self.tasks, row)}, truncated=bool(trunc)))
        return out

    def warm_up(self) -> list:
        """Load and run the encoder once, so no user request pays for it; returns the embedders this classifier
        uses (none for `tfidf`)."""
        self.predict(["warm up the embedder"])
        return [self._embedder] if self._embedder is not None else []

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        """(most likely task, confidence) per text; compare confidence with `threshold` to abstain."""
        return [(p.task, p.confidence) for p in self.predict_detailed(texts)]

    def __repr__(self) -> str:
        return f"Classifier(version={self.version!r}, kind={self.kind!r}, tasks={self.tasks}, threshold={self.threshold:.2f})"


def _check_texts(texts) -> None:
    if isinstance(texts, str):
        raise InvalidArgument("predict takes a list of texts, not a single string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidArgument(f"text #{i} is {type(t).__name__}, expected a string")
        if not t.strip():
            raise InvalidArgument(f"text #{i} is empty or only whitespace: send the prompt to classify")
