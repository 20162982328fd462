"""Evaluation gate: is the candidate better than the base model and the current production adapter?

Scores are the mean loss over assistant (completion) tokens of held-out conversations, token-weighted,
computed exactly on the tokens training optimised (`format.tokenize_row`). Forgetting is the relative
loss increase of the candidate over the base model on the other tasks' held-out data.
The gate passes only if candidate <= (1 - margin) * base, candidate <= (1 - margin) * production (when
there is one) and forgetting <= forgetting_bound. A failed gate registers nothing and says why, in numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.errors import FailedPrecondition
from training.device import use_cuda
from training.format import IGNORE, tokenize_row


@dataclass
class GateResult:
    passed: bool
    candidate_loss: float
    base_loss: float
    production_loss: float | None = None
    production: str = ""
    forgetting: float = 0.0  # relative increase vs base on other tasks, pooled over tokens
    forgetting_by_task: dict = field(default_factory=dict)
    eval_tokens: int = 0
    reasons: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def assistant_loss(model, tokenizer, rows: list, *, batch_size: int = 4, max_len: int | None = None) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over completion tokens; returns (loss, tokens scored)."""
    # lazy: torch costs ~1.6 s to import; only code that runs a model needs it
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = [tokenize_row(tokenizer, r, max_len) for r in rows]
    items.sort(key=lambda x: len(x["input_ids"]))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            batch = items[i:i + batch_size]
            n = max(len(x["input_ids"]) for x in batch)
            ids = torch.tensor([x["input_ids"] + [pad] * (n - len(x["input_ids"])) for x in batch], device=device)
            labels = torch.tensor([x["labels"] + [IGNORE] * (n - len(x["labels"])) for x in batch], device=device)
            att = torch.tensor([[1] * len(x["input_ids"]) + [0] * (n - len(x["input_ids"])) for x in batch], device=device)
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            tgt = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                                     ignore_index=IGNORE, reduction="sum")
            total += float(loss)
            count += int((tgt != IGNORE).sum())
    if count == 0:
        raise FailedPrecondition("no assistant tokens to evaluate on; the held-out split is empty")
    return total / count, count


def evaluate(cfg, model_dir: str, adapter_dir: str, eval_rows: list, other_rows: dict[str, list],
             production_dir: str | None = None, production_name: str = "", echo=print) -> GateResult:
    # lazy: torch costs ~1.6 s to import; only code that runs a model needs it
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    on_cuda = use_cuda(cfg.device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if on_cuda else torch.float32)
    if on_cuda:
        base.to("cuda")
    rows = eval_rows[: cfg.eval_max_records]
    others = {t: r[: cfg.forgetting_max_records] for t, r in other_rows.items() if r}
    kw = {"batch_size": cfg.batch_size, "max_len": cfg.max_seq_len}

    echo(f"[eval] base model on {len(rows)} held-out {cfg.task} records")
    base_loss, n_tok = assistant_loss(base, tok, rows, **kw)
    base_other = {t: assistant_loss(base, tok, r, **kw) for t, r in others.items()}

    model = PeftModel.from_pretrained(base, adapter_dir, adapter_name="candidate")
    model.set_adapter("candidate")
    cand_loss, _ = assistant_loss(model, tok, rows, **kw)
    cand_other = {t: assistant_loss(model, tok, r, **kw) for t, r in others.items()}
    prod_loss = None
    if production_dir:
        model.load_adapter(production_dir, adapter_name="production")
        model.set_adapter("production")
        prod_loss, _ = assistant_loss(model, tok, rows, **kw)

    by_task = {t: (cand_other[t][0] - base_other[t][0]) / base_other[t][0] for t in others}
    b_sum = sum(base_other[t][0] * base_other[t][1] for t in others)
    c_sum = sum(cand_other[t][0] * cand_other[t][1] for t in others)
    forgetting = (c_sum - b_sum) / b_sum if b_sum else 0.0

    res = GateResult(passed=True, candidate_loss=cand_loss, base_loss=base_loss, production_loss=prod_loss,
                     production=production_name, forgetting=forgetting, forgetting_by_task=by_task, eval_tokens=n_tok)
    need = 1.0 - cfg.margin
    if cand_loss > base_loss * need:
        res.reasons.append(f"candidate loss {cand_loss:.4f} does not beat the base model's {base_loss:.4f} by the "
                           f"{cfg.margin:.1%} margin (needs <= {base_loss * need:.4f})")
    if prod_loss is not None and cand_loss > prod_loss * need:
        res.reasons.append(f"candidate loss {cand_loss:.4f} does not beat production {production_name} "
                           f"({prod_loss:.4f}) by the {cfg.margin:.1%} margin (needs <= {prod_loss * need:.4f})")
    if forgetting > cfg.forgetting_bound:
        worst = max(by_task, key=by_task.get)
        res.reasons.append(f"forgetting {forgetting:+.2%} on other tasks exceeds the {cfg.forgetting_bound:.1%} bound "
                           f"(worst: {worst} {by_task[worst]:+.2%})")
    res.passed = not res.reasons
    return res


def peft_dir_of(version) -> str:
    """The PEFT folder of a registry version (the version folder itself, or a sub-folder holding adapter_config.json)."""
    p = Path(str(version.path))
    if (p / "adapter_config.json").is_file():
        return str(p)
    for sub in p.iterdir() if p.is_dir() else ():
        if (sub / "adapter_config.json").is_file():
            return str(sub)
    return str(p)
