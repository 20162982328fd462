"""Adapter registry, validation and CLI: real PEFT adapters on the real SmolLM2 base, real files, real processes.

No mocks. The one hook is in the crash test: a child process replaces `os.replace` with `os._exit` to die
at the exact instant between writing the new aliases file and renaming it into place; there is no other
way to crash a real process at that precise point deterministically.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from concurrent import futures
from pathlib import Path

import pytest

from core.errors import FailedPrecondition, InvalidArgument, NotFound

ROOT = Path(__file__).resolve().parents[1]
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


# --------------------------------------------------------------------------------------------- fixtures

def _build(base_dir: Path, out: Path, kind: str = "lora", seed: int = 0, **cfg) -> Path:
    """Save a real peft adapter of `kind` ("lora" or "ia3") trained on nothing, for the base in base_dir."""
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if kind == "ia3":
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    else:
        config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                               "init_lora_weights": False, **cfg})
    get_peft_model(model, config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def base(model_dir):
    from basemodel import fingerprint

    return model_dir, fingerprint(model_dir)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, base):
    import torch

    torch.set_num_threads(1)
    model_dir, _ = base
    d = tmp_path_factory.mktemp("peft")
    return {
        "good": _build(model_dir, d / "good", seed=1),
        "mlp": _build(model_dir, d / "mlp", seed=2, target_modules=["q_proj", "v_proj", "down_proj"]),
        "rank64": _build(model_dir, d / "rank64", seed=3, r=64, lora_alpha=128),
        "embed": _build(model_dir, d / "embed", seed=4, target_modules=["q_proj", "embed_tokens"]),
        "mts": _build(model_dir, d / "mts", seed=5, modules_to_save=["lm_head"]),
        "ia3": _build(model_dir, d / "ia3", kind="ia3"),
    }


@pytest.fixture()
def registry(tmp_path):
    from adapters.registry import Registry

    return Registry(tmp_path / "registry")


def _register(reg, task, peft_dir, fp, **kw):
    return reg.register(task, peft_dir, base_model_id=BASE_ID, base_fingerprint=fp, **kw)


# ------------------------------------------------------------------------------------------- registry

def test_register_versions_and_manifest(registry, adapters_dir, base):
    from adapters.validation import sha256_file

    _, fp = base
    v1 = _register(registry, "code", adapters_dir["good"], fp, data_fingerprint="sha256:data1",
                   metrics={"eval_loss": 1.5})
    v2 = _register(registry, "code", adapters_dir["mlp"], fp, parent="1")
    assert (v1.version, v2.version) == ("1", "2")
    assert (v1.name, v2.name) == ("code@1", "code@2")
    assert v1.path == registry.root / "code" / "1" and v1.path.is_dir()
    m = json.loads((v1.path / "manifest.json").read_text())
    assert m["task"] == "code" and m["version"] == "1" and m["base_model_id"] == BASE_ID
    assert m["base_fingerprint"] == fp and m["rank"] == 8 and m["alpha"] == 16
    assert m["target_modules"] == ["q_proj", "v_proj"] and v1.target_modules == ["q_proj", "v_proj"]
    assert m["data_fingerprint"] == "sha256:data1" and m["metrics"] == {"eval_loss": 1.5}
    assert m["parent"] is None and v2.manifest["parent"] == "1" and m["created_at"].endswith("Z")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert m["files"][name] == sha256_file(v1.path / name)
    assert sorted(v2.target_modules) == ["down_proj", "q_proj", "v_proj"]
    assert [v.version for v in registry.versions("code")] == ["1", "2"]
    assert registry.get("code", 2) == v2 and registry.tasks() == ["code"]
    assert not [p for p in (registry.root / "code").iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(NotFound, match="known versions: 1, 2"):
        registry.get("code", "3")
    with pytest.raises(NotFound, match="parent|not in the registry"):
        _register(registry, "code", adapters_dir["good"], fp, parent="9")
    with pytest.raises(InvalidArgument, match="fingerprint"):
        registry.register("code", adapters_dir["good"], base_model_id=BASE_ID, base_fingerprint="smollm2")
    assert registry.production("code") is None and registry.candidate("code") is None
    v1.validate(base_fingerprint=fp, max_lora_rank=8)  # a registered version validates against its manifest


def test_aliases_history_generation_and_rollback_target(registry, adapters_dir, base):
    _, fp = base
    for _ in range(3):
        _register(registry, "code", adapters_dir["good"], fp)
    assert registry.generation() == 0
    registry.set_alias("code", "candidate", "1", reason="eval passed", actor="ci")
    for v in ("1", "2", "3"):
        registry.set_alias("code", "production", v, reason=f"deploy {v}")
    assert registry.generation() == 4
    assert registry.production("code").version == "3" and registry.candidate("code").version == "1"
    assert json.loads((registry.root / "code" / "aliases.json").read_text()) == {"candidate": "1", "production": "3"}
    hist = registry.history("code")
    assert [(h["alias"], h["from"], h["to"]) for h in hist] == [
        ("candidate", None, "1"), ("production", None, "1"), ("production", "1", "2"), ("production", "2", "3")]
    assert hist[0]["actor"] == "ci" and hist[0]["reason"] == "eval passed" and hist[0]["time"]
    registry.set_alias("code", "production", "3")  # no-op: nothing recorded, generation unchanged
    assert len(registry.history("code")) == 4 and registry.generation() == 4

    # Rollbacks walk back down the stack of production versions: 3 -> 2 -> 1, then nothing.
    assert registry.previous_production("code").version == "2"
    registry.set_alias("code", "production", "2", reason="rollback")
    assert registry.previous_production("code").version == "1"
    registry.set_alias("code", "production", "1", reason="rollback")
    assert registry.previous_production("code") is None
    # Retire clears production; a rollback after it brings the retired version back.
    registry.set_alias("code", "production", "3")
    registry.set_alias("code", "production", None, reason="retire")
    assert registry.production("code") is None and registry.previous_production("code").version == "3"
    assert registry.generation() == 8

    with pytest.raises(InvalidArgument, match="unknown alias"):
        registry.set_alias("code", "staging", "1")
    with pytest.raises(NotFound):
        registry.set_alias("code", "production", "7")
    # another Registry object (as in another process) sees the same state
    from adapters.registry import Registry

    other = Registry(registry.root)
    assert other.generation() == 8 and other.candidate("code").name == "code@1"


def test_alias_switch_crash_leaves_old_alias(registry, adapters_dir, base):
    _, fp = base
    _register(registry, "code", adapters_dir["good"], fp)
    _register(registry, "code", adapters_dir["good"], fp)
    registry.set_alias("code", "production", "1")
    # The hook (see module docstring): die between fsync of the new file and os.replace.
    child = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from adapters.registry import Registry
        os.replace = lambda *a, **k: os._exit(17)
        Registry({str(registry.root)!r}).set_alias("code", "production", "2", reason="crash")
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert r.returncode == 17, r.stderr
    assert registry.production("code").version == "1"  # the old alias survives the crash
    assert [h["to"] for h in registry.history("code")] == ["1"] and registry.generation() == 1
    def strays():
        return [p.name for p in (registry.root / "code").iterdir() if p.name.endswith(".tmp")]

    assert strays()  # the dead writer's temporary aliases file
    # the dead process released its lock; the next switch works and removes the stray tmp file
    registry.set_alias("code", "production", "2")
    assert registry.production("code").version == "2" and registry.generation() == 2
    assert strays() == []


def test_register_crash_leaves_no_version_and_is_swept(registry, adapters_dir, base):
    """A process killed between copying a version and renaming it into place: no half version is visible, and
    the next register of that task removes the leftover copy."""
    _, fp = base
    _register(registry, "code", adapters_dir["good"], fp)
    child = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from adapters.registry import Registry
        os.rename = lambda *a, **k: os._exit(18)
        Registry({str(registry.root)!r}).register("code", {str(adapters_dir["good"])!r}, base_model_id={BASE_ID!r},
                                                  base_fingerprint={fp!r})
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert r.returncode == 18, r.stderr

    def leftovers():
        return [p.name for p in (registry.root / "code").iterdir() if p.name.startswith(".tmp-")]

    assert leftovers() and [v.version for v in registry.versions("code")] == ["1"]
    v2 = _register(registry, "code", adapters_dir["good"], fp)
    assert v2.version == "2" and leftovers() == []


def test_concurrent_register_from_processes_serializes(registry, adapters_dir, base):
    _, fp = base
    go = registry.root.parent / "go"
    child = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from adapters.registry import Registry
        reg = Registry({str(registry.root)!r})
        deadline = time.monotonic() + 60  # start barrier: the parent creates `go` once all children run
        while not Path({str(go)!r}).exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        v = reg.register("code", {str(adapters_dir["good"])!r}, base_model_id="b", base_fingerprint={fp!r})
        reg.set_alias("code", "candidate", v.version)
        print(v.version)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert sorted(o.strip() for o, _ in outs) == ["1", "2", "3", "4"]
    assert [v.version for v in registry.versions("code")] == ["1", "2", "3", "4"]
    for v in registry.versions("code"):
        v.validate(base_fingerprint=fp)  # every version complete and intact
    assert len(registry.history("code")) == 4 and registry.generation() == 4
    assert not [p for p in (registry.root / "code").iterdir() if p.name.startswith(".tmp")]


# ----------------------------------------------------------------------------------------- validation

def test_validation_failures(registry, adapters_dir, base, tmp_path):
    from adapters.validation import GPT_OSS_SERVABLE_MODULES as GPT_OSS
    from adapters.validation import validate_adapter

    _, fp = base
    info = validate_adapter(adapters_dir["good"], max_lora_rank=8)
    assert info["rank"] == 8 and "model.layers.*.self_attn.q_proj" in info["modules"]

    with pytest.raises(FailedPrecondition, match="peft_type 'IA3'.*only LoRA"):
        validate_adapter(adapters_dir["ia3"])
    with pytest.raises(FailedPrecondition, match="rank 64 above the server's max_lora_rank 16.*--max-lora-rank 64"):
        validate_adapter(adapters_dir["rank64"], max_lora_rank=16)
    with pytest.raises(FailedPrecondition, match="embed_tokens"):
        validate_adapter(adapters_dir["embed"])
    with pytest.raises(FailedPrecondition, match="modules_to_save"):
        validate_adapter(adapters_dir["mts"])
    # down_proj in a dense MLP is fine on SmolLM2, refused for GPT-OSS (attention only by default)
    validate_adapter(adapters_dir["mlp"])
    with pytest.raises(FailedPrecondition, match="down_proj.*not a module the engine can serve"):
        validate_adapter(adapters_dir["mlp"], servable_modules=GPT_OSS)
    validate_adapter(adapters_dir["good"], servable_modules=GPT_OSS)
    # without a manifest fingerprint, the base is compared by name as a fallback
    with pytest.raises(FailedPrecondition, match="the server runs 'openai/gpt-oss-20b'"):
        validate_adapter(adapters_dir["good"], base_model_id="openai/gpt-oss-20b")
    # GPT-OSS expert weights (peft target_parameters on mlp.experts) are refused unless allowed
    experts = tmp_path / "experts"
    shutil.copytree(adapters_dir["good"], experts)
    cfg = json.loads((experts / "adapter_config.json").read_text())
    cfg["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    (experts / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FailedPrecondition, match="MoE expert weight"):
        validate_adapter(experts, servable_modules=GPT_OSS)
    validate_adapter(experts, servable_modules=["q_proj", "v_proj", "experts"])
    # missing files
    missing = tmp_path / "missing"
    shutil.copytree(adapters_dir["good"], missing)
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(FailedPrecondition, match="no adapter_model.safetensors"):
        validate_adapter(missing)
    (missing / "adapter_config.json").unlink()
    with pytest.raises(FailedPrecondition, match="no adapter_config.json"):
        validate_adapter(missing)
    # truncated weights: a tensor's byte range runs past the end of the file
    trunc = tmp_path / "trunc"
    shutil.copytree(adapters_dir["good"], trunc)
    w = trunc / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(FailedPrecondition, match="spans bytes .* truncated or corrupt"):
        validate_adapter(trunc)
    w.write_bytes(b"\x07")
    with pytest.raises(FailedPrecondition, match="too short"):
        validate_adapter(trunc)
    # register validates first: nothing is written for a bad adapter
    with pytest.raises(FailedPrecondition, match="only LoRA"):
        _register(registry, "code", adapters_dir["ia3"], fp)
    with pytest.raises(FailedPrecondition, match="rank 64"):
        _register(registry, "code", adapters_dir["rank64"], fp, max_lora_rank=32)
    assert registry.versions("code") == []


def test_registered_version_tamper_and_base_mismatch(registry, adapters_dir, base):
    from adapters.validation import validate_adapter

    _, fp = base
    av = _register(registry, "code", adapters_dir["good"], fp)
    av.validate(base_fingerprint=fp)
    # same name, different weights: refused by fingerprint
    other_fp = "sha256:" + "0" * 64
    with pytest.raises(FailedPrecondition, match="trained on base weights sha256:3|trained on base weights"):
        validate_adapter(av.path, base_fingerprint=other_fp, base_model_id=BASE_ID, manifest=av.manifest)
    # tampering after register: sha256 mismatch names the file
    cfg = av.path / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"r": 8', '"r": 4'))
    with pytest.raises(FailedPrecondition, match="adapter_config.json does not match its manifest sha256"):
        av.validate(base_fingerprint=fp)
    with pytest.raises(FailedPrecondition, match="adapter_config.json does not match"):
        registry.get("code", "1").validate()  # manifest.json is read from the folder too
    w = av.path / "adapter_model.safetensors"
    (av.path / "extra.bin").write_bytes(b"x")
    (av.path / "adapter_config.json").write_text((adapters_dir["good"] / "adapter_config.json").read_text())
    with pytest.raises(FailedPrecondition, match="not in its manifest: extra.bin"):
        av.validate()
    (av.path / "extra.bin").unlink()
    w.unlink()
    with pytest.raises(FailedPrecondition, match="no adapter_model.safetensors"):
        av.validate()


@pytest.mark.parametrize("task", ["../evil", "a/b", "..", "Code", "", "x" * 65, "-x", "co de", "/abs", "code\n"])
def test_bad_task_names_refused(registry, task):
    with pytest.raises(InvalidArgument, match="invalid task name"):
        registry.get(task, "1")
    with pytest.raises(InvalidArgument):
        registry.set_alias(task, "production", None)


@pytest.mark.parametrize("version", ["../1", "0", "01", "1.0", "-1", "v1", "", "1/../../x", True])
def test_bad_versions_refused(registry, version):
    with pytest.raises(InvalidArgument, match="invalid version"):
        registry.get("code", version)


def test_symlinked_task_escaping_root_refused(registry, tmp_path):
    from adapters.validation import safe_join

    registry.root.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (registry.root / "code").symlink_to(tmp_path / "outside")
    with pytest.raises(InvalidArgument, match="escapes the registry root"):
        registry.get("code", "1")
    with pytest.raises(InvalidArgument, match="escapes"):
        safe_join(registry.root, "..", "x")


# ------------------------------------------------------------------------------------------------- CLI

def test_cli_register_list_promote_show(tmp_path, adapters_dir, base, capsys):
    from cli import main

    model_dir, fp = base
    reg = str(tmp_path / "reg")
    common = ["--registry", reg]
    assert main(["adapters", "register", "code", str(adapters_dir["good"]), "--base-model", str(model_dir),
                 "--metrics", '{"eval_loss": 1.25}', "--alias", "candidate", *common]) == 0
    assert "registered code@1" in capsys.readouterr().out
    assert main(["adapters", "register", "code", str(adapters_dir["mlp"]), "--base-model", str(model_dir),
                 "--parent", "1", "--json", *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "code@2" and out["manifest"]["base_fingerprint"] == fp
    assert out["manifest"]["base_model_id"] == BASE_ID
    assert main(["adapters", "promote", "code", "2", "--alias", "production", *common]) == 0
    capsys.readouterr()

    assert main(["adapters", "list", "--json", *common]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tasks"] == [{"task": "code", "production": "2", "candidate": "1", "versions": ["1", "2"]}]
    assert data["generation"] == 2
    assert main(["adapters", "list", *common]) == 0
    table = capsys.readouterr().out
    assert "code" in table and "production" in table and "1, 2" in table

    assert main(["adapters", "show", "code", "--json", *common]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["aliases"] == {"production": "2", "candidate": "1"}
    assert [h["reason"] for h in shown["history"]] == ["register", "promote"]
    assert main(["adapters", "show", "code", "1", "--json", *common]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["manifest"]["metrics"] == {"eval_loss": 1.25} and one["aliases"] == ["candidate"]
    assert main(["adapters", "show", "code", "1", *common]) == 0
    assert "code@1" in capsys.readouterr().out

    # user-fixable errors: one line, exit status 2
    assert main(["adapters", "show", "code", "9", *common]) == 2
    assert "known versions: 1, 2" in capsys.readouterr().err
    assert main(["adapters", "register", "../x", str(adapters_dir["good"]), "--base-model", str(model_dir),
                 *common]) == 2
    assert "invalid task name" in capsys.readouterr().err
    assert main(["adapters", "register", "code", str(adapters_dir["ia3"]), "--base-model", str(model_dir),
                 *common]) == 2
    assert "only LoRA" in capsys.readouterr().err
    assert main(["adapters", "promote", "code", "none", "--alias", "candidate", *common]) == 0
    assert main(["adapters", "validate", str(adapters_dir["rank64"]), "--max-lora-rank", "16"]) == 2
    assert "rank 64" in capsys.readouterr().err


def test_cli_gateway_commands_over_real_grpc(capsys):
    """deploy/rollback/retire/loaded against a real gRPC AdminService on loopback (a stand-in servicer)."""
    import grpc

    from cli import main
    from router.v1 import router_pb2, router_pb2_grpc

    seen = []

    class Admin(router_pb2_grpc.AdminServiceServicer):
        def DeployAdapter(self, request, context):
            seen.append(("deploy", request.task, request.version, dict(context.invocation_metadata())))
            if request.task == "nope":
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "task 'nope' has no candidate version")
            return router_pb2.DeployAdapterResponse(task=request.task, version=request.version or "3",
                                                    adapter=f"{request.task}@{request.version or '3'}",
                                                    previous_version="2", swap_ms=12.5)

        def RollbackAdapter(self, request, context):
            seen.append(("rollback", request.task))
            return router_pb2.RollbackAdapterResponse(task=request.task, version="2", adapter=f"{request.task}@2")

        def RetireAdapter(self, request, context):
            seen.append(("retire", request.task))
            return router_pb2.RetireAdapterResponse(task=request.task, previous_version="2")

        def ListAdapters(self, request, context):
            return router_pb2.ListAdaptersResponse(
                adapters=[router_pb2.AdapterInfo(name="code@2", path="/r/code/2", task="code", version="2",
                                                 routed=True)],
                routes=[router_pb2.RouteEntry(task="code", adapter="code@2")])

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    router_pb2_grpc.add_AdminServiceServicer_to_server(Admin(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        gw = ["--gateway", f"127.0.0.1:{port}", "--token", "s3cret", "--timeout", "30"]
        assert main(["adapters", "deploy", "code", *gw]) == 0
        assert "deployed code@3" in capsys.readouterr().out
        assert seen[-1][:3] == ("deploy", "code", "") and seen[-1][3]["authorization"] == "Bearer s3cret"
        assert main(["adapters", "deploy", "code", "4", "--json", *gw]) == 0
        assert json.loads(capsys.readouterr().out)["adapter"] == "code@4"
        assert main(["adapters", "rollback", "code", *gw]) == 0
        assert "code@2" in capsys.readouterr().out
        assert main(["adapters", "retire", "code", "--json", *gw]) == 0
        assert json.loads(capsys.readouterr().out)["previous_version"] == "2"
        assert main(["adapters", "loaded", "--json", *gw]) == 0
        assert json.loads(capsys.readouterr().out)["routes"] == {"code": "code@2"}
        assert main(["adapters", "deploy", "nope", *gw]) == 2
        assert "no candidate version" in capsys.readouterr().err
    finally:
        server.stop(None)
    # unreachable is not the user's fault: exit status 1 (a ServiceError), still one line that says what to do
    assert main(["adapters", "deploy", "code", "--gateway", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
    assert "cannot reach the gateway" in capsys.readouterr().err
