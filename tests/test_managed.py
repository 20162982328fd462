"""Managed mode: the gateway owns its vLLM child; a crashed vLLM is restarted and its adapters come back."""
from __future__ import annotations

import contextlib
import os
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapters.registry import Registry
from basemodel import fingerprint
from router.client import Client, GatewayError, RetryPolicy
from router.v1 import router_pb2 as pb

pytestmark = pytest.mark.vllm
PROMPT = [{"role": "user", "content": "Say hello."}]


@contextlib.contextmanager
def gw_stopped(gw):
    try:
        yield gw
    finally:
        gw.stop()


def health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        except grpc.RpcError:
            return -1


def test_managed_vllm_crash_is_unavailable_then_restarted_with_adapters(gateway_factory, model_dir, tmp_path, poll, make_lora):
    reg = Registry(tmp_path / "registry")
    reg.register("code", make_lora(model_dir, tmp_path / "v1", seed=31),
                 base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct", base_fingerprint=fingerprint(model_dir))
    gw = gateway_factory({"registry": str(reg.root), "backend": {"mode": "managed", "model": str(model_dir),
                                                                 "max_loras": 2, "max_cpu_loras": 4}}, external=False)
    managed = gw.server.managed
    assert managed is not None and managed.alive()
    with gw_stopped(gw), Client(gw.target, timeout=300) as c:
        c.admin.DeployAdapter(pb.DeployAdapterRequest(task="code", version="1"), timeout=300)
        before = c.generate(PROMPT, task="code", max_tokens=12, temperature=0)
        assert before.adapter == "code@1"

        old_pid = managed.proc.pid
        os.killpg(old_pid, signal.SIGKILL)  # a real crash of the engine
        poll(lambda: health(gw.target) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=30,
             what="health to report the crash")
        with Client(gw.target, timeout=30, retry=RetryPolicy(attempts=1)) as once, pytest.raises(GatewayError) as e:
            once.generate(PROMPT, max_tokens=4)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        poll(lambda: managed.proc.pid != old_pid and managed.alive(), timeout_s=60, what="the restart to begin")
        # SERVING again only once the restarted vLLM answers *and* has its adapters back
        poll(lambda: health(gw.target) == health_pb2.HealthCheckResponse.SERVING, timeout_s=600, interval_s=1,
             what="the restarted vLLM to serve")
        assert managed.restarts >= 1 and not managed.restarting
        after = c.generate(PROMPT, task="code", max_tokens=12, temperature=0)
        assert after.adapter == "code@1" and after.text == before.text


def test_six_specialists_on_two_slots_all_answer_correctly(gateway_factory, model_dir, tmp_path, make_lora):
    """More production adapters (6) than batch slots (--max-loras 2) and CPU cache (--max-cpu-loras 4)."""
    from concurrent.futures import ThreadPoolExecutor
    tasks = ["code", "math", "writing", "translation", "summarization", "extraction"]
    reg = Registry(tmp_path / "registry")
    for i, t in enumerate(tasks):
        reg.register(t, make_lora(model_dir, tmp_path / t, seed=50 + i),
                     base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct", base_fingerprint=fingerprint(model_dir))
        reg.set_alias(t, "production", "1")
    gw = gateway_factory({"registry": str(reg.root), "backend": {"mode": "managed", "model": str(model_dir),
                                                                 "max_loras": 2, "max_cpu_loras": 4}}, external=False)
    with gw_stopped(gw), Client(gw.target, timeout=600) as c:
        routes = {e.task: e.adapter for e in c.admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30).routes}
        assert routes == {t: f"{t}@1" for t in tasks}  # restored from the registry at start
        solo = {t: c.generate(PROMPT, task=t, max_tokens=16, temperature=0) for t in [*tasks, "base"] if t != "base"}
        solo["base"] = c.generate(PROMPT, adapter="base", max_tokens=16, temperature=0)
        assert len({r.text for r in solo.values()}) >= 5  # the adapters really differ

        def call(t):
            return t, (c.generate(PROMPT, adapter="base", max_tokens=16, temperature=0) if t == "base"
                       else c.generate(PROMPT, task=t, max_tokens=16, temperature=0))

        with ThreadPoolExecutor(8) as ex:
            together = list(ex.map(call, [*tasks, "base"] * 2))
        for t, r in together:
            assert r.adapter == ("" if t == "base" else f"{t}@1")
            assert r.text == solo[t].text, f"{t}: batched output differs from its solo run"
