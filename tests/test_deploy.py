"""Registry-backed deployment through the running gateway: real vLLM, real gRPC, real registry on disk."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from adapters.registry import Registry
from basemodel import fingerprint
from router.client import Client, GatewayError
from router.v1 import router_pb2 as pb

pytestmark = pytest.mark.vllm
PROMPT = [{"role": "user", "content": "Write a SQL query that counts users."}]


@pytest.fixture(scope="module")
def loras(model_dir, tmp_path_factory, make_lora):
    d = tmp_path_factory.mktemp("deploy-loras")
    return {i: make_lora(model_dir, d / f"v{i}", seed=100 + i) for i in (1, 2, 3)}


@pytest.fixture()
def setup(gateway_factory, model_dir, loras, tmp_path):
    root = tmp_path / "registry"
    reg = Registry(root)
    fp = fingerprint(model_dir)
    for i in (1, 2):
        reg.register("code", loras[i], base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct", base_fingerprint=fp)
    gw = gateway_factory({"registry": str(root)})
    c = Client(gw.target, timeout=300)
    yield gw, reg, c
    c.close()


def deploy(c, task, version=""):
    return c.admin.DeployAdapter(pb.DeployAdapterRequest(task=task, version=version), timeout=300)


def loaded(c):
    return {a.name for a in c.admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters}


def test_deploy_v1_v2_rollback_retire(setup, poll):
    gw, reg, c = setup
    r = deploy(c, "code", "1")
    assert (r.adapter, r.version, r.previous_version) == ("code@1", "1", "")
    assert c.generate(PROMPT, task="code", max_tokens=8, temperature=0).adapter == "code@1"
    assert reg.production("code").version == "1"

    r = deploy(c, "code", "2")
    assert (r.adapter, r.previous_version) == ("code@2", "1")
    assert c.generate(PROMPT, task="code", max_tokens=8, temperature=0).adapter == "code@2"
    poll(lambda: "code@1" not in loaded(c), timeout_s=60, what="the old version to be drained and unloaded")

    r = c.admin.RollbackAdapter(pb.RollbackAdapterRequest(task="code"), timeout=300)
    assert (r.adapter, r.version) == ("code@1", "1")
    assert c.generate(PROMPT, task="code", max_tokens=8, temperature=0).adapter == "code@1"

    r = c.admin.RetireAdapter(pb.RetireAdapterRequest(task="code"), timeout=60)
    assert r.previous_version == "1"
    res = c.generate(PROMPT, task="code", max_tokens=8, temperature=0)
    assert res.adapter == "" and res.route.task == "code"
    assert reg.production("code") is None
    poll(lambda: "code@1" not in loaded(c), timeout_s=60, what="the retired adapter to be unloaded")
    moves = [(h["alias"], h.get("from"), h.get("to")) for h in reg.history("code") if h["alias"] == "production"]
    assert moves == [("production", None, "1"), ("production", "1", "2"), ("production", "2", "1"), ("production", "1", None)]


def test_failed_validation_leaves_old_version_serving(setup, loras, model_dir):
    gw, reg, c = setup
    deploy(c, "code", "1")
    # tamper with v2 after registration: its sha256 no longer matches the manifest
    v2 = reg.get("code", "2")
    with open(v2.path / "adapter_model.safetensors", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(grpc.RpcError) as e:
        deploy(c, "code", "2")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "sha256" in e.value.details()
    # an adapter for another base (fingerprint differs) is refused too
    v3 = reg.register("code", loras[3], base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                      base_fingerprint=fingerprint(model_dir))
    m = json.loads((v3.path / "manifest.json").read_text())
    m["base_fingerprint"] = "sha256:" + "0" * 64
    (v3.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(grpc.RpcError) as e:
        deploy(c, "code", v3.version)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "base" in e.value.details().lower()
    with pytest.raises(grpc.RpcError) as e:
        deploy(c, "code", "99")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        deploy(c, "../etc", "1")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert c.generate(PROMPT, task="code", max_tokens=8).adapter == "code@1"
    assert reg.production("code").version == "1"
    assert loaded(c) >= {"code@1"} and "code@2" not in loaded(c)


def test_gateway_restart_restores_production_adapters(setup, gateway_factory):
    gw, reg, c = setup
    deploy(c, "code", "2")
    gw2 = gateway_factory({"registry": str(reg.root)})
    with Client(gw2.target, timeout=300) as c2:
        routes = {e.task: e.adapter for e in c2.admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30).routes}
        assert routes == {"code": "code@2"}
        assert c2.generate(PROMPT, task="code", max_tokens=8).adapter == "code@2"


def test_concurrent_deploys_of_one_task_are_serialized(setup):
    gw, reg, c = setup
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda v: deploy(c, "code", v), ["1", "2", "1", "2"]))
    assert all(r.adapter in ("code@1", "code@2") for r in results)
    final = reg.production("code")
    routes = {e.task: e.adapter for e in c.admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30).routes}
    assert routes["code"] == final.name
    hist = [h for h in reg.history("code") if h["alias"] == "production"]
    # serialized deploys: each one that moved production reports the version it replaced, and the registry
    # recorded exactly those moves. Two interleaved deploys would both report the same previous version (and
    # the registry would record one move for two, or a route would disagree with the alias).
    moves = sorted((r.previous_version, r.version) for r in results if r.previous_version != r.version)
    assert moves == sorted(((h.get("from") or ""), (h.get("to") or "")) for h in hist)


def test_no_request_fails_during_deploys(setup, poll):
    gw, reg, c = setup
    deploy(c, "code", "1")
    errors, served = [], []
    stop = threading.Event()

    def load():
        with Client(gw.target, timeout=300) as lc:
            while not stop.is_set():
                try:
                    served.append(lc.generate(PROMPT, task="code", max_tokens=6, temperature=0).adapter)
                except GatewayError as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for v in ("2", "1", "2"):
            deploy(c, "code", v)
            n = len(served)
            poll(lambda: len(served) >= n + 3, timeout_s=120, what="requests to be served after the deploy")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors[:3]
    assert {"code@1", "code@2"} <= set(served)


def test_auth_scopes(gateway_factory, tmp_path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens:\n"
                      "  - {token: gen-token-0123456789abcdef-0123456789, scopes: [generate], name: app}\n"
                      "  - {token: admin-token-0123456789abcdef-0123456789, scopes: [generate, admin], name: ops}\n")
    tokens.chmod(0o600)
    gw = gateway_factory({"auth": {"enabled": True, "tokens_file": str(tokens)}})
    with Client(gw.target, token="", timeout=60) as anon:
        with pytest.raises(GatewayError) as e:
            anon.generate(PROMPT, max_tokens=2)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(gw.target, token="wrong-token-0123456789", timeout=60) as bad:
        with pytest.raises(GatewayError) as e:
            bad.generate(PROMPT, max_tokens=2)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(gw.target, token="gen-token-0123456789abcdef-0123456789", timeout=60) as app:
        assert app.generate(PROMPT, max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(grpc.RpcError) as e:
            app.admin.ListAdapters(pb.ListAdaptersRequest(), metadata=app.metadata, timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin" in e.value.details()
    with Client(gw.target, token="admin-token-0123456789abcdef-0123456789", timeout=60) as ops:
        ops.admin.ListAdapters(pb.ListAdaptersRequest(), metadata=ops.metadata, timeout=10)


def test_pinned_version_loads_on_demand_and_unloads_when_idle(gateway_factory, model_dir, loras, tmp_path, poll):
    """A request pinned to `code@1` still works after a deploy unloaded v1: the registry holds it, so the gateway
    loads it on demand (validated like a deploy), within its slots, and unloads it when idle."""
    reg = Registry(tmp_path / "registry")
    fp = fingerprint(model_dir)
    for i in (1, 2, 3):
        reg.register("code", loras[i], base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct", base_fingerprint=fp)
    gw = gateway_factory({"registry": str(tmp_path / "registry"),
                          "deploy": {"pinned_max_loaded": 1, "pinned_idle_s": 2, "registry_poll_s": 0.5}})
    with Client(gw.target, timeout=300) as c:
        deploy(c, "code", "1")
        deploy(c, "code", "2")
        poll(lambda: "code@1" not in loaded(c), timeout_s=60, what="v1 to be drained and unloaded")
        r = c.generate(PROMPT, adapter="code@1", max_tokens=4, temperature=0)
        assert r.adapter == "code@1" and r.route.reason == "adapter_override"
        assert "code@1" in loaded(c)
        r = c.generate(PROMPT, adapter="code@3", max_tokens=4, temperature=0)  # one slot: v1 (idle) makes room
        assert r.adapter == "code@3" and "code@1" not in loaded(c)
        assert c.generate(PROMPT, task="code", max_tokens=4).adapter == "code@2"  # production untouched
        poll(lambda: "code@3" not in loaded(c), timeout_s=30, what="the idle pinned version to be unloaded")
        assert "code@2" in loaded(c)
        with pytest.raises(GatewayError) as e:
            c.generate(PROMPT, adapter="code@9", max_tokens=4)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        # a registered version whose files changed on disk is refused, not loaded
        victim = reg.get("code", "1").path / "adapter_config.json"
        victim.chmod(0o644)
        victim.write_text(victim.read_text().replace('"r": 8', '"r": 8 '))
        with pytest.raises(GatewayError) as e:
            c.generate(PROMPT, adapter="code@1", max_tokens=4)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "code@1" not in loaded(c)
