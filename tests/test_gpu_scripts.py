"""scripts/install.sh --gpu and scripts/gpu-check.sh on a host without CUDA (this one and CI): they say so, exit
with status 3 and change nothing; the CPU install's up-to-date stamp still short-circuits."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# what the scripts run before they decide; nvidia-smi is not among them
TOOLS = ("bash", "env", "cat", "sha256sum", "cut", "dirname", "sed", "grep", "head", "tail", "timeout", "mktemp", "rm",
         "ls", "tr", "python3")


@pytest.fixture(scope="module")
def path_without_nvidia_smi(tmp_path_factory) -> str:
    """A PATH with the tools the scripts use and no nvidia-smi: this host as the scripts see it on a machine
    without an NVIDIA driver (so the test means the same on a GPU machine)."""
    d = tmp_path_factory.mktemp("bin")
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is needed by the install scripts"
        (d / tool).symlink_to(found)
    return str(d)


def _run(args: list[str], path: str, **env) -> subprocess.CompletedProcess:
    # pip gets no package source: were a script to go past the point these tests expect, it could not install
    # anything (the stamp test's venv shares the project's installed packages)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**base, "PATH": path, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, **env})


def _tree(path: Path) -> dict:
    """Every file under path with its size, mtime and content hash (symlinks: their target)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(path))] = ("link", os.readlink(p))
        elif p.is_file():
            st = p.stat()
            out[str(p.relative_to(path))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture
def installed_venv(tmp_path) -> Path:
    """A venv folder whose interpreter and packages are the project's installed .venv (linked, not copied), with the
    CPU install's stamp for the current pyproject.toml + scripts/install.sh: what a finished CPU install leaves."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    src = Path(sys.prefix)
    shutil.copy2(src / "pyvenv.cfg", venv / "pyvenv.cfg")
    (venv / "bin" / "python").symlink_to(os.path.realpath(sys.executable))
    rel = Path(sysconfig.get_path("purelib")).relative_to(src)
    (venv / rel).parent.mkdir(parents=True)
    (venv / rel).symlink_to(src / rel)
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "scripts/install.sh").read_bytes())
    (venv / ".install-stamp").write_text(want.hexdigest()[:16] + "\n")
    return venv


def test_install_gpu_refuses_a_host_without_cuda_before_creating_anything(tmp_path, path_without_nvidia_smi):
    venv = tmp_path / "new-venv"
    r = _run(["scripts/install.sh", "--gpu"], path_without_nvidia_smi, VENV=str(venv))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "--gpu needs a CUDA host" in r.stderr and "nvidia-smi" in r.stderr and "Nothing was installed" in r.stderr
    assert "scripts/install.sh without --gpu" in r.stderr  # what to do instead
    assert not venv.exists()


def test_install_gpu_leaves_an_existing_venv_untouched(installed_venv, path_without_nvidia_smi):
    before = _tree(installed_venv)
    r = _run(["scripts/install.sh", "--gpu"], path_without_nvidia_smi, VENV=str(installed_venv))
    assert r.returncode == 3 and "needs a CUDA host" in r.stderr, r.stdout + r.stderr
    assert _tree(installed_venv) == before


def test_cpu_install_stamp_still_short_circuits(installed_venv, path_without_nvidia_smi):
    """The README's first command: an installed, stamped venv is left as it is (no pip run)."""
    before = _tree(installed_venv)
    r = _run(["scripts/install.sh"], path_without_nvidia_smi, VENV=str(installed_venv))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"[install] up to date ({installed_venv})"
    assert _tree(installed_venv) == before


def test_install_refuses_unknown_options(tmp_path, path_without_nvidia_smi):
    r = _run(["scripts/install.sh", "--cuda"], path_without_nvidia_smi, VENV=str(tmp_path / "v"))
    assert r.returncode == 2 and "unknown option '--cuda'" in r.stderr and "[--gpu]" in r.stderr
    assert not (tmp_path / "v").exists()


def test_gpu_check_says_there_is_no_cuda_and_exits_3(tmp_path, path_without_nvidia_smi):
    r = _run(["scripts/gpu-check.sh"], path_without_nvidia_smi, TMPDIR=str(tmp_path))
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout == ""
    assert "[gpu-check] no CUDA GPU on this host" in r.stderr and "Nothing was run" in r.stderr
    assert "scripts/install.sh --gpu" in r.stderr
    assert list(tmp_path.iterdir()) == []  # no data dir, no run
    r = _run(["scripts/gpu-check.sh", "--device", "cpu"], path_without_nvidia_smi)
    assert r.returncode == 2 and "--device must be cuda or cuda:N" in r.stderr
    r = _run(["scripts/gpu-check.sh", "--steps"], path_without_nvidia_smi)
    assert r.returncode == 2 and "--steps needs a value" in r.stderr
