"""Checks that a PEFT folder is a LoRA adapter the serving engine can load, before anyone loads it.

`validate_adapter()` runs every check and raises on the first failure with a message that says what is
wrong and how to fix it. Which error class:

- `InvalidArgument`: a *name* the caller typed is unusable (task or version that is not a plain
  identifier, or would escape the registry root). Fix the argument.
- `FailedPrecondition`: the *files* are not servable (not a LoRA, missing or corrupt files, sha256
  mismatch against the manifest, wrong base model, rank above the server's `--max-lora-rank`,
  target modules the engine cannot serve). Fix or retrain the adapter, or the server settings.

The checks are cheap (no torch, no model load): the safetensors header is parsed and every tensor's byte
range is checked against the file size, then the `safetensors` library opens the file the way vLLM will.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from safetensors import safe_open

from core.errors import FailedPrecondition, InvalidArgument, quoted
from core.files import sha256_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"

TASK_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")

# Modules vLLM's LoRA layers can serve on a Llama-like model (SmolLM2): attention and dense MLP projections.
LLAMA_SERVABLE_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
# GPT-OSS: attention projections only. Expert weights (`mlp.experts.gate_up_proj` / `down_proj`) are refused
# unless the caller adds "experts" to servable_modules because its engine build supports MoE LoRA.
GPT_OSS_SERVABLE_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
EXPERTS = "experts"
# Layers vLLM cannot serve as LoRA (or as full copies through modules_to_save).
EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "wpe", "embed_out", "embedding"})

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                       r"(\..+)?$")
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# ----------------------------------------------------------------------------------------------- names

def check_task_name(task: str) -> str:
    """Return `task` if it is a safe task name, else raise InvalidArgument."""
    if not isinstance(task, str) or not TASK_RE.fullmatch(task):
        raise InvalidArgument(
            f"invalid task name {quoted(task)}: use 1-64 characters of lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit (e.g. 'code', 'sql-gen')")
    return task


def check_version(version: str | int) -> str:
    """Return the version as a string if it is a positive integer, else raise InvalidArgument."""
    v = str(version) if isinstance(version, int) and not isinstance(version, bool) else version
    if not isinstance(v, str) or not VERSION_RE.fullmatch(v):
        raise InvalidArgument(
            f"invalid version {quoted(version)}: registry versions are positive integers assigned on register "
            "('1', '2', ...); see `specialist-router adapters show TASK`")
    return v


def validate_names(task: str, version: str | int | None = None) -> None:
    """Check a task name and, unless None/empty, a version; raise InvalidArgument on the first bad one."""
    check_task_name(task)
    if version not in (None, ""):
        check_version(version)


def safe_join(root: Path, *parts: str) -> Path:
    """`root/parts...`, refusing anything that resolves outside `root` (symlinks included)."""
    real_root = os.path.realpath(root)
    candidate = os.path.realpath(os.path.join(real_root, *parts))
    if os.path.commonpath([real_root, candidate]) != real_root or candidate == real_root:
        raise InvalidArgument(f"path {quoted('/'.join(parts))} escapes the registry root {real_root}; "
                              "use a plain task name and a numeric version")
    return Path(candidate)


# ----------------------------------------------------------------------------------------------- files


def read_adapter_config(path: Path) -> dict:
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise FailedPrecondition(
            f"{path} has no {CONFIG_FILE}: not a PEFT adapter folder (save it with "
            "`model.save_pretrained(dir)` on a peft model)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FailedPrecondition(f"{cfg_path} is not valid JSON ({exc}); re-save the adapter") from exc
    if not isinstance(cfg, dict):
        raise FailedPrecondition(f"{cfg_path} is not a JSON object; re-save the adapter")
    return cfg


def read_safetensors_header(path: Path) -> dict:
    """Parse the header and check every tensor's byte range lies inside the file; return {name: info}."""
    size = path.stat().st_size
    fix = "the file is truncated or corrupt; copy or save the adapter again"
    if size < 8:
        raise FailedPrecondition(f"{path} is {size} bytes, too short for a safetensors header: {fix}")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > size - 8 or header_len > 100_000_000:
            raise FailedPrecondition(f"{path}: header claims {header_len} bytes but the file has {size}: {fix}")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FailedPrecondition(f"{path}: header is not valid JSON ({exc}): {fix}") from exc
    if not isinstance(header, dict):
        raise FailedPrecondition(f"{path}: header is not a JSON object: {fix}")
    data_len = size - 8 - header_len
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise FailedPrecondition(f"{path} holds no tensors; the adapter was saved empty, train/save it again")
    for name, info in tensors.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            itemsize = _DTYPE_SIZES.get(info["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FailedPrecondition(f"{path}: tensor {name!r} has a malformed header entry: {fix}") from exc
        if not 0 <= begin <= end or end > data_len:
            raise FailedPrecondition(
                f"{path}: tensor {name!r} spans bytes {begin}..{end} of the data section but the file holds only "
                f"{data_len} data bytes: {fix}")
        if itemsize is not None:
            n = 1
            for d in shape:
                n *= d
            if n * itemsize != end - begin:
                raise FailedPrecondition(
                    f"{path}: tensor {name!r} shape {shape} {info['dtype']} needs {n * itemsize} bytes, "
                    f"header gives {end - begin}: {fix}")
    # Then open it with the library the engine uses; it checks what we did not (overlaps, gaps).
    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception as exc:  # SafetensorError is not exported consistently across versions
        raise FailedPrecondition(f"{path} cannot be opened by safetensors ({exc}): {fix}") from exc
    return tensors


# ---------------------------------------------------------------------------------------------- modules

def default_servable_modules(base_model_id: str | None) -> frozenset[str]:
    """Modules the engine can serve for a base model: GPT-OSS -> attention only, else Llama-like."""
    if base_model_id and "gpt-oss" in base_model_id.lower().replace("_", "-"):
        return GPT_OSS_SERVABLE_MODULES
    return LLAMA_SERVABLE_MODULES


def _module_problem(module_path: str, servable: frozenset[str]) -> str | None:
    """Why `module_path` (e.g. `model.layers.0.mlp.experts.down_proj`) cannot be served, or None."""
    parts = module_path.split(".")
    leaf = parts[-1]
    if EXPERTS in parts or leaf == EXPERTS:
        if EXPERTS in servable:
            return None
        return (f"{module_path!r} is a MoE expert weight; this engine serves LoRA on attention projections only "
                "(retrain with target_modules like ['q_proj','k_proj','v_proj','o_proj'], or allow 'experts' "
                "if your vLLM build supports MoE LoRA)")
    if leaf in EMBEDDING_MODULES:
        return (f"{module_path!r} is an embedding/output layer, which vLLM cannot serve as a LoRA; "
                "retrain without it in target_modules")
    if leaf not in servable:
        return (f"{module_path!r} is not a module the engine can serve LoRA on "
                f"(servable: {', '.join(sorted(servable))}); retrain with those target_modules")
    return None


def _tensor_modules(tensors: dict) -> set[str]:
    mods = set()
    for key in tensors:
        m = _LORA_KEY.match(key)
        if m is None:
            raise FailedPrecondition(
                f"tensor {key!r} is not a LoRA A/B weight (a full-weight copy, e.g. from modules_to_save); "
                "vLLM cannot serve it: retrain without modules_to_save")
        if m.group("kind").startswith("lora_embedding"):
            raise FailedPrecondition(f"tensor {key!r} is a LoRA on an embedding layer, which vLLM cannot serve; "
                                     "retrain without embed_tokens/lm_head in target_modules")
        if m.group("kind") == "lora_magnitude_vector":
            raise FailedPrecondition(f"tensor {key!r} belongs to a DoRA adapter, which vLLM cannot serve; "
                                     "retrain with use_dora=False")
        mods.add(m.group("module"))
    return mods


def _strip_prefix(module: str) -> str:
    for prefix in ("base_model.model.",):
        if module.startswith(prefix):
            return module[len(prefix):]
    return module


def base_weight_shapes(model_dir: str | Path) -> dict[str, list[int]]:
    """{weight name: shape} of a base model folder's safetensors files, from their headers only (no tensor is
    read): what an adapter's LoRA factors must fit."""
    shapes: dict[str, list[int]] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FailedPrecondition(f"base model folder {model_dir} holds no .safetensors weights to check adapters "
                                 "against")
    for f in files:
        for name, info in read_safetensors_header(f).items():
            shapes[name] = [int(d) for d in info["shape"]]
    return shapes


def _check_shapes(path: Path, tensors: dict, base_shapes: dict[str, list[int]]) -> None:
    """Every LoRA pair must fit its base weight [out, in]: A is [r, in], B is [out, r]."""
    for key, info in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            continue
        module = _strip_prefix(m.group("module"))
        base = base_shapes.get(f"{module}.weight")
        if base is None:
            raise FailedPrecondition(f"adapter {path} has weights for {module!r}, which the served base model does "
                                     "not have (an adapter for another architecture or size); retrain it on the "
                                     "served base model")
        shape = [int(d) for d in info["shape"]]
        kind = m.group("kind")
        want = (1, base[1]) if kind == "lora_A" else (0, base[0])
        if len(shape) != 2 or len(base) != 2 or shape[want[0]] != want[1]:
            raise FailedPrecondition(f"adapter {path}: {kind} of {module!r} has shape {shape}, which does not fit "
                                     f"the served base weight {base} (an adapter for another base model); retrain "
                                     "it on the served base model")


# ----------------------------------------------------------------------------------------------- main

def validate_adapter(path, *, base_fingerprint: str | None = None, base_model_id: str | None = None,
                     max_lora_rank: int | None = None, servable_modules=None, check_hashes: bool = True,
                     manifest: dict | None = None, base_shapes: dict[str, list[int]] | None = None) -> dict:
    """Validate a PEFT LoRA folder; return what was learned about it, or raise with a precise message.

    path: the PEFT folder (a registry version folder or a training output).
    base_fingerprint: the weights fingerprint of the base the server runs; compared with the manifest's
        `base_fingerprint` (the authoritative check: same name, different weights is still refused).
    base_model_id: the base model id/path; compared with the adapter's `base_model_name_or_path` only when
        no fingerprint can be compared, and used to pick the default servable modules (GPT-OSS vs Llama).
    max_lora_rank: the server's `--max-lora-rank`; a higher rank (incl. `rank_pattern`) is refused.
    servable_modules: module names the engine can serve; default from `base_model_id`.
    check_hashes: with a manifest, check every file's sha256 and that no file is missing or extra.
    manifest: the registry manifest of this version (`manifest.json` in `path` is read when None and present).
    base_shapes: the served base's weight shapes (`base_weight_shapes`); every LoRA factor must fit them.

    Returns {"peft_type", "rank", "alpha", "target_modules", "modules", "base_model_name_or_path",
    "tensors", "files": {name: sha256}} where `modules` are the module paths that carry LoRA weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise FailedPrecondition(f"adapter folder {path} does not exist or is not a folder")
    cfg = read_adapter_config(path)
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise FailedPrecondition(
            f"{path / CONFIG_FILE} has peft_type {cfg.get('peft_type')!r}: only LoRA adapters can be served "
            "(train with peft.LoraConfig)")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        hint = " (found adapter_model.bin: re-save with safe_serialization=True)" \
            if (path / "adapter_model.bin").exists() else ""
        raise FailedPrecondition(f"{path} has no {WEIGHTS_FILE}{hint}; save the adapter with save_pretrained()")

    # Manifest: hashes first, so a tampered file is reported as tampering rather than as its symptom.
    if manifest is None and (path / MANIFEST_FILE).is_file():
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise FailedPrecondition(f"{path / MANIFEST_FILE} is corrupt ({exc}); register the adapter again") from exc
    files = {p.name: sha256_file(p) for p in sorted(path.iterdir())
             if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")}
    if manifest is not None and check_hashes:
        expected = manifest.get("files") or {}
        if not expected:
            raise FailedPrecondition(f"manifest of {path} lists no file hashes; register the adapter again")
        for name, digest in expected.items():
            if name not in files:
                raise FailedPrecondition(f"{path / name} listed in the manifest is missing; the version is "
                                         "incomplete: register the adapter again")
            if files[name] != digest:
                raise FailedPrecondition(
                    f"{path / name} does not match its manifest sha256 (expected {digest[:12]}..., got "
                    f"{files[name][:12]}...): the file was modified or corrupted after register; register a "
                    "new version instead of editing one in place")
        extra = sorted(set(files) - set(expected))
        if extra:
            raise FailedPrecondition(f"{path} holds files not in its manifest: {', '.join(extra)}; versions are "
                                     "immutable, register a new version instead")

    tensors = read_safetensors_header(weights)

    # Base model: fingerprint is authoritative; the name is only a fallback.
    recorded_fp = (manifest or {}).get("base_fingerprint") or ""
    cfg_base = cfg.get("base_model_name_or_path") or ""
    if base_fingerprint and recorded_fp:
        if recorded_fp != base_fingerprint:
            raise FailedPrecondition(
                f"adapter {path} was trained on base weights {recorded_fp[:19]}... but the server runs "
                f"{base_fingerprint[:19]}... (base {(manifest or {}).get('base_model_id') or cfg_base!r}); "
                "retrain it on the served base model, or serve the base it was trained on")
    elif base_fingerprint and manifest is not None and not recorded_fp:
        raise FailedPrecondition(f"manifest of {path} records no base_fingerprint, so the base model cannot be "
                                 "verified; register it again with the base model's fingerprint")
    elif base_model_id and cfg_base and not recorded_fp:
        a, b = base_model_id.rstrip("/").split("/")[-1].lower(), cfg_base.rstrip("/").split("/")[-1].lower()
        if a != b:
            raise FailedPrecondition(f"adapter {path} was trained on {cfg_base!r}, the server runs "
                                     f"{base_model_id!r}; retrain it on the served base model")

    # Rank.
    rank = int(cfg.get("r") or 0)
    ranks = [rank, *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    if rank <= 0:
        raise FailedPrecondition(f"{path / CONFIG_FILE} has no positive rank 'r'; re-save the adapter")
    if max_lora_rank is not None and max(ranks) > max_lora_rank:
        raise FailedPrecondition(
            f"adapter {path} has LoRA rank {max(ranks)} above the server's max_lora_rank {max_lora_rank}; "
            f"retrain with r<={max_lora_rank} or start the server with --max-lora-rank {max(ranks)}")
    if cfg.get("use_dora"):
        raise FailedPrecondition(f"adapter {path} is a DoRA adapter (use_dora=true), which vLLM cannot serve; "
                                 "retrain with use_dora=False")

    # Modules.
    servable = frozenset(servable_modules) if servable_modules is not None else \
        default_servable_modules(base_model_id or (manifest or {}).get("base_model_id") or cfg_base)
    if cfg.get("modules_to_save"):
        raise FailedPrecondition(
            f"adapter {path} sets modules_to_save={cfg['modules_to_save']!r} (full copies of layers), which vLLM "
            "cannot serve; retrain without modules_to_save")
    if cfg.get("target_parameters"):
        for p in cfg["target_parameters"]:
            if (problem := _module_problem(str(p), servable)) is not None:
                raise FailedPrecondition(f"adapter {path} targets parameter {problem}")
    target_modules = cfg.get("target_modules") or []
    if isinstance(target_modules, str):
        target_list = [target_modules]  # a regex; the tensor names below are checked instead
    else:
        target_list = list(target_modules)
        for m in target_list:
            if (problem := _module_problem(str(m), servable)) is not None:
                raise FailedPrecondition(f"adapter {path} targets {problem}")
    # Layer indices collapsed: "model.layers.*.self_attn.q_proj".
    modules = sorted({re.sub(r"\.\d+(?=\.|$)", ".*", _strip_prefix(m)) for m in _tensor_modules(tensors)})
    for m in modules:
        if (problem := _module_problem(m, servable)) is not None:
            raise FailedPrecondition(f"adapter {path} has weights for {problem}")
    if base_shapes is not None:
        _check_shapes(path, tensors, base_shapes)

    return {
        "peft_type": peft_type,
        "rank": rank,
        "alpha": cfg.get("lora_alpha"),
        "target_modules": sorted(target_list) if not isinstance(target_modules, str) else target_modules,
        "modules": modules,
        "base_model_name_or_path": cfg_base,
        "tensors": len(tensors),
        "files": files,
    }
