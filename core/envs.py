"""Every environment variable the project reads, declared once and read lazily (never at import time).

Read a variable as `envs.get("SPECIALIST_ROUTER_HOME")`; the names below are the whole list. Variables that
configure a process's settings (`SPECIALIST_ROUTER__SECTION__FIELD`, `SPECIALIST_ROUTER_TRAIN__FIELD`,
`SPECIALIST_ROUTER_CLASSIFIER__FIELD`) are derived from the typed configs by `core.config`; their prefixes are
declared here too.
"""
from __future__ import annotations

import os

# name -> what it does (shown by `specialist-router env`)
VARIABLES: dict[str, str] = {
    "SPECIALIST_ROUTER_HOME": "Data root (models, classifier, adapters, logs, runs). Default: $XDG_CACHE_HOME/specialist-router.",
    "XDG_CACHE_HOME": "Base of the default data root when SPECIALIST_ROUTER_HOME is unset (default ~/.cache).",
    "SPECIALIST_ROUTER_TOKEN": "Bearer token the CLI and SDK send to a gateway with auth on (`--token-env` names another).",
    "CUDA_VISIBLE_DEVICES": "GPUs a training run may see; `train --device cuda:N` narrows it before torch loads.",
    "SPECIALIST_ROUTER_DISABLE_LORA_FIX": "1 switches off the vLLM CPU mixed-batch LoRA fix plugin (the bench that measures the fix sets it).",
    "HF_HUB_OFFLINE": "Set to 1 by every entry point that loads a model: nothing is fetched from a hub.",
    "TRANSFORMERS_OFFLINE": "Set to 1 with HF_HUB_OFFLINE.",
    "TOKENIZERS_PARALLELISM": "Set to false: the tokenizers' own thread pool fights torch's for the 2 cores.",
}

OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def set_offline_defaults() -> None:
    """Before a model loads: never reach a hub, keep the tokenizers' threads quiet (a caller's own setting wins)."""
    for k, v in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(k, v)

# prefixes of the variables derived from typed configs (core.config.env_overrides)
GATEWAY_PREFIX = "SPECIALIST_ROUTER__"
TRAIN_PREFIX = "SPECIALIST_ROUTER_TRAIN__"
CLASSIFIER_PREFIX = "SPECIALIST_ROUTER_CLASSIFIER__"
LOOP_PREFIX = "SPECIALIST_ROUTER_LOOP__"
PREFIXES = (GATEWAY_PREFIX, TRAIN_PREFIX, CLASSIFIER_PREFIX, LOOP_PREFIX)


def get(name: str, default: str = "") -> str:
    """The variable's value now, or `default`; refuses a name not declared in VARIABLES (a typo is a bug)."""
    if name not in VARIABLES:
        raise KeyError(f"environment variable {name} is not declared in core.envs.VARIABLES")
    return os.environ.get(name, default)


def with_prefix(prefix: str) -> dict[str, str]:
    """All variables that start with one of the declared config prefixes."""
    if prefix not in PREFIXES:
        raise KeyError(f"environment prefix {prefix} is not declared in core.envs.PREFIXES")
    return {k: v for k, v in os.environ.items() if k.startswith(prefix)}


def get_configured(name: str, default: str = "") -> str:
    """A variable whose *name* an operator configured (e.g. `token_env`), read now."""
    return os.environ.get(name, default) if name else default
