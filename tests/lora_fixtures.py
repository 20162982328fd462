"""Real, deterministic LoRA adapters for tests: peft on the base model, non-zero init so they change output.

`make_lora(base_dir, out_dir, seed)` builds a PEFT LoRA with both A and B randomly initialised
(`init_lora_weights=False`; a default init has B = 0 and would be a no-op adapter), saves it with
`save_pretrained` and returns the folder. Same base + seed + settings -> the same weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_lora(
    base_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    r: int = 8,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    lora_alpha: int | None = None,
) -> Path:
    """Create a LoRA adapter for the HF model in `base_dir`, save it to `out_dir` and return `out_dir`.

    Reuses `out_dir` if it already holds an adapter (adapter_config.json + weights).
    """
    out = Path(out_dir)
    if (out / "adapter_config.json").is_file() and any(out.glob("adapter_model.*")):
        return out

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha if lora_alpha is not None else 2 * r,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    # peft draws the random A/B from torch's global generator when it wraps the model.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        peft_model = get_peft_model(model, config)
    finally:
        torch.random.set_rng_state(state)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    return out
