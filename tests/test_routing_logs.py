"""Classifier routing and conversation logging through the real gateway (real classifier, real SQLite)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import grpc
import pytest

from convlog.store import open_store
from core.paths import classifier_dir
from router.client import Client, GatewayError, RetryPolicy
from router.v1 import router_pb2 as pb

pytestmark = pytest.mark.vllm
CODE_PROMPT = "Write a Python function that reverses a linked list and explain its time complexity."
GENERAL_PROMPT = "What should I pack for a weekend hiking trip in the mountains?"


@pytest.fixture(scope="module")
def routed_gateway(gateway_factory, model_dir, tmp_path_factory, make_lora):
    d = tmp_path_factory.mktemp("routing")
    gw = gateway_factory({"classifier": {"enabled": True, "threads": 1},
                          "logs": {"enabled": True, "path": str(d / "logs.sqlite3")},
                          "task_adapters": {"code": "code-static"}})
    path = make_lora(model_dir, d / "code-lora", seed=7)
    with Client(gw.target, timeout=300) as c:
        c.admin.LoadAdapter(pb.LoadAdapterRequest(name="code-static", path=str(path)), timeout=120)
    gw.db = d / "logs.sqlite3"
    return gw


def test_code_prompt_goes_to_code_specialist(routed_gateway):
    with Client(routed_gateway.target, timeout=300) as c:
        cls = c.classify(CODE_PROMPT)
        assert cls.task == "code" and cls.confidence >= cls.threshold and cls.adapter == "code-static"
        r = c.generate(CODE_PROMPT, max_tokens=8, temperature=0)
        assert r.route.task == "code" and r.route.reason == "specialist" and r.adapter == "code-static"
        assert r.timings.classify_ms > 0
    import torch

    # classifier.threads=1 holds in the threads that classify (the test process's own setting is untouched)
    assert routed_gateway.server.classifier._pool.submit(torch.get_num_threads).result() == 1


def test_general_and_low_confidence_go_to_base(routed_gateway):
    gw = routed_gateway
    with Client(gw.target, timeout=300) as c:
        r = c.generate(GENERAL_PROMPT, max_tokens=8)
        assert r.adapter == "" and r.route.reason in ("general_task", "low_confidence", "no_adapter")
        old = gw.server.cfg.classifier.threshold
        gw.server.cfg.classifier.threshold = 1.01  # nothing is confident enough: everything abstains
        try:
            r = c.generate(CODE_PROMPT, max_tokens=8)
            assert r.adapter == "" and r.route.reason == "low_confidence" and r.route.task == "code"
        finally:
            gw.server.cfg.classifier.threshold = old


def test_overrides_win(routed_gateway):
    with Client(routed_gateway.target, timeout=300) as c:
        r = c.generate(GENERAL_PROMPT, task="code", max_tokens=8)
        assert r.adapter == "code-static" and r.route.reason == "task_override"
        r = c.generate(CODE_PROMPT, adapter="base", max_tokens=8)
        assert r.adapter == "" and r.route.reason == "adapter_override"
        with pytest.raises(GatewayError) as e:
            c.generate(CODE_PROMPT, task="astrology", max_tokens=8)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "known task" in e.value.message
        with pytest.raises(GatewayError) as e:
            c.classify("   ")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_every_exchange_is_logged_with_route_and_feedback(routed_gateway, poll):
    gw = routed_gateway
    with Client(gw.target, timeout=300) as c:
        ok = c.generate(CODE_PROMPT, max_tokens=8, temperature=0, client_id="tenant-a")
        streamed = [ch for ch in c.stream(GENERAL_PROMPT, max_tokens=8, client_id="tenant-a")]
        with pytest.raises(GatewayError):
            c.generate(CODE_PROMPT, adapter="missing@1", client_id="tenant-a")
        with pytest.raises(GatewayError) as late:
            # greedy, so deterministic: a counting prompt runs far past the 3 s deadline (a sampled answer
            # could stop early and not time out)
            c.generate("Count from 1 to 500, writing every number in words on its own line.", max_tokens=1500,
                       temperature=0, timeout=3.0, client_id="tenant-a")
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        store = open_store(gw.db)
        rec = store.get(ok.request_id)
        assert rec is not None and rec.response_text == ok.text and rec.task == "code"
        assert rec.adapter == "code-static" and rec.route_reason == "specialist" and rec.client_id == "tenant-a"
        assert rec.completion_tokens == ok.usage.completion_tokens and rec.status == "ok"
        srec = store.get(streamed[-1].request_id)
        assert srec.stream and srec.response_text == "".join(ch.delta for ch in streamed)
        recs = list(store.iter_records(client_id="tenant-a"))
        statuses = lambda: {r.status for r in store.iter_records(client_id="tenant-a")}  # noqa: E731
        try:
            # a deadline is logged as cancelled whichever fires first: gRPC cancelling the handler, or the
            # backend's own timer when the machine is too loaded for gRPC to get there in time
            poll(lambda: statuses() >= {"ok", "error", "cancelled"}, timeout_s=30,
                 what="failed and cancelled requests to be logged")
        except AssertionError as exc:
            logged = [(r.status, r.finish_reason, r.error[:80]) for r in store.iter_records(client_id="tenant-a")]
            raise AssertionError(f"{exc}; logged: {logged}") from None
        late_rec = [r for r in store.iter_records(client_id="tenant-a") if r.status == "cancelled"]
        assert late_rec and all(r.finish_reason == "cancelled" for r in late_rec)
        errs = [r for r in store.iter_records(client_id="tenant-a") if r.status == "error"]
        assert any("NOT_FOUND" in r.error for r in errs)
        assert len(recs) >= 2

        fb = c.feedback(ok.request_id, 5, comment="great")
        again = c.feedback(ok.request_id, 5, comment="great")
        assert fb.created and not again.created and fb.feedback_id == again.feedback_id
        with pytest.raises(GatewayError) as e:
            c.feedback("no-such-request", 3)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(GatewayError) as e:
            c.feedback(ok.request_id, 9)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        store.close()


def test_reload_classifier_swaps_warm_and_releases_the_old_encoder(routed_gateway, tmp_path, ops_data):
    """ReloadClassifier: a bad path is a clear error and the current classifier keeps serving; a good one is loaded
    and warmed before the swap; an encoder only the old classifier used is released; reload with no path goes
    back to the configured classifier."""
    from classifier.embed import _SHARED
    from classifier.train import ClassifierTrainConfig, train

    gw = routed_gateway
    # an operator's artifact, trained into the gateway's classifier folder (the only place it loads from), on the
    # stock encoder (operators' --encoder base): not the fine-tuned one the default classifier uses
    ops = classifier_dir() / f"ops-{tmp_path.name}"
    train(ClassifierTrainConfig(data=ops_data, out=ops, model="embed", encoder="base", threshold=0.3,
                                val_fraction=0.34), log=lambda *a: None)
    default_tasks = list(gw.server.classifier.current.tasks)
    with Client(gw.target, timeout=300) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.admin.ReloadClassifier(pb.ReloadClassifierRequest(path=str(classifier_dir() / "nope")), timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "nope" in e.value.details()
        assert c.classify(CODE_PROMPT).task == "code"  # still the configured classifier
        try:
            r = c.admin.ReloadClassifier(pb.ReloadClassifierRequest(path=str(ops)), timeout=120)
            assert sorted(r.tasks) == ["other", "refund", "status"]
            assert gw.server.classifier.current._embedder is not None  # warmed before the swap
            assert c.classify("Where is my parcel right now?").task == "status"
            assert {enc for _, enc in _SHARED} == {"base"}  # the fine-tuned encoder is no longer held
        finally:
            r = c.admin.ReloadClassifier(pb.ReloadClassifierRequest(), timeout=120)
        assert list(r.tasks) == default_tasks and c.classify(CODE_PROMPT).task == "code"
        assert {enc for _, enc in _SHARED} == {gw.server.classifier.current.embedder.encoder_id}
    shutil.rmtree(ops)


def test_kill_9_gateway_under_load_loses_no_acknowledged_record(vllm_server, tmp_path, poll, repo_root):
    """A gateway process is SIGKILLed while 4 clients stream; every fully received answer is in the log."""
    from router.managed import free_port

    port = free_port()
    db = tmp_path / "crash.sqlite3"
    env = dict(os.environ, SPECIALIST_ROUTER__LOGS__PATH=str(db), SPECIALIST_ROUTER__BACKEND__API_KEY=vllm_server.api_key)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--backend-url", vllm_server.url,
                             "--model", str(vllm_server.model_dir), "--port", str(port), "--http-port", "0", "--no-classifier",
                             "--log-level", "WARNING"], cwd=repo_root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = f"127.0.0.1:{port}"
    try:
        def ready():
            try:
                with Client(target, timeout=5) as c:
                    c.generate("hi", max_tokens=1)
                return True
            except GatewayError:
                return False
        poll(ready, timeout_s=120, interval_s=0.5, what="the gateway process to serve")
        acked: list[str] = []
        stop = threading.Event()

        def load(i):
            with Client(target, timeout=60, retry=RetryPolicy(attempts=1)) as c:
                while not stop.is_set():
                    try:
                        chunks = list(c.stream(f"Count to {i} please.", max_tokens=12, temperature=0))
                        if chunks and chunks[-1].finished:
                            acked.append(chunks[-1].request_id)
                    except GatewayError:
                        return

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        poll(lambda: len(acked) >= 12, timeout_s=180, what="requests to complete under load")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    store = open_store(db)
    assert store.integrity_check() == []
    missing = [rid for rid in acked if store.get(rid) is None]
    assert not missing, f"{len(missing)} acknowledged records lost: {missing[:3]}"
    store.close()
