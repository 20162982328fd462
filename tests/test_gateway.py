"""Serving core against real parts: real vLLM CPU server, real gRPC gateway on loopback, the SDK as client."""
from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.client import Client, GatewayError, RetryPolicy
from router.v1 import router_pb2 as pb

pytestmark = pytest.mark.vllm
PROMPT = [{"role": "user", "content": "List three fruits."}]


def direct_chat(vllm, messages, model=None, **kw) -> dict:
    r = httpx.post(f"{vllm.url}/v1/chat/completions", timeout=300, headers=vllm.headers,
                   json={"model": model or vllm.model, "messages": messages, **kw})
    r.raise_for_status()
    return r.json()


def running_requests(vllm) -> float:
    text = httpx.get(f"{vllm.url}/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:num_requests_running")]
    assert values, "vLLM exposes no vllm:num_requests_running gauge (was it started with --disable-log-stats?)"
    return sum(values)


def test_health_serving_once_backend_answers(gateway):
    with grpc.insecure_channel(gateway.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for svc in ("", "router.v1.RouterService"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_greedy_output_equals_direct_vllm(client, vllm_server):
    r = client.generate(PROMPT, max_tokens=32, temperature=0)
    d = direct_chat(vllm_server, PROMPT, max_tokens=32, temperature=0)
    assert r.text == d["choices"][0]["message"]["content"]
    assert r.usage.completion_tokens == d["usage"]["completion_tokens"]
    assert r.usage.prompt_tokens == d["usage"]["prompt_tokens"]
    assert r.adapter == "" and r.route.reason == "classifier_disabled"
    assert r.finish_reason in ("stop", "length") and r.request_id


def test_stream_deltas_concatenate_to_unary_text(client):
    unary = client.generate(PROMPT, max_tokens=40, temperature=0)
    chunks = list(client.stream(PROMPT, max_tokens=40, temperature=0))
    assert len(chunks) > 2
    assert chunks[-1].finished and all(not c.finished for c in chunks[:-1])
    assert "".join(c.delta for c in chunks) == unary.text
    last = chunks[-1]
    assert last.usage.completion_tokens == unary.usage.completion_tokens
    assert last.finish_reason == unary.finish_reason
    assert last.timings.total_ms >= last.timings.ttft_ms > 0


def test_lora_loaded_at_runtime_changes_output_and_unload_restores(client, gateway, model_dir, tmp_path, make_lora):
    path = make_lora(model_dir, tmp_path / "lora-a", seed=11)
    base = client.generate(PROMPT, max_tokens=24, temperature=0)
    client.admin.LoadAdapter(pb.LoadAdapterRequest(name="test-a", path=str(path)), timeout=120)
    listed = client.admin.ListAdapters(pb.ListAdaptersRequest(), timeout=10)
    assert "test-a" in [a.name for a in listed.adapters]
    with_lora = client.generate(PROMPT, max_tokens=24, temperature=0, adapter="test-a")
    assert with_lora.adapter == "test-a" and with_lora.route.reason == "adapter_override"
    assert with_lora.text != base.text
    client.admin.UnloadAdapter(pb.UnloadAdapterRequest(name="test-a"), timeout=60)
    with pytest.raises(GatewayError) as e:
        client.generate(PROMPT, max_tokens=4, adapter="test-a")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    again = client.generate(PROMPT, max_tokens=24, temperature=0)
    assert again.text == base.text


@pytest.mark.parametrize("kwargs,messages,fragment", [
    ({}, [], "messages is empty"),
    ({}, [{"role": "wizard", "content": "hi"}], "role"),
    ({}, [{"role": "user", "content": "   "}], "non-empty"),
    ({"max_tokens": 0}, PROMPT, "max_tokens"),
    ({"max_tokens": -5}, PROMPT, "max_tokens"),
    ({"max_tokens": 10_000_000}, PROMPT, "context"),
    ({"temperature": 7.0}, PROMPT, "temperature"),
    ({"top_p": 0.0}, PROMPT, "top_p"),
])
def test_bad_requests_are_invalid_argument(client, kwargs, messages, fragment):
    with pytest.raises(GatewayError) as e:
        client.generate(messages, **kwargs)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in e.value.message
    assert "Traceback" not in e.value.message


def test_prompt_longer_than_context_is_invalid_argument(client):
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(GatewayError) as e:
        client.generate(long, max_tokens=16)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "context" in e.value.message.lower() or "length" in e.value.message.lower()


def test_stream_errors_use_the_same_statuses(client):
    with pytest.raises(GatewayError) as e:
        list(client.stream([{"role": "robot", "content": "x"}]))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(GatewayError) as e:
        list(client.stream(PROMPT, adapter="no-such-adapter"))
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-adapter" in e.value.message


def test_unknown_adapter_is_not_found(client):
    with pytest.raises(GatewayError) as e:
        client.generate(PROMPT, adapter="nope@1")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert "adapters list" in e.value.message


def test_unknown_task_override_is_invalid(gateway_factory):
    # the real default classifier knows the task set; an unknown override says which tasks exist
    gw = gateway_factory({"classifier": {"enabled": True}})
    with Client(gw.target, timeout=60) as c:
        with pytest.raises(GatewayError) as e:
            c.generate(PROMPT, task="astrology", max_tokens=4)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "astrology" in e.value.message
    assert "'code'" in e.value.message and "'general'" in e.value.message  # it lists the known tasks


def test_deadline_exceeded_aborts_in_vllm(client, vllm_server, poll):
    with pytest.raises(GatewayError) as e:
        client.generate([{"role": "user", "content": "Write a very long story about a dragon."}],
                        max_tokens=1500, temperature=1.0, seed=1, timeout=3)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # 1500 tokens take far longer than this; the request must stop running inside vLLM
    poll(lambda: running_requests(vllm_server) == 0, timeout_s=20, what="vLLM to abort the request")


def test_client_cancel_aborts_in_vllm(gateway, vllm_server, poll):
    with Client(gateway.target, timeout=300) as c:
        it = c.stream([{"role": "user", "content": "Write a very long story about a castle."}],
                      max_tokens=1500, temperature=1.0, seed=2)
        first = next(it)
        assert not first.finished, "a 1500-token story must still be streaming after its first message"
        poll(lambda: running_requests(vllm_server) >= 1, timeout_s=20, what="the request to run")
        it.close()  # the SDK cancels the call
    poll(lambda: running_requests(vllm_server) == 0, timeout_s=20, what="vLLM to abort the cancelled request")


def test_backend_down_is_unavailable(gateway_factory):
    from router.managed import free_port

    gw = gateway_factory({"backend": {"url": f"http://127.0.0.1:{free_port()}"}})
    with Client(gw.target, timeout=30, retry=RetryPolicy(attempts=2)) as c:
        with pytest.raises(GatewayError) as e:
            c.generate(PROMPT, max_tokens=4)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert "retry" in e.value.message
    with grpc.insecure_channel(gw.target) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_async_client_generate_and_stream(gateway):
    import asyncio

    from router.client import AsyncClient

    async def go():
        async with AsyncClient(gateway.target, timeout=300) as c:
            r = await c.generate(PROMPT, max_tokens=16, temperature=0)
            parts = [ch.delta async for ch in c.stream(PROMPT, max_tokens=16, temperature=0)]
            return r, "".join(parts)

    r, streamed = asyncio.run(go())
    assert r.text == streamed


def test_non_utf8_bytes_at_the_grpc_edge_are_invalid_argument(gateway):
    # a GenerateRequest whose message content (field 1 -> ChatMessage.content, field 2) holds invalid UTF-8
    inner = b"\x0a\x04user" + b"\x12\x03\xff\xfe\xfd"
    raw = b"\x0a" + bytes([len(inner)]) + inner
    with grpc.insecure_channel(gateway.target) as ch:
        call = ch.unary_unary("/router.v1.RouterService/Generate", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            call(raw, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in e.value.details()
