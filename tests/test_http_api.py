"""The OpenAI-compatible HTTP door and /metrics: the real `openai` package and raw HTTP against the running gateway
(real vLLM, real classifier, real registry deploy, real SQLite log, auth on)."""
from __future__ import annotations

import json
import secrets

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.registry import Registry
from basemodel import fingerprint
from convlog.store import open_store
from router.client import Client
from tests.test_gateway import running_requests

pytestmark = pytest.mark.vllm
GEN, ADMIN = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
CODE_PROMPT = "Write a Python function that reverses a linked list and explain its time complexity."
HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


@pytest.fixture(scope="module")
def gw(gateway_factory, model_dir, tmp_path_factory, make_lora):
    d = tmp_path_factory.mktemp("http")
    reg = Registry(d / "registry")
    reg.register("code", make_lora(model_dir, d / "code-v1", seed=11), base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                 base_fingerprint=fingerprint(model_dir))
    g = gateway_factory({"classifier": {"enabled": True, "threads": 1}, "registry": str(d / "registry"),
                         "logs": {"enabled": True, "path": str(d / "logs.sqlite3")},
                         "auth": {"enabled": True, "tokens": [{"token": GEN, "scopes": ["generate"], "name": "app"},
                                                              {"token": ADMIN, "scopes": ["admin"], "name": "ops"}]}})
    with Client(g.target, token=ADMIN, timeout=300) as c:
        c.deploy("code", "1")
    g.db = d / "logs.sqlite3"
    return g


@pytest.fixture()
def oai(gw):
    with openai.OpenAI(base_url=f"{gw.http_url}/v1", api_key=GEN, max_retries=0, timeout=300) as c:
        yield c


def test_non_streaming_matches_grpc_and_says_where_it_went(gw, oai):
    raw = oai.chat.completions.with_raw_response.create(model="base", messages=HELLO, max_tokens=12, temperature=0)
    r = raw.parse()
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.role == "assistant"
    assert 0 < r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    h = raw.headers
    assert h["x-router-adapter"] == "base" and h["x-router-reason"] == "adapter_override"
    assert r.id == f"chatcmpl-{h['x-request-id']}" and r.model == gw.server.pipeline.served_model
    with Client(gw.target, token=GEN, timeout=300) as c:  # the same greedy request over gRPC: the same answer
        g = c.generate(HELLO, adapter="base", max_tokens=12, temperature=0)
    assert r.choices[0].message.content == g.text


