"""`train --device cuda:N`: the N-th GPU visible to the process (an inherited CUDA_VISIBLE_DEVICES is respected).

No GPU here: the tests check what a run would do, i.e. the CUDA_VISIBLE_DEVICES the training process gets, in
process (apply_device) and in real `python -m cli train` processes, and that a GPU device torch cannot see is
refused instead of silently training on the CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from training_fixtures import fill_store

from core.errors import ConfigError
from training import config as training_config
from training import device as gpu

VAR = "CUDA_VISIBLE_DEVICES"


@pytest.fixture
def no_memory(monkeypatch):
    """apply_device remembers what it set (for repeated calls); each test starts from a fresh process state."""
    monkeypatch.setattr(gpu, "_last", {})


def _env(**set_vars) -> dict:
    env = {k: v for k, v in os.environ.items() if k != VAR}
    env.update(set_vars)
    return env


def _apply_in_a_fresh_process(inherited: str | None, *steps) -> list:
    """apply_device(device) for each step in a new process (torch not loaded, as in `train`): for each, what
    it returned and the CUDA_VISIBLE_DEVICES the process then has. A step ("set", value) changes the variable."""
    code = ("import json, os, sys; from training.device import apply_device\n"
            "out = []\n"
            "for step in json.loads(sys.argv[1]):\n"
            "    if isinstance(step, list):\n"
            "        os.environ['CUDA_VISIBLE_DEVICES'] = step[1]; continue\n"
            "    out.append([apply_device(step), os.environ.get('CUDA_VISIBLE_DEVICES')])\n"
            "print(json.dumps([out, 'torch' in sys.modules]))")
    env = _env() if inherited is None else _env(**{VAR: inherited})
    r = subprocess.run([sys.executable, "-c", code, json.dumps(list(steps))], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out, torch_loaded = json.loads(r.stdout)
    assert torch_loaded is False
    return out


@pytest.mark.parametrize("inherited,device,expected", [
    (None, "cuda:0", "0"),           # nothing inherited: cuda:N is GPU N
    (None, "cuda:1", "1"),
    ("1", "cuda:0", "1"),            # the README's layout: vLLM on GPU 0, training on GPU 1
    ("2,3", "cuda:1", "3"),
    ("3,2", "cuda:0,1", "3,2"),
    ("GPU-5b1c,GPU-77aa", "cuda:1", "GPU-77aa"),  # UUIDs are entries like any other
    ("1, 2", "cuda:1", "2"),
    ("0,1", "cuda", "0,1"),          # cuda: all visible GPUs, unchanged
    (None, "cuda", None),
    ("1", "cpu", ""),                # cpu hides every GPU
])
def test_cuda_n_is_the_nth_visible_gpu(inherited, device, expected):
    assert gpu.resolve(device, inherited) == expected
    # the process gets it; a second call (a dry run, a second run in one process) does not narrow it again
    assert _apply_in_a_fresh_process(inherited, device, device) == [[expected, expected]] * 2


def test_repeated_and_changed_devices_resolve_against_the_inherited_list():
    steps = ["cuda:2", "cuda:1", "cuda", "cpu", "cuda:0", ["set", "7"], "cuda:0"]
    assert _apply_in_a_fresh_process("4,5,6", *steps) == [
        ["6", "6"], ["5", "5"],            # cuda:1 indexes the inherited 4,5,6, not the narrowed "6"
        ["4,5,6", "4,5,6"], ["", ""], ["4", "4"],
        ["7", "7"]]                        # someone else set it: that is the new inherited list


@pytest.mark.parametrize("inherited,device,words", [
    ("1", "cuda:1", ["only 1 GPU visible", "CUDA_VISIBLE_DEVICES=1: cuda:0 = GPU 1", "use --device cuda:0"]),
    ("2,3", "cuda:0,2", ["only 2 GPUs visible", "cuda:0 = GPU 2, cuda:1 = GPU 3", "cuda:0..cuda:1"]),
    ("", "cuda:0", ["hides every GPU", "--device cpu"]),
    ("-1", "cuda", ["hides every GPU"]),
    ("0,-1,1", "cuda:1", ["only 1 GPU visible"]),  # CUDA stops at the first invalid entry
    (None, "cuda:0,0", ["names a GPU twice"]),
    (None, "gpu:0", ["device must be cpu, cuda or cuda:N"]),
    (None, "cuda:x", ["device must be cpu, cuda or cuda:N"]),
])
def test_a_device_outside_the_inherited_list_is_refused(monkeypatch, no_memory, inherited, device, words):
    if inherited is None:
        monkeypatch.delenv(VAR, raising=False)
    else:
        monkeypatch.setenv(VAR, inherited)
    # refused when the config is loaded (before anything runs) and by apply_device itself
    for call in (lambda: training_config.load(None, {"task": "code", "device": device}),
                 lambda: gpu.apply_device(device)):
        with pytest.raises(ConfigError) as e:
            call()
        assert all(w in str(e.value) for w in words), str(e.value)
    assert os.environ.get(VAR) == inherited  # nothing was changed


def test_serving_gpus_are_refused_for_training(monkeypatch, no_memory):
    monkeypatch.setenv(VAR, "0,1")
    with pytest.raises(ConfigError, match=r"cuda:0 is GPU 0 .*serving_gpus names as a serving GPU"):
        training_config.load(None, {"task": "code", "device": "cuda:0", "serving_gpus": "0"})
    assert training_config.load(None, {"task": "code", "device": "cuda:1", "serving_gpus": "0"}).device == "cuda:1"
    monkeypatch.delenv(VAR)
    with pytest.raises(ConfigError, match="including serving_gpus"):  # every GPU of the host, the serving one too
        training_config.load(None, {"task": "code", "device": "cuda", "serving_gpus": "0"})
    monkeypatch.setenv(VAR, "1")  # the README's layout passes the check
    assert training_config.load(None, {"task": "code", "device": "cuda:0", "serving_gpus": "0"}).device == "cuda:0"
    assert training_config.load(None, {"task": "code", "device": "cpu", "serving_gpus": "0,1"}).device == "cpu"


def test_a_gpu_device_that_torch_cannot_see_is_an_error_not_a_cpu_run():
    """Real torch (the CPU build here): before, `--device cuda:0` on a host without a GPU trained on the CPU."""
    code = ("import os; from training.device import apply_device, use_cuda; apply_device('cuda:0'); "
            "from core.errors import ConfigError\n"
            "assert use_cuda('cpu') is False\n"
            "try:\n    use_cuda('cuda:0')\nexcept ConfigError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env(**{VAR: "1"}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--device cuda:0: torch" in r.stdout and "sees no GPU (CUDA_VISIBLE_DEVICES='1')" in r.stdout
    assert "scripts/install.sh --gpu" in r.stdout


def test_device_cannot_change_after_torch_loaded():
    code = ("import torch; from training.device import apply_device; from core.errors import ConfigError\n"
            "apply_device('cpu')\n"  # no GPU change: fine
            "try:\n    apply_device('cuda:0')\nexcept ConfigError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "must be applied before torch is imported" in r.stdout and "own process" in r.stdout


def _train(args: list[str], env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_dry_run_shows_the_gpu_the_run_gets():
    r = _train(["--task", "code", "--device", "cuda:0", "--dry-run"], _env(**{VAR: "1"}))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert (out["inherited_cuda_visible_devices"], out["cuda_visible_devices"], out["gpus"]) == ("1", "1", ["1"])
    assert out["torch_imported"] is False and out["config"]["device"] == "cuda:0"
    r = _train(["--task", "code", "--device", "cuda:1", "--dry-run"], _env(**{VAR: "0,2"}))
    assert json.loads(r.stdout)["cuda_visible_devices"] == "2"
    r = _train(["--task", "code", "--device", "cuda:1", "--dry-run"], _env())
    assert json.loads(r.stdout)["cuda_visible_devices"] == "1"
    # out of range, serving GPU: exit 2 and one line that says what to do, before anything runs
    r = _train(["--task", "code", "--device", "cuda:1", "--dry-run"], _env(**{VAR: "1"}))
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "only 1 GPU visible" in r.stderr
    r = _train(["--task", "code", "--device", "cuda:0", "--serving-gpus", "0", "--dry-run"], _env())
    assert r.returncode == 2 and "serving_gpus" in r.stderr and "Traceback" not in r.stderr


def test_train_cuda0_with_inherited_gpu1_reaches_torch_with_gpu1_only(tmp_path):
    """A real `train` process: data filtered, model loading; torch sees CUDA_VISIBLE_DEVICES=1 (physical GPU 1),
    and on this host without a GPU the run stops with exit 2 and one line instead of training on the CPU."""
    fill_store(tmp_path)
    args = ["--task", "math", "--device", "cuda:0", "--db", str(tmp_path / "logs.sqlite3"), "--registry",
            str(tmp_path / "registry"), "--run-dir", str(tmp_path / "run"), "--set", "min_records=4", "--set",
            "pii=off", "--set", "max_seq_len=128", "--no-progress"]
    r = _train(args, _env(**{VAR: "1"}), timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --device cuda:0: torch") and "sees no GPU (CUDA_VISIBLE_DEVICES='1')" in last
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed" and report["data"]["train"] > 0  # it got as far as training
