"""Managed mode: the gateway owns its vLLM child; a crashed vLLM is restarted and its adapters come back."""
from __future__ import annotations

import os
import signal

import grpc
import pytest
from conftest import poll
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapters.registry import Registry
from router.client import Client, RouterError
from router.model import fingerprint
from router.v1 import router_pb2 as pb

pytestmark = pytest.mark.vllm
PROMPT = [{"role": "user", "content": "Say hello."}]


def health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        except grpc.RpcError:
            return -1


def test_managed_vllm_crash_is_unavailable_then_restarted_with_adapters(gateway_factory, model_dir, tmp_path):
    from lora_fixtures import make_lora

    reg = Registry(tmp_path / "registry")
    reg.register("code", make_lora(model_dir, tmp_path / "v1", seed=31),
                 base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct", base_fingerprint=fingerprint(model_dir))
    gw = gateway_factory({"registry": str(reg.root), "backend": {"mode": "managed", "model": str(model_dir),
                                                                 "max_loras": 2, "max_cpu_loras": 4}}, external=False)
    managed = gw.gateway.managed
    assert managed is not None and managed.alive()
    with Client(gw.target, timeout=300) as c:
        c.admin.DeployAdapter(pb.DeployAdapterRequest(task="code", version="1"), timeout=300)
        before = c.generate(PROMPT, task="code", max_tokens=12, temperature=0)
        assert before.adapter == "code@1"

        old_pid = managed.proc.pid
        os.killpg(old_pid, signal.SIGKILL)  # a real crash of the engine
        c.retry.attempts = 1
        with pytest.raises(RouterError) as e:
            c.generate(PROMPT, max_tokens=4)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        poll(lambda: managed.proc.pid != old_pid and managed.alive(), timeout_s=60, what="the restart to begin")
        poll(lambda: health(gw.target) == health_pb2.HealthCheckResponse.SERVING, timeout_s=600, interval_s=1,
             what="the restarted vLLM to serve")
        poll(lambda: managed.restarts >= 1, timeout_s=60, what="adapters to be reloaded")
        after = c.generate(PROMPT, task="code", max_tokens=12, temperature=0)
        assert after.adapter == "code@1" and after.text == before.text
