"""Task classifier: turns a prompt into `(task, confidence)` for routing.

Default task set (the labels of `classifier/data/seed.jsonl`):

- `code`: programs, SQL, shell, config, APIs: write, fix, explain, review, port or test code; errors and
  tracebacks; how to use a programming tool or library.
- `math`: problems, calculations, proofs, statistics.
- `writing`: producing or polishing prose for someone: stories, poems, emails, letters, marketing and
  product copy, essays, blog posts (a blog post *about* code is writing), proofreading and rewriting.
- `translation`: translating between human languages (also translating code comments or UI strings;
  porting code between programming languages is `code`).
- `summarization`: condensing given text (or a named work) into a shorter form: summaries, TL;DRs, key points.
- `extraction`: pulling structured fields out of given text, or labeling given text (entities, JSON fields,
  sentiment, categories, intents).
- `general`: everything else, and anything ambiguous: questions, advice, chit-chat, role-play set-up,
  "I will send you parts, reply acknowledged" turns.

`general` and abstentions (confidence below the artifact's threshold) go to the base model.

Public API (the contract the gateway uses):

    clf = classifier.load()                 # default dir's current version (or a path)
    clf.predict(["fix this SQL ..."])       # -> [("code", 0.97)]
    clf.predict_detailed(texts)             # -> [Prediction(task, confidence, abstained, scores, truncated)]
    classifier.ensure_default()             # builds the default artifact from the seed set if absent
    clf.warm_up()                           # loads its encoder now; returns the encoders it uses
    classifier.retain_encoders(*encoders)   # releases shared encoders no longer used (after a hot swap)

Operators can train their own task set from labeled JSONL (`{"text": ..., "label": ...}` per line) with
`specialist-router classifier train --data my.jsonl`; see docs/classifier.md.
"""
from __future__ import annotations

import json
from pathlib import Path

from classifier import artifact
from classifier.artifact import Classifier, Prediction, load
from classifier.dataset import heldout_path, heldout_paths, seed_path, shipped_encoder_path
from classifier.embed import retain as retain_encoders
from classifier.train import ClassifierTrainConfig, train
from core.errors import FailedPrecondition
from core.files import sha256_file
from core.paths import classifier_dir

DEFAULT_TASKS = ["code", "math", "writing", "translation", "summarization", "extraction", "general"]
GENERAL = "general"

__all__ = ["Classifier", "Prediction", "load", "ensure_default", "retain_encoders", "DEFAULT_TASKS", "GENERAL", "seed_path",
           "heldout_path", "heldout_paths", "shipped_encoder_path"]


def ensure_default(log=print) -> Path:
    """Build the default artifact (`embed`: logistic regression on the embeddings of the first 96 wordpieces
    by MiniLM fine-tuned on the seed set, the shipped `seed.encoder_lora.safetensors`) if absent.

    Idempotent: returns the current version's folder when it exists, verifies and matches this release's seed
    and recipe; otherwise trains (a few seconds: the seed embeddings are shipped in `seed.jsonl.embeddings.npz`
    and recomputed only when they do not match the seed file and encoder) and points `current` at it. `log`
    receives the build's progress lines (nothing is logged when the artifact exists).
    """

    root = classifier_dir()
    try:
        found = artifact.resolve(root)
        if not _stale_default(found):
            return found
    except FailedPrecondition:
        pass
    with artifact.build_lock(root):
        try:  # another process may have built it while we waited
            found = artifact.resolve(root)
            if not _stale_default(found):
                return found
        except FailedPrecondition:
            pass
        log(f"building the default classifier in {root} from the shipped seed set (first use, ~15 s)")
        return train(ClassifierTrainConfig(data=seed_path(), out=root, model=DEFAULT_KIND, quant=DEFAULT_QUANT,
                                 encoder_lora=shipped_encoder_path()), log=log).path


DEFAULT_KIND = "embed"  # with the fine-tuned encoder, TF-IDF adds no accuracy (docs/bench-classifier.md)
DEFAULT_QUANT = "int8"


def _stale_default(version_dir: Path) -> bool:
    """True when the artifact was built from the shipped seed set but not from this release's seed file or
    recipe (a package upgrade): the default is then rebuilt. Artifacts trained on operators' data are kept."""

    try:
        meta = json.loads((Path(version_dir) / "metadata.json").read_text())
        data = meta.get("data") or {}
        if Path(str(data.get("path", ""))).name != seed_path().name:
            return False
        encoder = meta.get("encoder") or {}
        return (meta.get("format_version") != artifact.FORMAT_VERSION or data.get("sha256") != sha256_file(seed_path())
                or meta.get("kind") != DEFAULT_KIND or (meta.get("embedding_quant") or "none") != DEFAULT_QUANT
                or encoder.get("sha256") != sha256_file(shipped_encoder_path()))
    except (OSError, ValueError):
        return False
