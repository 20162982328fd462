"""The client-only SDK (`sdk/`, distribution `specialist-router-client`): built into a fresh virtualenv it brings
only grpcio + protobuf (no torch, vLLM, transformers) and calls a real gateway over real gRPC."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = "specialist_router_client"
# what `pip install ./sdk` may bring into an empty venv: the SDK, grpcio and protobuf (+ grpcio's typing shim),
# and what `python -m venv` itself puts there
ALLOWED_DISTS = {"specialist-router-client", "grpcio", "protobuf", "typing-extensions", "pip", "setuptools"}


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="session")
def sdk_venv(tmp_path_factory, repo_root):
    """Starts building the SDK into a fresh venv in the background (it overlaps with the vLLM start), from a copy
    of exactly the files the SDK build reads, so the shared checkout is not written to."""
    work = tmp_path_factory.mktemp("sdk")
    src = work / "repo"
    shutil.copytree(repo_root / "sdk", src / "sdk", ignore=shutil.ignore_patterns("src", "build", "*.egg-info"))
    shutil.copytree(repo_root / "proto", src / "proto")
    (src / "router").mkdir()
    for name in ("__init__.py", "client.py", "client_types.py"):
        shutil.copy2(repo_root / "router" / name, src / "router" / name)
    venv = work / "venv"
    log = open(work / "build.log", "w")
    proc = subprocess.Popen(["bash", "-c", f'set -e; "{sys.executable}" -m venv "{venv}"; '
                                           f'"{venv}/bin/python" -m pip install -q "{src / "sdk"}"'],
                            stdout=log, stderr=subprocess.STDOUT, cwd=work, env=_clean_env())
    yield proc, venv, work
    if proc.poll() is None:
        proc.kill()
    log.close()


def _py(venv: Path, code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # cwd outside the checkout: the repository's own `router` package must not be importable by accident
    return subprocess.run([str(venv / "bin" / "python"), "-c", code, *args], capture_output=True, text=True,
                          timeout=180, cwd=cwd, env=_clean_env())


def test_client_only_install_calls_a_real_gateway(sdk_venv, gateway_factory, repo_root):
    proc, venv, work = sdk_venv
    gw = gateway_factory()  # real gateway (its own thread) on the session's real vLLM CPU server
    assert proc.wait(timeout=600) == 0, (work / "build.log").read_text()[-4000:]

    # 1) only grpcio + protobuf came along; the heavy stack is absent
    r = _py(venv, "import importlib.metadata as m, importlib.util as u, json; print(json.dumps(["
                  "sorted(d.metadata['Name'].lower().replace('_', '-') for d in m.distributions()), "
                  "{n: u.find_spec(n) is not None for n in ('torch', 'vllm', 'transformers', 'trl', 'router')}]))",
            work)
    assert r.returncode == 0, r.stderr
    dists, present = json.loads(r.stdout)
    assert set(dists) <= ALLOWED_DISTS and {"specialist-router-client", "grpcio", "protobuf"} <= set(dists), dists
    assert present == {"torch": False, "vllm": False, "transformers": False, "trl": False, "router": False}

    # 2) the installed client is router/client.py (+ client_types.py), only its imports pointed at the SDK package
    site = Path(_py(venv, f"import {PKG}, os; print(os.path.dirname({PKG}.__file__))", work).stdout.strip())
    for name in ("client.py", "client_types.py"):
        installed = (site / name).read_text()
        assert not re.search(r"^\s*(from router[. ]|import router\b)", installed, re.M)
        assert installed.replace(PKG, "router") == (repo_root / "router" / name).read_text()

    # 3) a real call over gRPC from that venv, and a typed error
    code = f"""
import json, sys
import grpc
from {PKG} import Client, GatewayError
with Client(sys.argv[1], timeout=180) as c:
    r = c.generate("Say hello in one word.", adapter="base", max_tokens=4)
    try:
        c.generate("hi", adapter="no-such-adapter", max_tokens=4)
        err = None
    except GatewayError as e:
        err = [e.code.name, e.message]
print(json.dumps({{"id": r.request_id, "text": r.text, "adapter": r.adapter, "reason": r.route.reason,
                  "completion_tokens": r.usage.completion_tokens, "finish": r.finish_reason, "err": err,
                  "modules": sorted({{m.split('.')[0] for m in sys.modules}} - set(sys.stdlib_module_names))}}))
"""
    r = _py(venv, code, work, gw.target)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["id"] and out["adapter"] == "" and out["reason"] == "adapter_override"
    assert 1 <= out["completion_tokens"] <= 4 and out["finish"] in ("length", "stop")
    assert out["err"][0] == "NOT_FOUND" and "no-such-adapter" in out["err"][1]
    assert not {"torch", "numpy", "transformers", "vllm", "yaml", "router"} & set(out["modules"]), out["modules"]


def test_sdk_and_full_package_share_one_descriptor(sdk_venv, repo_root):
    """Both distributions in one process (the full package's router.client from the checkout, the SDK from its
    venv): different top-level packages, the same router/v1/router.proto descriptor and message classes."""
    proc, venv, work = sdk_venv
    assert proc.wait(timeout=600) == 0, (work / "build.log").read_text()[-4000:]
    code = (f"import sys; sys.path.append(sys.argv[1]); import router.client as full; import {PKG}.client as sdk\n"
            "assert full.pb.GenerateRequest is sdk.pb.GenerateRequest\n"
            "assert full.pb.DESCRIPTOR.name == sdk.pb.DESCRIPTOR.name == 'router/v1/router.proto'\n"
            "print(full.__file__.startswith(sys.argv[1]), sdk.pb.DESCRIPTOR.services_by_name['RouterService'].full_name)")
    r = _py(venv, code, work, str(repo_root))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["True", "router.v1.RouterService"]
