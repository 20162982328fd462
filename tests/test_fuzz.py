"""Property-based probing of every RPC (hypothesis) against the real gateway and the real vLLM: random and hostile
requests (any text, NUL and control characters, invalid UTF-8 on the wire, fields over their bounds, unknown
names and paths) always get a documented status with a message, never INTERNAL or a trace, and the gateway keeps
serving. The number of examples is bounded and derandomized so the suite's time stays predictable (raise EXAMPLES
here to probe longer). Valid generations are capped at 3 new tokens."""
from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.v1 import router_pb2 as pb

pytestmark = pytest.mark.vllm
EXAMPLES = 40
DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.ALREADY_EXISTS}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# any text, including NUL and control characters; sometimes long (over the small bounds set below)
texts = st.one_of(st.text(max_size=40), st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=8),
                  st.integers(0, 3000).map(lambda n: "x" * n))
names = st.one_of(texts, st.sampled_from(["base", "code", "code@1", "../../etc", "code@0", "a" * 200, ""]))
roles = st.one_of(st.sampled_from(["user", "system", "assistant", "developer", "tool", "USER", ""]), texts)


@pytest.fixture(scope="module")
def fuzz_gateway(gateway_factory):
    """Small bounds, so hypothesis reaches them with short strings."""
    gw = gateway_factory({"logs": {"enabled": True}, "default_max_tokens": 2, "limits": {"max_message_chars": 1000, "max_request_chars": 2000,
                                                                "max_messages": 8, "max_stop_chars": 16,
                                                                "max_feedback_chars": 500, "max_comment_chars": 100,
                                                                "max_name_chars": 64}})
    channel = grpc.insecure_channel(gw.target)
    yield gw, channel
    channel.close()


def _call(channel, method: str, request, *, raw: bytes | None = None):
    """(code, message) of one call; a raw payload goes on the wire as it is."""
    fn = channel.unary_unary(f"/router.v1.{method}", request_serializer=lambda b: b,
                             response_deserializer=lambda b: b)
    try:
        fn(raw if raw is not None else request.SerializeToString(), timeout=60)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def _stream(channel, request):
    fn = channel.unary_stream("/router.v1.RouterService/GenerateStream", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    try:
        for _ in fn(request.SerializeToString(), timeout=60):
            pass
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def _check(code, message, what):
    assert code == grpc.StatusCode.OK or code in DOCUMENTED, (what, code, message)
    if code != grpc.StatusCode.OK:
        assert message and "Traceback" not in message and len(message) < 1000, (what, message)


def _keeps_serving(channel):
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Say hi.")],
                             sampling=pb.SamplingParams(max_tokens=2))
    assert _call(channel, "RouterService/Generate", req)[0] == grpc.StatusCode.OK


def _generate_request(cls, messages, max_tokens, temperature, top_p, stops, adapter, task, client_id, effort):
    sp = pb.SamplingParams(stop=stops)
    if max_tokens is not None:
        sp.max_tokens = max_tokens
    if temperature is not None:
        sp.temperature = temperature
    if top_p is not None:
        sp.top_p = top_p
    return cls(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages], sampling=sp, adapter=adapter,
               task=task, client_id=client_id, reasoning_effort=effort)


generate_args = dict(
    messages=st.lists(st.tuples(roles, texts), max_size=10),
    max_tokens=st.one_of(st.none(), st.integers(-5, 3), st.sampled_from([2048, 10**6])),
    temperature=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    top_p=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    stops=st.lists(texts, max_size=10),
    adapter=names, task=names, client_id=texts, effort=st.integers(0, 5))


@FUZZ
@given(**generate_args)
def test_generate_and_stream_answer_with_documented_statuses(fuzz_gateway, **kw):
    _, channel = fuzz_gateway
    _check(*_call(channel, "RouterService/Generate", _generate_request(pb.GenerateRequest, **kw)), "Generate")
    _check(*_stream(channel, _generate_request(pb.GenerateStreamRequest, **kw)), "GenerateStream")


@FUZZ
@given(text=texts, request_id=names, rating=st.integers(-3, 8), correction=texts, comment=texts)
def test_classify_and_feedback_answer_with_documented_statuses(fuzz_gateway, text, request_id, rating, correction,
                                                               comment):
    _, channel = fuzz_gateway
    _check(*_call(channel, "RouterService/Classify", pb.ClassifyRequest(text=text)), "Classify")
    _check(*_call(channel, "RouterService/SubmitFeedback", pb.SubmitFeedbackRequest(
        request_id=request_id, rating=rating, correction=correction, comment=comment)), "SubmitFeedback")


@FUZZ
@given(name=names, path=st.one_of(texts, st.sampled_from(["/", "/etc", "/tmp", "/proc/self", "."])), task=names,
       version=names)
def test_admin_calls_answer_with_documented_statuses(fuzz_gateway, name, path, task, version):
    _, channel = fuzz_gateway
    for method, req in (("LoadAdapter", pb.LoadAdapterRequest(name=name, path=path)),
                        ("UnloadAdapter", pb.UnloadAdapterRequest(name=name)),
                        ("DeployAdapter", pb.DeployAdapterRequest(task=task, version=version)),
                        ("RollbackAdapter", pb.RollbackAdapterRequest(task=task)),
                        ("RetireAdapter", pb.RetireAdapterRequest(task=task)),
                        ("ReloadClassifier", pb.ReloadClassifierRequest(path=path or "/nowhere"))):
        code, message = _call(channel, f"AdminService/{method}", req)
        _check(code, message, method)
        assert code != grpc.StatusCode.OK or method in ("LoadAdapter", "UnloadAdapter"), (method, req)


@FUZZ
@given(junk=st.binary(min_size=1, max_size=64), method=st.sampled_from([
    "RouterService/Generate", "RouterService/Classify", "RouterService/SubmitFeedback", "AdminService/LoadAdapter",
    "AdminService/DeployAdapter", "AdminService/ReloadClassifier"]))
def test_invalid_utf8_and_garbage_on_the_wire_are_invalid_argument(fuzz_gateway, junk, method):
    _, channel = fuzz_gateway
    # a valid message whose first string field holds bytes that are not UTF-8: protobuf refuses to decode it
    bad_utf8 = b"\x0a" + bytes([len(junk) + 2]) + b"\xff\xfe" + junk
    for raw in (bad_utf8, junk):
        code, message = _call(channel, method, None, raw=raw)
        _check(code, message, method)


def test_the_gateway_still_serves_after_the_fuzzing(fuzz_gateway):
    gw, channel = fuzz_gateway
    _keeps_serving(channel)
    assert gw.server.pipeline.in_flight == 0
