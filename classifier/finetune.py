"""Fine-tune the MiniLM encoder for the task set: a low-rank (LoRA) update of its Linear layers.

The frozen all-MiniLM-L6-v2 was trained for sentence similarity, not for "what is this prompt asking for";
on real prompts a linear model over its embeddings confuses e.g. "Summarise the following text: <pasted
legal text>" with the pasted text's topic. A short supervised fine-tune teaches the encoder to look at the
instruction (docs/bench-classifier.md: held-out real prompts 0.77 -> 0.85 accuracy).

The recipe: rank-`rank` LoRA on every Linear of the 6 transformer layers (query, key, value, attention output,
intermediate, output), mean pooling + L2 norm (the sentence-transformers head, unchanged), a linear softmax
head on top with class-balanced cross-entropy; AdamW, linear warm-up/decay, length-bucketed batches. Only
the LoRA factors are kept (~0.7 M parameters, ~1.3 MB in float16); `classifier.embed.Embedder` merges them
into the encoder's weights at load time, so a fine-tuned encoder costs nothing extra per prompt. The softmax
head is discarded: the artifact's logistic regression is fitted on the fine-tuned embeddings afterwards.

File format (`encoder_lora.safetensors`): for every adapted Linear `<module>` of the BERT model, tensors
`<module>.lora_A` [rank, in] and `<module>.lora_B` [out, rank], float16; metadata `scale` (alpha / rank),
`rank`, `base` (the encoder's model id).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classifier.embed import (
    _CHARS_PER_TOKEN,
    DEFAULT_MAX_TOKENS,
    MODEL_ID,
    check_max_tokens,
    model_path,
    sentence_embeddings,
)
from classifier.encoder_lora import keep_layers
from core import envs
from core.errors import FailedPrecondition, InvalidArgument
from core.files import atomic_path

TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")


@dataclass
class FinetuneConfig:
    epochs: int = 4
    lr: float = 5e-4  # LoRA factors; the softmax head uses 2e-3
    rank: int = 16
    batch_size: int = 16
    max_tokens: int = DEFAULT_MAX_TOKENS  # the artifact's embedding window: train on what prediction sees
    seed: int = 0
    threads: int | None = None  # torch threads while training (None: leave as is)
    # keep only the first N of the encoder's 6 transformer layers (None: all): fewer layers, less compute per prompt;
    # the LoRA file records it and `merge_into` cuts the loaded encoder the same way
    layers: int | None = None

    def validate(self) -> None:
        if not 1 <= self.epochs <= 50:
            raise InvalidArgument(f"--finetune-epochs must be in [1, 50], got {self.epochs}")
        if not 1 <= self.rank <= 128:
            raise InvalidArgument(f"--finetune-rank must be in [1, 128], got {self.rank}")
        if not 0 < self.lr < 1:
            raise InvalidArgument(f"--finetune-lr must be in (0, 1), got {self.lr}")
        if self.layers is not None and not 1 <= self.layers <= 6:
            raise InvalidArgument(f"--finetune-layers must be in [1, 6] (all-MiniLM-L6-v2 has 6), got {self.layers}")


def _target_modules(model) -> list[str]:
    # lazy: torch costs ~1.6 s to import; only code that runs a model needs it
    import torch

    names = [n for n, mod in model.named_modules()
             if isinstance(mod, torch.nn.Linear) and n.startswith("encoder.layer.") and n.endswith(TARGETS)]
    if not names:
        raise FailedPrecondition("the encoder has no BERT-style Linear layers to fine-tune")
    return names


def finetune(texts: list[str], labels: list[str], out_file: Path, cfg: FinetuneConfig | None = None, *,
             trained_on: dict | None = None, log=print) -> dict:
    """Fine-tune on (texts, labels) and write the LoRA factors to `out_file` (atomically). Returns a summary.

    `trained_on` (e.g. the data's sha256 and the split) is stored in the summary, so a later `train` that reuses
    the encoder can tell whether its validation rows were held out from the fine-tune."""
    envs.set_offline_defaults()
    # lazy: torch costs ~1.6 s to import; only code that runs a model needs it
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    cfg = cfg or FinetuneConfig()
    cfg.validate()
    check_max_tokens(cfg.max_tokens)
    if len(texts) != len(labels) or not texts:
        raise InvalidArgument("fine-tuning needs one label per text and at least one text")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    classes = sorted(set(labels))
    y = np.array([classes.index(v) for v in labels])
    tok = AutoTokenizer.from_pretrained(str(model_path()))
    model = AutoModel.from_pretrained(str(model_path()))
    if cfg.layers:
        keep_layers(model, cfg.layers)
    for p in model.parameters():
        p.requires_grad_(False)
    scale = 2.0  # lora_alpha = 2 * rank
    dropout = torch.nn.Dropout(0.1)
    lora: dict[str, tuple] = {}
    for name in _target_modules(model):
        lin = model.get_submodule(name)
        a = torch.nn.Parameter(torch.empty(cfg.rank, lin.in_features))
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.nn.Parameter(torch.zeros(lin.out_features, cfg.rank))
        lora[name] = (a, b)
        _attach(torch, lin, a, b, scale, dropout)
    head = torch.nn.Linear(model.config.hidden_size, len(classes))
    counts = np.bincount(y, minlength=len(classes))
    weight = torch.tensor(len(y) / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32)
    params = [t for ab in lora.values() for t in ab]
    opt = torch.optim.AdamW([{"params": params, "lr": cfg.lr}, {"params": head.parameters(), "lr": 2e-3}],
                            weight_decay=0.01)
    steps = cfg.epochs * math.ceil(len(y) / cfg.batch_size)
    warm = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / steps))
    lengths = [len(t) for t in texts]
    char_cap = cfg.max_tokens * _CHARS_PER_TOKEN
    model.train()
    for epoch in range(cfg.epochs):
        idx = list(range(len(y)))
        rng.shuffle(idx)
        batches = []  # length buckets: sort chunks of 50 batches by length, then shuffle the batches
        for s in range(0, len(idx), cfg.batch_size * 50):
            chunk = sorted(idx[s:s + cfg.batch_size * 50], key=lambda i: lengths[i])
            batches += [chunk[j:j + cfg.batch_size] for j in range(0, len(chunk), cfg.batch_size)]
        rng.shuffle(batches)
        total = 0.0
        for b in batches:
            enc = tok([texts[i][:char_cap] for i in b], truncation=True, max_length=cfg.max_tokens, padding=True,
                      return_tensors="pt")
            pooled = sentence_embeddings(torch, model, enc)
            loss = torch.nn.functional.cross_entropy(head(pooled) * 20.0, torch.from_numpy(y[b]), weight=weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            total += loss.item()
        log(f"  encoder fine-tune epoch {epoch + 1}/{cfg.epochs}: loss {total / len(batches):.3f} "
            f"({time.monotonic() - t0:.0f} s)")
    tensors = {}
    for name, (a, b) in lora.items():
        tensors[f"{name}.lora_A"] = a.detach().to(torch.float16).contiguous()
        tensors[f"{name}.lora_B"] = b.detach().to(torch.float16).contiguous()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    summary = {"base": MODEL_ID, "rank": cfg.rank, "scale": scale, "epochs": cfg.epochs, "lr": cfg.lr,
               "batch_size": cfg.batch_size, "max_tokens": cfg.max_tokens, "seed": cfg.seed, "examples": len(y),
               "layers": len(model.encoder.layer),
               "classes": classes, "seconds": round(time.monotonic() - t0, 1), "trained_on": trained_on or {}}
    with atomic_path(out_file) as tmp:
        save_file(tensors, str(tmp), metadata={"base": MODEL_ID, "rank": str(cfg.rank), "scale": str(scale),
                                                "layers": str(len(model.encoder.layer)),
                                                "summary": json.dumps(summary)})
    return summary


def _attach(torch, lin, a, b, scale: float, dropout) -> None:
    """Make `lin` compute W x + scale * B A dropout(x) (training only; prediction merges the factors into W)."""
    base_forward = lin.forward

    def forward(x):
        return base_forward(x) + scale * torch.nn.functional.linear(torch.nn.functional.linear(dropout(x), a), b)

    lin.forward = forward
