"""Labeled examples: JSONL with one `{"text": str, "label": str}` object per line."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidArgument
from core.files import sha256_file


@dataclass(frozen=True)
class Examples:
    texts: list[str]
    labels: list[str]
    path: Path
    sha256: str  # of the file's bytes: the data fingerprint recorded in the artifact

    @property
    def tasks(self) -> list[str]:
        return sorted(set(self.labels))




def load_jsonl(path: str | Path, *, min_per_label: int = 1) -> Examples:
    """Read and validate a labeled JSONL file; every error names the file and line."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"labeled data {p} does not exist: pass a JSONL file with one "
                              '{"text": ..., "label": ...} object per line')
    texts, labels = [], []
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{p}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not isinstance(obj.get("label"), str):
                raise InvalidArgument(f'{p}:{n}: each line must be an object with string "text" and "label"')
            text, label = obj["text"], obj["label"].strip()
            if not text.strip() or not label:
                raise InvalidArgument(f"{p}:{n}: empty text or label")
            texts.append(text)
            labels.append(label)
    if not texts:
        raise InvalidArgument(f"{p}: no examples")
    counts = {lab: labels.count(lab) for lab in set(labels)}
    if len(counts) < 2:
        raise InvalidArgument(f"{p}: need at least 2 distinct labels, found {sorted(counts)}")
    small = sorted(lab for lab, c in counts.items() if c < min_per_label)
    if small:
        raise InvalidArgument(f"{p}: labels {small} have fewer than {min_per_label} examples; add more or drop them")
    return Examples(texts, labels, p, sha256_file(p))


DATA_DIR = Path(__file__).parent / "data"


def seed_path() -> Path:
    """The labeled seed set for the default task set (shipped in the package)."""
    return DATA_DIR / "seed.jsonl"


def heldout_path() -> Path:
    """Held-out real ShareGPT first turns, labeled by hand; accuracy is reported on these."""
    return DATA_DIR / "heldout_real.jsonl"


def heldout_paths() -> list[Path]:
    """Every held-out real set: `heldout_real.jsonl` (357 prompts, the first one) and `heldout_real2.jsonl`
    (a larger uniform random sample labeled by other annotators), both from conversations the seed never saw."""
    return [heldout_path(), DATA_DIR / "heldout_real2.jsonl"]


def shipped_encoder_path() -> Path:
    """The MiniLM encoder fine-tuned (LoRA) on the seed set's training split (`classifier.finetune`)."""
    return DATA_DIR / "seed.encoder_lora.safetensors"
