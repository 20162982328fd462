"""Trainer backends behind one interface: `backend.train(job) -> TrainOutput`.

- `PeftTrlBackend`: peft LoRA + trl SFTTrainer on CPU or CUDA (fp32 and no gradient checkpointing on CPU:
  trl's defaults there are ~17x slower).
- `UnslothBackend`: unsloth's FastLanguageModel + the same SFTTrainer, CUDA only and optional. Its import
  raises (NotImplementedError without a GPU, ImportError when absent); `select_backend` then falls back to
  peft and says why.
Both take prompt/completion rows and save a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import InvalidArgument, ResourceExhausted
from training.device import use_cuda

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainJob:
    cfg: object  # TrainConfig
    model_dir: str
    train_rows: list
    eval_rows: list
    output_dir: Path  # checkpoints go here
    adapter_dir: Path  # final PEFT folder
    resume_from: str | None = None
    callbacks: list = field(default_factory=list)


@dataclass
class TrainOutput:
    adapter_dir: Path
    steps: int
    seconds: float
    train_tokens: int
    log_history: list
    backend: str
    target_modules: list


def default_target_modules(model_config) -> list[str]:
    """Attention projections only for GPT-OSS (what vLLM serves there); attention + MLP otherwise."""
    mt = getattr(model_config, "model_type", "")
    if mt in ("gpt_oss", "gpt-oss") or "gpt-oss" in str(getattr(model_config, "_name_or_path", "")).lower():
        return list(ATTENTION_MODULES)
    return ATTENTION_MODULES + MLP_MODULES


def _oom_message(cfg, exc: BaseException) -> str:
    return (f"out of memory while training ({str(exc).splitlines()[0][:160]}); lower batch_size (now {cfg.batch_size}, "
            f"raise grad_accum to keep the effective batch) or max_seq_len (now {cfg.max_seq_len}), e.g. "
            f"--set batch_size={max(1, cfg.batch_size // 2)} --set grad_accum={cfg.grad_accum * 2}")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _sft_config(job: TrainJob, on_cuda: bool):
    # lazy: trl pulls in torch + transformers; only training needs it
    from trl import SFTConfig

    cfg = job.cfg
    return SFTConfig(
        output_dir=str(job.output_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if job.eval_rows else "no",
        eval_steps=cfg.eval_steps,
        eval_on_start=bool(job.eval_rows) and cfg.eval_on_start and job.resume_from is None,
        max_length=cfg.max_seq_len,
        completion_only_loss=True,
        packing=False,
        # similar lengths per batch (LengthGroupedSampler: random megabatches, sorted inside): less padding
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        bf16=bool(on_cuda),
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not on_cuda,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        disable_tqdm=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )


def sft_trainer_class(on_cuda: bool):
    """trl's SFTTrainer; on CPU with the plain LM-head loss.

    trl 1.15 computes the loss through a fused LM head whose Triton kernel has no CPU backend ("0 active
    drivers"). Off CUDA we compute the loss the standard transformers way instead: the model's own causal-LM
    cross-entropy on the same `labels` (-100 on prompt tokens), so the objective is unchanged (completion
    tokens only); only trl's entropy / token-accuracy metrics are not logged.
    """
    # lazy: transformers + torch cost ~3 s to import; only code that runs a model needs them
    from transformers import Trainer
    from trl import SFTTrainer

    if on_cuda:
        return SFTTrainer

    class CpuSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return CpuSFTTrainer


def _run_trainer(job: TrainJob, model, tokenizer, peft_config, name: str, target_modules: list) -> TrainOutput:
    # lazy: datasets costs ~1.4 s to import (pyarrow, pandas); only code that runs a model needs it
    from datasets import Dataset

    on_cuda = use_cuda(job.cfg.device)  # a GPU device torch cannot see is an error, not a CPU run
    cols = ("prompt", "completion")
    train_ds = Dataset.from_list([{k: r[k] for k in cols} for r in job.train_rows])
    eval_ds = Dataset.from_list([{k: r[k] for k in cols} for r in job.eval_rows]) if job.eval_rows else None
    trainer = sft_trainer_class(on_cuda)(model=model, args=_sft_config(job, on_cuda), train_dataset=train_ds,
                                         eval_dataset=eval_ds, processing_class=tokenizer, peft_config=peft_config, callbacks=list(job.callbacks))
    n_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=job.resume_from)
    seconds = time.perf_counter() - t0
    job.adapter_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(str(job.adapter_dir))  # PEFT files only: the base tokenizer serves it
    return TrainOutput(job.adapter_dir, trainer.state.global_step, seconds, n_tokens,
                       list(trainer.state.log_history), name, target_modules)


class PeftTrlBackend:
    name = "peft"

    def train(self, job: TrainJob) -> TrainOutput:
        # lazy: torch costs ~1.6 s to import; only code that runs a model needs it
        import torch
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = job.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        on_cuda = use_cuda(cfg.device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=torch.bfloat16 if on_cuda else torch.float32)
            if on_cuda:
                model.to("cuda")
            targets = list(cfg.target_modules) or default_target_modules(model.config)
            peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                     target_modules=targets, task_type="CAUSAL_LM", bias="none")
            return _run_trainer(job, model, tokenizer, peft_config, self.name, targets)
        except (RuntimeError, MemoryError) as exc:
            if is_oom(exc):
                raise ResourceExhausted(_oom_message(cfg, exc)) from exc
            if "Target modules" in str(exc) and "not found" in str(exc):
                raise InvalidArgument(f"target_modules {cfg.target_modules} do not exist in the base model: {exc}") from exc
            raise
        except ValueError as exc:
            if "Target modules" in str(exc):
                raise InvalidArgument(f"target_modules {cfg.target_modules} do not match the base model: {exc}") from exc
            raise


class UnslothBackend:
    name = "unsloth"

    def __init__(self):
        # lazy: unsloth needs CUDA (its import raises on CPU); only the unsloth backend imports it
        import unsloth  # noqa: F401  (raises NotImplementedError without a GPU, ImportError when absent)
        from unsloth import FastLanguageModel

        self._flm = FastLanguageModel

    def train(self, job: TrainJob) -> TrainOutput:
        cfg = job.cfg
        try:
            model, tokenizer = self._flm.from_pretrained(model_name=job.model_dir, max_seq_length=cfg.max_seq_len,
                                                         load_in_4bit=cfg.load_in_4bit, dtype=None)
            targets = list(cfg.target_modules) or default_target_modules(model.config)
            model = self._flm.get_peft_model(model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                             lora_dropout=cfg.lora_dropout, target_modules=targets, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=cfg.seed)
            return _run_trainer(job, model, tokenizer, None, self.name, targets)
        except (RuntimeError, MemoryError) as exc:
            if is_oom(exc):
                raise ResourceExhausted(_oom_message(cfg, exc)) from exc
            raise


def select_backend(cfg, echo=print):
    """The backend for cfg.backend/cfg.device; unsloth falls back to peft with a message when it cannot load."""
    if cfg.backend == "peft" or (cfg.backend == "auto" and cfg.device == "cpu"):
        return PeftTrlBackend()
    if cfg.device == "cpu":
        echo("[train] unsloth needs a CUDA device; --device cpu -> using the peft backend")
        return PeftTrlBackend()
    try:
        return UnslothBackend()
    except BaseException as exc:  # unsloth raises NotImplementedError without a GPU, ImportError when absent, ...
        if isinstance(exc, KeyboardInterrupt):
            raise
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if cfg.backend == "unsloth":
            echo(f"[train] unsloth is not usable here ({why}); falling back to the peft backend")
        return PeftTrlBackend()
