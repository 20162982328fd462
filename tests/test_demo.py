"""`specialist-router demo` (what `scripts/run.sh` runs) and the code specialist it ships (`cli/demo_specialist/`).

Real parts only: the shipped adapter trained by `specialist-router train` on real ShareGPT conversations, the real
adapter registry, the real base model folder, and the demo itself as `python -m cli demo --once` in a subprocess
(its own managed vLLM and gateway) on a fresh data dir, run twice.
"""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import basemodel
import classifier
from adapters.registry import Registry
from adapters.validation import MANIFEST_FILE, WEIGHTS_FILE, validate_adapter
from cli import demo, main
from core.errors import FailedPrecondition
from core.files import sha256_file

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = demo.SPECIALIST_DIR


# ------------------------------------------------------------------------------ the shipped specialist


def test_shipped_specialist_is_the_promoted_output_of_its_training_run():
    """report.json, registry-manifest.json and the weights belong to one run whose gate passed; the folder is small."""
    report = json.loads((SHIPPED / "report.json").read_text())
    m = demo.shipped_manifest()
    assert report["status"] == "promoted" and report["adapter"] == m["name"] == f"{m['task']}@{m['version']}"
    assert report["gate"]["passed"] is True
    assert m["metrics"]["eval_loss"] == report["gate"]["candidate_loss"] < report["gate"]["base_loss"]
    assert m["metrics"]["forgetting"] == report["gate"]["forgetting"] <= report["config"]["forgetting_bound"]
    assert m["base_fingerprint"] == report["base_fingerprint"]
    assert m["data_fingerprint"] and m["metrics"]["train_records"] == report["data"]["train"]
    assert m["metrics"]["steps"] == report["train"]["steps"] == report["config"]["max_steps"]
    assert report["config"]["sources"] == [] and report["config"]["task"] == m["task"] == "code"
    for name in demo.SPECIALIST_FILES:
        assert m["files"][name] == sha256_file(SHIPPED / name), f"{name} is not the file the run registered"
    size = sum((SHIPPED / n).stat().st_size for n in demo.SPECIALIST_FILES)
    assert size < 5 * 2**20, f"the shipped PEFT files are {size / 2**20:.1f} MiB"
    assert (SHIPPED / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = (SHIPPED / "REPRODUCE.md").read_text()
    assert "logs import sharegpt --limit" in steps and f"--seed {report['config']['seed']}" in steps


def test_registering_the_shipped_specialist_checks_out_and_happens_once(tmp_path, model_dir, capsys):
    reg = Registry(tmp_path / "registry")
    m = demo.shipped_manifest()
    v, registered = demo.ensure_specialist(reg, model_dir)
    assert registered and v.name == f"{m['task']}@1"
    assert v.manifest["base_fingerprint"] == basemodel.fingerprint(model_dir) == m["base_fingerprint"]
    assert v.manifest["files"][WEIGHTS_FILE] == m["files"][WEIGHTS_FILE]
    assert (v.manifest["data_fingerprint"], v.manifest["metrics"]) == (m["data_fingerprint"], m["metrics"])
    assert sorted(p.name for p in v.path.iterdir()) == sorted([*demo.SPECIALIST_FILES, MANIFEST_FILE])

    # `adapters validate` on the registered version: every file against its manifest sha256, and the base fingerprint
    assert main(["adapters", "validate", str(v.path), "--model", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["rank"], sorted(info["target_modules"])) == (m["rank"], sorted(m["target_modules"]))
    assert info["files"][WEIGHTS_FILE] == m["files"][WEIGHTS_FILE]
    # the check a deploy runs refuses it on other base weights
    with pytest.raises(FailedPrecondition, match="trained on base weights"):
        validate_adapter(v.path, base_fingerprint="sha256:" + "0" * 64)

    # a second run finds it: no second copy
    again, registered = demo.ensure_specialist(reg, model_dir)
    assert not registered and again == v
    assert [x.version for x in reg.versions(m["task"])] == ["1"]


def test_shipped_specialist_is_refused_on_another_base(tmp_path):
    other = tmp_path / "other-base"
    other.mkdir()
    _write_safetensors(other / "model.safetensors")  # another folder of weights: another fingerprint
    reg = Registry(tmp_path / "registry")
    with pytest.raises(FailedPrecondition, match="only runs on the embedded default"):
        demo.ensure_specialist(reg, other)
    assert reg.tasks() == []


# ------------------------------------------------------------------------------ the demo, end to end


@pytest.mark.vllm
def test_demo_once_routes_a_code_prompt_to_the_shipped_specialist_and_registers_it_once(tmp_path, model_dir):
    """First run on a fresh data dir: register + deploy, the routed answer comes from the specialist (reason
    specialist) beside the base model's; second run: nothing registered again, the specialist still answers."""
    home = tmp_path / "home"
    task = demo.shipped_manifest()["task"]
    name = f"{task}@1"
    clf = classifier.ensure_default()  # the session's default classifier (same seed set): not rebuilt per run

    first = _demo(home, model_dir, clf)
    out = first.stdout
    assert first.returncode == 0, out[-3000:] + first.stderr[-3000:]
    assert f"registry: registered now as {name}" in out
    assert f"deploy: {name} validated, hot-loaded into the running vLLM and routed for {task}" in out
    routed, base = _answers(out)
    assert re.search(rf"route: task={task} confidence=0\.\d\d reason=specialist adapter={re.escape(name)}\n", out), out
    assert routed["adapter"] == name and base["adapter"] == "base"
    assert routed["text"] and base["text"] and routed["text"] != base["text"]
    assert "the classifier sent the prompt to " + name in out

    second = _demo(home, model_dir, clf)
    out2 = second.stdout
    assert second.returncode == 0, out2[-3000:] + second.stderr[-3000:]
    assert f"registry: already holds it as {name}" in out2 and f"deploy: {name} already serves {task}" in out2
    assert re.search(rf"reason=specialist adapter={re.escape(name)}\n", out2), out2
    assert _answers(out2) == (routed, base)  # greedy decoding: the same answers again
    assert [v.version for v in Registry(home / "adapters").versions(task)] == ["1"]


def _demo(home: Path, model_dir: Path, clf: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPECIALIST_ROUTER_HOME": str(home), "VLLM_NO_USAGE_STATS": "1"}
    return subprocess.run([sys.executable, "-m", "cli", "demo", "--once", "--model", str(model_dir),
                           "--classifier-path", str(clf), "--port", "0", "--no-http"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)


def _answers(out: str) -> tuple[dict, dict]:
    """The routed answer and the base model's answer as the demo printed them: {adapter, text}."""
    blocks = re.findall(r"^--- (routed answer|base model answer)[^\n]*?: adapter=(\S+)[^\n]*\n(.*?)(?=^--- |^the "
                        r"classifier|^\n=== )", out, flags=re.M | re.S)
    got = {kind: {"adapter": adapter, "text": text.strip()} for kind, adapter, text in blocks}
    assert set(got) == {"routed answer", "base model answer"}, out
    return got["routed answer"], got["base model answer"]


def _write_safetensors(path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0))
