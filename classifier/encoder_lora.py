"""The fine-tuned encoder's file: LoRA factors of MiniLM in safetensors (`encoder_lora.safetensors`).

Written by `classifier.finetune`, read by `classifier.embed` (merged into the encoder's weights at load) and by
`classifier.train` (the recipe recorded in the artifact). Torch and safetensors are imported lazily: loading
them costs ~1.5 s, and `classifier` is imported by commands that never embed anything.
"""
from __future__ import annotations

import json
from pathlib import Path

from core.errors import FailedPrecondition

LORA_FILE = "encoder_lora.safetensors"


def read_summary(lora_file: Path) -> dict:
    """The training summary stored in a LoRA file's metadata ({} when absent or unreadable)."""
    from safetensors import safe_open  # lazy: see the module docstring

    try:
        with safe_open(str(lora_file), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("summary", "{}"))
    except Exception:  # noqa: BLE001 - informational only
        return {}


def keep_layers(model, n: int) -> None:
    """Cut a BERT model to its first `n` transformer layers (a no-op when it has no more than that)."""
    if n < len(model.encoder.layer):
        model.encoder.layer = model.encoder.layer[:n]
        model.config.num_hidden_layers = n


def merge_into(model, lora_file: Path, base_id: str) -> None:
    """Add scale * B @ A of every factor pair in `lora_file` to the matching Linear weight of `model` (first cut
    to the number of layers the encoder was fine-tuned with, when the file records one)."""
    import torch  # lazy: see the module docstring
    from safetensors import safe_open

    try:
        with safe_open(str(lora_file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        scale = float(meta["scale"])
        layers = int(meta.get("layers") or 0)
    except Exception as exc:  # noqa: BLE001 - any read failure is a corrupt file
        raise FailedPrecondition(f"fine-tuned encoder {lora_file} cannot be read ({exc}); retrain the classifier "
                                 "with `specialist-router classifier train`") from None
    if meta.get("base") != base_id:
        raise FailedPrecondition(f"fine-tuned encoder {lora_file} was trained on {meta.get('base')!r}, not {base_id}")
    if layers:
        keep_layers(model, layers)
    names = {k.rsplit(".", 1)[0] for k in tensors}
    with torch.no_grad():
        for name in sorted(names):
            try:
                lin = model.get_submodule(name)
                a, b = tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float()
                lin.weight += scale * (b @ a)
            except (AttributeError, KeyError, RuntimeError) as exc:
                raise FailedPrecondition(f"fine-tuned encoder {lora_file} does not fit the encoder at {name} "
                                         f"({exc}); retrain the classifier") from None
