"""Config precedence, base model provisioning and the CLI's error handling (no vLLM needed)."""
from __future__ import annotations

import shutil

import pytest

from basemodel import ModelError, fingerprint, prepare, verify
from cli import main
from router import config


def test_config_precedence_defaults_file_env_flags(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("port: 6000\nbackend: {max_loras: 2, max_cpu_loras: 4}\nlogs: {pii: mask}\n")
    assert config.load(None).port == 50051
    assert config.load(f).port == 6000
    monkeypatch.setenv("SPECIALIST_ROUTER__PORT", "7000")
    monkeypatch.setenv("SPECIALIST_ROUTER__BACKEND__MAX_LORAS", "3")
    cfg = config.load(f)
    assert (cfg.port, cfg.backend.max_loras, cfg.backend.max_cpu_loras, cfg.logs.pii) == (7000, 3, 4, "mask")
    assert config.load(f, {"port": 8000}).port == 8000


@pytest.mark.parametrize("text,fragment", [
    ("bogus: 1\n", "unknown setting 'bogus'"),
    ("backend: {mode: cloud}\n", "backend.mode"),
    ("backend: {mode: external}\n", "backend.url"),
    ("backend: {max_lora_rank: 7}\n", "max_lora_rank"),
    ("port: abc\n", "cannot read 'abc'"),
    ("classifier: {threads: -1}\n", "classifier.threads must be >= 0"),
    ("backend: {url: 'http://a:8000', urls: ['http://b:8000']}\n", "list every replica in backend.urls"),
    ("backend: {urls: ['gpu-1:8000']}\n", "is not an http(s):// URL"),
    ("backend: {urls: ['http://a:8000', 'http://a:8000']}\n", "same replica twice"),
    ("backend: {replicas: 0}\n", "backend.replicas must be >= 1"),
    ("backend: {replicas: 2, urls: ['http://a:8000']}\n", "list their URLs in backend.urls"),
    ("backend: {adapter_slots: -1}\n", "backend.adapter_slots"),
    ("backend: {balance: random}\n", "backend.balance"),
    ("[1, 2]\n", "mapping"),
])
def test_bad_config_says_what_to_fix(tmp_path, text, fragment):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(f)
    assert fragment in str(e.value)


def test_model_prepare_is_idempotent_and_verified(model_dir):
    assert prepare() == model_dir  # second call: verified, no rebuild
    m = verify(model_dir)
    assert m["fingerprint"].startswith("sha256:") and fingerprint(model_dir) == m["fingerprint"]
    assert (model_dir / "chat_template.jinja").is_file() or "chat_template" in (model_dir / "tokenizer_config.json").read_text()
    # the turn ends where the model says it does: EOS/PAD = <|im_end|> (the GGUF metadata says <|im_start|>)
    import json

    from basemodel import RECIPE

    assert m["recipe"] == RECIPE
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and gen["eos_token_id"] == 2
    assert tok_cfg.get("pad_token") == "<|im_end|>"


def test_model_folder_of_an_older_recipe_is_rebuilt(model_dir, tmp_path):
    """A folder made by an older conversion is rebuilt in place; its weights fingerprint does not change."""
    import json

    from basemodel import MANIFEST, RECIPE

    old = tmp_path / "model"
    shutil.copytree(model_dir, old)
    man = json.loads((old / MANIFEST).read_text())
    man["recipe"] = RECIPE - 1
    (old / MANIFEST).write_text(json.dumps(man))
    msgs = []
    assert prepare(old, progress=msgs.append) == old
    assert any("older conversion" in m for m in msgs)
    assert verify(old)["recipe"] == RECIPE and fingerprint(old) == fingerprint(model_dir)


def test_corrupt_or_partial_model_folder_is_refused(model_dir, tmp_path, capsys):
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    with open(bad / "model.safetensors", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\xff" * 16)
    with pytest.raises(ModelError, match="corrupt"):
        verify(bad)
    assert main(["model", "verify", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err
    (bad / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="missing"):
        verify(bad, deep=False)
    with pytest.raises(ModelError, match="does not exist"):
        verify(tmp_path / "nowhere")