def test_streaming_with_usage(oai):
    chunks = list(oai.chat.completions.create(model="base", messages=HELLO, max_tokens=12, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = oai.chat.completions.create(model="base", messages=HELLO, max_tokens=12, temperature=0)
    assert text == full.choices[0].message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    last = chunks[-1]  # OpenAI's usage chunk: no choices, usage set; every other chunk has usage null
    assert last.choices == [] and last.usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_model_picks_the_route(gw, oai):
    raw = oai.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": CODE_PROMPT}], max_tokens=4)
    h, r = raw.headers, raw.parse()
    assert (h["x-router-task"], h["x-router-adapter"], h["x-router-reason"]) == ("code", "code@1", "specialist")
    assert float(h["x-router-confidence"]) > 0 and r.model == "code@1"
    for model, adapter, reason in (("code", "code@1", "task_override"), ("code@1", "code@1", "adapter_override"),
                                   ("math", "base", "task_override")):
        h = oai.chat.completions.with_raw_response.create(model=model, messages=HELLO, max_tokens=2).headers
        assert (h["x-router-adapter"], h["x-router-reason"]) == (adapter, reason), model
    ids = {m.id for m in oai.models.list().data}
    assert {"auto", "base", "code", "code@1", "math", "writing", "general"} <= ids


def test_errors_are_openai_json_with_the_grpc_message(gw, oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="astrology", messages=HELLO, max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and "/v1/models" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    assert "max_tokens is 0: it must be at least 1" in e.value.message and e.value.code == "invalid_argument"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="base", messages=HELLO, max_tokens=2, n=2)
    assert "use n=1" in e.value.message
    with openai.OpenAI(base_url=f"{gw.http_url}/v1", api_key="wrong-" + GEN, max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model="base", messages=HELLO, max_tokens=2)
        assert e.value.status_code == 401 and "unknown bearer token" in e.value.message
    with openai.OpenAI(base_url=f"{gw.http_url}/v1", api_key=ADMIN, max_retries=0) as wrong_scope:
        with pytest.raises(openai.PermissionDeniedError) as e:
            wrong_scope.models.list()
        assert "lacks the 'generate' scope" in e.value.message
    r = httpx.post(f"{gw.http_url}/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"authorization": f"Bearer {GEN}", "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{gw.http_url}/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_raw_sse_framing(gw):
    body = {"model": "base", "messages": HELLO, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gw.http_url}/v1/chat/completions", json=body, timeout=300,
                      headers={"authorization": f"Bearer {GEN}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    assert all(p["object"] == "chat.completion.chunk" for p in payloads) and "usage" not in payloads[0]
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_feedback_over_http_lands_in_the_log(gw, oai):
    raw = oai.chat.completions.with_raw_response.create(model="base", messages=HELLO, max_tokens=4)
    rid = raw.headers["x-request-id"]
    auth = {"authorization": f"Bearer {GEN}"}
    fb = {"request_id": raw.parse().id, "rating": 2, "comment": "too short"}  # the body's id works too
    first = httpx.post(f"{gw.http_url}/v1/feedback", json=fb, headers=auth, timeout=30)
    again = httpx.post(f"{gw.http_url}/v1/feedback", json=fb, headers=auth, timeout=30)
    assert first.status_code == again.status_code == 200
    assert first.json()["created"] is True and again.json()["created"] is False
    store = open_store(gw.db)
    try:
        rec = store.get(rid)
        assert rec is not None and rec.stream is False and rec.route_reason == "adapter_override"
        assert [f.rating for f in store.feedback_for([rid])[rid]] == [2]
    finally:
        store.close()
    r = httpx.post(f"{gw.http_url}/v1/feedback", json={"request_id": "0" * 32, "rating": 3}, headers=auth, timeout=30)
    assert r.status_code == 404 and "request" in r.json()["error"]["message"]


def test_client_disconnect_aborts_in_vllm(gw, vllm_server, poll):
    body = {"model": "base", "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}],
            "max_tokens": 1500, "temperature": 1.0, "seed": 3, "stream": True}
    auth = {"authorization": f"Bearer {GEN}"}
    with httpx.stream("POST", f"{gw.http_url}/v1/chat/completions", json=body, headers=auth, timeout=300) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        poll(lambda: running_requests(vllm_server) >= 1, timeout_s=20, what="the streamed request to run")
    poll(lambda: running_requests(vllm_server) == 0, timeout_s=20, what="vLLM to abort the disconnected stream")
    body["stream"] = False  # a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gw.http_url}/v1/chat/completions", json=body, headers=auth, timeout=httpx.Timeout(300, read=3))
    poll(lambda: running_requests(vllm_server) == 0, timeout_s=20, what="vLLM to abort the abandoned request")


def _samples(gw) -> dict:
    text = httpx.get(f"{gw.http_url}/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _delta(after: dict, before: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name and want <= set(k[1]))


def test_metrics_count_exactly_what_was_sent(gw, oai):
    before = _samples(gw)
    tokens = 0
    for _ in range(3):
        tokens += oai.chat.completions.create(model="base", messages=HELLO, max_tokens=3).usage.completion_tokens
    with Client(gw.target, token=GEN, timeout=300) as c:
        for _ in range(2):
            tokens += c.generate(HELLO, adapter="base", max_tokens=3).usage.completion_tokens
        with pytest.raises(Exception):
            c.generate(HELLO, adapter="no-such-adapter", max_tokens=3)
    after = _samples(gw)
    req = "specialist_router_requests_total"
    base = dict(task="", adapter="", route_reason="adapter_override", status="OK")
    assert _delta(after, before, req, api="http", **base) == 3
    assert _delta(after, before, req, api="grpc", **base) == 2
    assert _delta(after, before, req, api="grpc", status="NOT_FOUND") == 1
    assert _delta(after, before, "specialist_router_completion_tokens_total", adapter="") == tokens
    assert _delta(after, before, "specialist_router_time_to_first_token_seconds_count", adapter="") == 5
    assert _delta(after, before, "specialist_router_request_duration_seconds_count", api="http") == 3
    assert _delta(after, before, "specialist_router_log_records_written_total") >= 5  # the failed one may lag
    assert _delta(after, before, "specialist_router_log_write_seconds_count") >= 5
    assert _delta(after, before, "specialist_router_backend_requests_total") == 5
    assert after[("specialist_router_backend_up", ())] == 1.0
    assert after[("specialist_router_requests_in_flight", (("api", "http"),))] == 0
    assert after[("specialist_router_adapters_loaded", ())] >= 1
    deploys = [k for k in after if k[0] == "specialist_router_deploy_duration_seconds_count"]
    assert any(dict(k[1]) == {"action": "deploy", "task": "code", "result": "ok"} for k in deploys)
    assert after[("specialist_router_adapter_loads_total", (("result", "ok"),))] >= 1


def test_grafana_dashboard_uses_only_exported_series(gw, repo_root):
    import re

    text = httpx.get(f"{gw.http_url}/metrics", timeout=30).text
    families = {f.name for f in text_string_to_metric_families(text)}  # declared, with or without samples yet
    dash = json.loads((repo_root / "deploy" / "grafana" / "specialist-router.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = {m for e in exprs for m in re.findall(r"\b(specialist_router_[a-z_]+)", e)}
    missing = {m for m in used if re.sub(r"_(total|bucket|count|sum)$", "", m) not in families}
    assert not missing, f"the dashboard queries series the gateway does not export: {sorted(missing)}"


def test_json_log_lines_carry_the_request_id(capsys):
    import logging

    from router import logfmt
    from router.grpc_errors import REQUEST_ID

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logfmt.setup("INFO", "json")
        token = REQUEST_ID.set("abc123")
        logging.getLogger("router.gateway").warning("backend %s is slow", "x")
        REQUEST_ID.reset(token)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("router.http").exception("failed")
        lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert lines[0]["message"] == "backend x is slow" and lines[0]["request_id"] == "abc123"
    assert lines[0]["level"] == "WARNING" and lines[0]["logger"] == "router.gateway" and lines[0]["ts"].endswith("+00:00")
    assert "request_id" not in lines[1] and "ValueError: boom" in lines[1]["exc"]
