"""Formatting with the base model's own chat template.

Rows are TRL conversational prompt/completion pairs: SFTTrainer renders `prompt` with the generation prompt
and `prompt + completion` in full, and trains only on the tokens after their common prefix (completion-only
loss, with any template; `assistant_only_loss` needs `{% generation %}` markers SmolLM2's template lacks).
`tokenize_row` reproduces exactly that so evaluation scores the same tokens training optimised.
"""
from __future__ import annotations

IGNORE = -100


def _ids(out) -> list[int]:
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return list(out)


def chat_ids(tokenizer, messages: list, *, add_generation_prompt: bool = False) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt))


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_row(tokenizer, row: dict, max_len: int | None = None) -> dict:
    """{"prompt": [...], "completion": [...]} -> {"input_ids", "labels"} with -100 on every prompt token."""
    prompt_ids = chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)
    full = chat_ids(tokenizer, row["prompt"] + row["completion"])
    n = common_prefix_length(prompt_ids, full)
    labels = [IGNORE] * n + full[n:]
    if max_len is not None:
        full, labels = full[:max_len], labels[:max_len]
    return {"input_ids": full, "labels": labels}


def token_counter(tokenizer):
    """(prompt messages, answer) -> (prompt tokens, prompt + answer tokens) for the data stage's length filter."""
    def count(prompt: list, completion: str) -> tuple[int, int]:
        p = chat_ids(tokenizer, prompt, add_generation_prompt=True)
        full = chat_ids(tokenizer, prompt + [{"role": "assistant", "content": completion}])
        return len(p), len(full)
    return count
