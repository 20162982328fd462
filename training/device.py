"""Which GPU a training run uses: `--device cpu | cuda | cuda:N` (or `cuda:N,M`).

One meaning, the one torch and vLLM use: `cuda:N` is the N-th GPU *visible to this process*, counted from 0
in the order of the inherited CUDA_VISIBLE_DEVICES (all GPUs of the host when it is unset). The run is narrowed
to that GPU by setting CUDA_VISIBLE_DEVICES to the N-th entry of the inherited list before torch loads:

    CUDA_VISIBLE_DEVICES=1   train --device cuda:0   -> CUDA_VISIBLE_DEVICES=1   (physical GPU 1)
    CUDA_VISIBLE_DEVICES=2,3 train --device cuda:1   -> CUDA_VISIBLE_DEVICES=3
    (unset)                  train --device cuda:1   -> CUDA_VISIBLE_DEVICES=1
    CUDA_VISIBLE_DEVICES=1   train --device cuda:1   -> refused: only 1 GPU is visible (cuda:0)

`cuda` keeps every visible GPU; `cpu` hides them all (CUDA_VISIBLE_DEVICES=""). `serving_gpus` (the physical
GPUs vLLM serves on, written like CUDA_VISIBLE_DEVICES entries) are refused as training GPUs. A GPU device that
torch then cannot see is an error, never a silent CPU run (`use_cuda`). Only `use_cuda` imports torch.
"""
from __future__ import annotations

import os
import sys

from core import envs
from core.errors import ConfigError

VAR = "CUDA_VISIBLE_DEVICES"
# what apply_device() last set, and the value it replaced: a second call (a dry run, a second run in the same
# process) resolves against the inherited list again instead of the already narrowed one
_last: dict[str, str | None] = {}


def parse_device(device: str) -> list[int] | None:
    """[N, ...] for cuda:N[,M], None for cpu / cuda; ConfigError for anything else."""
    if device in ("cpu", "cuda"):
        return None
    if device.startswith("cuda:"):
        parts = device[5:].split(",")
        if all(p.strip().isdigit() for p in parts):
            idx = [int(p) for p in parts]
            if len(set(idx)) != len(idx):
                raise ConfigError(f"device {device!r} names a GPU twice")
            return idx
    raise ConfigError(f"device must be cpu, cuda or cuda:N (N counts the GPUs visible to this process from 0), "
                      f"got {device!r}")


def visible(value: str | None) -> list[str] | None:
    """The GPUs a CUDA_VISIBLE_DEVICES value leaves visible, in order; None: unset (every GPU of the host).
    CUDA stops at the first invalid entry, so an empty or negative entry (`""`, `-1`) ends the list."""
    if value is None:
        return None
    out = []
    for entry in value.split(","):
        e = entry.strip()
        if not e or (e.startswith("-") and e[1:].isdigit()):
            break
        out.append(e)
    return out


def inherited() -> str | None:
    """CUDA_VISIBLE_DEVICES as this process inherited it (before apply_device narrowed it)."""
    now = envs.get(VAR, None)  # None: unset, which differs from "" (no GPU)
    if _last and now == _last["set"]:
        return _last["inherited"]
    return now


def _describe(vis: list[str]) -> str:
    return ", ".join(f"cuda:{i} = GPU {g}" for i, g in enumerate(vis)) or "none"


def resolve(device: str, inherited_value: str | None) -> str | None:
    """The CUDA_VISIBLE_DEVICES value a run on `device` gets (None: left unset), or ConfigError."""
    idx = parse_device(device)
    if device == "cpu":
        return ""
    vis = visible(inherited_value)
    if vis == []:
        raise ConfigError(f"--device {device}: CUDA_VISIBLE_DEVICES={inherited_value!r} hides every GPU from this "
                          "process; unset it or list the GPUs training may use, or pass --device cpu")
    if idx is None:  # cuda: every visible GPU
        return inherited_value
    if vis is None:
        return ",".join(str(i) for i in idx)
    bad = [i for i in idx if i >= len(vis)]
    if bad:
        raise ConfigError(f"--device {device}: only {len(vis)} GPU{'s' if len(vis) != 1 else ''} visible to this "
                          f"process (CUDA_VISIBLE_DEVICES={inherited_value}: {_describe(vis)}); cuda:N counts the "
                          f"visible GPUs from 0, so use --device "
                          f"{'cuda:0' if len(vis) == 1 else f'cuda:0..cuda:{len(vis) - 1}'} or change CUDA_VISIBLE_DEVICES")
    return ",".join(vis[i] for i in idx)


def physical_gpus(device: str, inherited_value: str | None) -> list[str] | None:
    """The host's GPUs (CUDA_VISIBLE_DEVICES entries) the run would use; [] for cpu; None: all of the host's."""
    value = resolve(device, inherited_value)
    return visible(value)


def check_serving(device: str, serving_gpus: str, inherited_value: str | None) -> None:
    """Refuse a training device that is (or includes) a GPU listed in `serving_gpus`."""
    serving = [g.strip() for g in serving_gpus.split(",") if g.strip()]
    if not serving or device == "cpu":
        return
    gpus = physical_gpus(device, inherited_value)
    if gpus is None:
        raise ConfigError(f"--device {device} would train on every GPU of the host, including serving_gpus="
                          f"{','.join(serving)}; pick the training GPU with cuda:N (and CUDA_VISIBLE_DEVICES)")
    clash = [g for g in gpus if g in serving]
    if clash:
        raise ConfigError(f"--device {device} is GPU {','.join(clash)} (CUDA_VISIBLE_DEVICES="
                          f"{inherited_value if inherited_value is not None else '(unset)'}), which serving_gpus names "
                          f"as a serving GPU; train on another one, e.g. CUDA_VISIBLE_DEVICES=<training GPU> "
                          "--device cuda:0")


def apply_device(device: str) -> str | None:
    """Narrow this process to `device` (see the module doc); returns the CUDA_VISIBLE_DEVICES it now has.
    Must run before torch is imported; repeating it with the same device is a no-op."""
    before = inherited()
    target = resolve(device, before)
    now = envs.get(VAR, None)
    if target != now:
        if "torch" in sys.modules and device != "cpu":
            raise ConfigError(f"--device {device} must be applied before torch is imported (it would change "
                              f"CUDA_VISIBLE_DEVICES from {now!r} to {target!r}); run each device in its own process")
        if target is None:
            os.environ.pop(VAR, None)
        else:
            os.environ[VAR] = target
    _last.clear()
    _last.update({"set": target, "inherited": before})
    return target


def use_cuda(device: str) -> bool:
    """True when the run uses CUDA. A GPU device that torch cannot see is a ConfigError (no silent CPU run)."""
    if device == "cpu":
        return False
    # lazy: torch costs ~1.6 s to import and must load after apply_device(); only code running a model calls this
    import torch

    if torch.cuda.is_available():
        return True
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    raise ConfigError(f"--device {device}: torch {torch.__version__} ({build}) sees no GPU (CUDA_VISIBLE_DEVICES="
                      f"{envs.get(VAR, None)!r}); install the GPU build (scripts/install.sh --gpu) on a CUDA host, "
                      "or pass --device cpu")
