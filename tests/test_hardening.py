"""The admin surface and the edges, probed as an attacker and a careless client would: against the real gateway,
the real vLLM and real files. One test per defect that was found: code execution from a path, an engine that
answered anyone, adapters loaded from anywhere or squatted, permanent errors reported as retryable, unbounded
inputs, weak tokens."""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil

import grpc
import httpx
import pytest
from safetensors.numpy import load_file, save_file

import classifier
from adapters.registry import Registry
from basemodel import fingerprint
from core.config import ConfigError
from core.errors import FailedPrecondition
from core.paths import classifier_dir
from router.auth import load_tokens
from router.backend import VLLMBackend
from router.client import Client, GatewayError
from router.config import AuthConfig

pytestmark = pytest.mark.vllm
PROMPT = "Say hello."


# ------------------------------------------------------------------------------------------ the engine


def test_managed_vllm_refuses_requests_without_the_gateways_key(vllm_server):
    """The managed vLLM listens on loopback: without its per-start key nothing else on the host can generate,
    load or unload adapters (bypassing the gateway's auth, checks and logs)."""
    for method, path, body in (("GET", "/v1/models", None),
                               ("POST", "/v1/chat/completions", {"model": vllm_server.model, "max_tokens": 1,
                                                                 "messages": [{"role": "user", "content": "hi"}]}),
                               ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
                               ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"})):
        r = httpx.request(method, vllm_server.url + path, json=body, timeout=30)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
        r = httpx.request(method, vllm_server.url + path, json=body, timeout=30,
                          headers={"Authorization": "Bearer not-the-key"})
        assert r.status_code == 401, path
    assert httpx.get(vllm_server.url + "/v1/models", headers=vllm_server.headers, timeout=30).status_code == 200


async def test_vllm_refusing_an_adapter_is_failed_precondition_not_unavailable(vllm_server, tmp_path):
    """A folder vLLM cannot load is a permanent problem of that adapter: FAILED_PRECONDITION (not retried by the
    SDK), with vLLM's reason in one line. Only an unreachable engine is UNAVAILABLE."""
    (tmp_path / "adapter_config.json").write_text("{}")
    backend = VLLMBackend(vllm_server.url, api_key=vllm_server.api_key)
    try:
        with pytest.raises(FailedPrecondition) as e:
            await backend.load_lora("broken-adapter", str(tmp_path))
        assert "\n" not in str(e.value) and "vLLM refused the adapter" in str(e.value)
    finally:
        await backend.close()


# ------------------------------------------------------------------------------------- the classifier


def _pickle_artifact(root, source_version_dir, marker):
    """A classifier version folder whose model is a pickle with a payload, its sha256 in its own metadata."""
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    v = root / "v-evil"
    shutil.copytree(source_version_dir, v)
    for f in ("model.safetensors", "model.json"):
        (v / f).unlink()
    blob = pickle.dumps(Payload())
    (v / "model.joblib").write_bytes(blob)
    meta = json.loads((v / "metadata.json").read_text())
    meta.update(format_version=1, files={**{k: d for k, d in meta["files"].items() if not k.startswith("model.")},
                                         "model.joblib": hashlib.sha256(blob).hexdigest()})
    (v / "metadata.json").write_text(json.dumps(meta))
    (root / "current").write_text("v-evil\n")
    return root


def test_reload_classifier_loads_only_from_the_gateways_folder_and_never_unpickles(gateway_factory, tmp_path):
    gw = gateway_factory({"classifier": {"enabled": True}})
    marker = tmp_path / "payload-ran"
    default_version = classifier.ensure_default()
    outside = _pickle_artifact(tmp_path / "outside", default_version, marker)
    inside = _pickle_artifact(classifier_dir() / "test-evil", default_version, marker)
    try:
        with Client(gw.target, timeout=120) as c:
            for path in (outside, outside / "v-evil", tmp_path / "does-not-exist"):
                with pytest.raises(GatewayError) as e:
                    c.reload_classifier(str(path))
                assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
                assert str(classifier_dir()) in e.value.message  # names the allowed root
            link = classifier_dir() / "test-link-out"
            link.symlink_to(outside, target_is_directory=True)
            with pytest.raises(GatewayError) as e:  # a symlink inside pointing out is outside
                c.reload_classifier(str(link))
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "outside" in e.value.message
            with pytest.raises(GatewayError) as e:  # inside the root: still never unpickled
                c.reload_classifier(str(inside))
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "pickle" in e.value.message
            assert c.generate(PROMPT, max_tokens=2).route.reason in ("specialist", "low_confidence", "general_task",
                                                                      "no_adapter")  # still classifying
        assert not marker.exists()
    finally:
        shutil.rmtree(classifier_dir() / "test-evil", ignore_errors=True)
        (classifier_dir() / "test-link-out").unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- adapters


@pytest.fixture()
def strict_gateway(gateway_factory, tmp_path):
    """A gateway that loads adapters only from its registry and `<tmp>/allowed` (not the whole pytest tmp)."""
    (tmp_path / "allowed").mkdir()
    reg = Registry(tmp_path / "registry")
    gw = gateway_factory({"registry": str(reg.root), "adapter_roots": [str(tmp_path / "allowed")]})
    return gw, reg


def test_load_adapter_only_from_allowed_folders(strict_gateway, model_dir, make_lora, tmp_path):
    gw, _ = strict_gateway
    outside = make_lora(model_dir, tmp_path / "outside-lora", seed=71)
    (tmp_path / "allowed" / "link").symlink_to(outside, target_is_directory=True)
    with Client(gw.target, timeout=120) as c:
        answers = []
        for path in (outside, tmp_path / "allowed" / "link", tmp_path / "no-such-folder", "/etc"):
            with pytest.raises(GatewayError) as e:
                c.load_adapter("probe", str(path))
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            answers.append(e.value.message.split(" is outside ", 1)[1])
        # the same answer whether the folder exists or not: no probing of host paths
        assert len(set(answers)) == 1 and answers[0].startswith("the folders this gateway loads adapters from")
        ok = shutil.copytree(outside, tmp_path / "allowed" / "good")
        assert c.load_adapter("probe-ok", str(ok)).name == "probe-ok"
        with pytest.raises(GatewayError) as e:  # a second load of the name from another folder
            c.load_adapter("probe-ok", str(shutil.copytree(outside, tmp_path / "allowed" / "other")))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "another folder" in e.value.message
        c.unload_adapter("probe-ok")


def _reshaped(src, dst, *, rank_pad: int = 0, in_pad: int = 0):
    """A copy of a real LoRA whose factors no longer fit the base (in_pad) or have a higher rank (rank_pad)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    import numpy as np

    out = {}
    for k, t in tensors.items():
        if "lora_A" in k:
            t = np.pad(t, ((0, rank_pad), (0, in_pad)))
        elif "lora_B" in k:
            t = np.pad(t, ((0, 0), (0, rank_pad)))
        out[k] = np.ascontiguousarray(t)
    save_file(out, str(dst / "adapter_model.safetensors"))
    if rank_pad:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg["r"] += rank_pad
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_adapters_the_engine_cannot_serve_are_failed_precondition_and_not_retried(strict_gateway, model_dir,
                                                                                   make_lora, tmp_path):
    gw, reg = strict_gateway
    good = make_lora(model_dir, tmp_path / "allowed" / "good", seed=72)
    allowed = tmp_path / "allowed"
    truncated = shutil.copytree(good, allowed / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    garbage = shutil.copytree(good, allowed / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    cases = {truncated: "truncated", garbage: "safetensors",
             _reshaped(good, allowed / "other-base", in_pad=64): "does not fit",
             _reshaped(good, allowed / "high-rank", rank_pad=120): "max_lora_rank"}
    with Client(gw.target, timeout=120) as c:
        for path, fragment in cases.items():
            with pytest.raises(GatewayError) as e:
                c.load_adapter(f"bad-{path.name}", str(path))
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION, (path.name, e.value)
            assert fragment in e.value.message, (path.name, e.value.message)
        assert {a.name for a in c.list_adapters().loaded}.isdisjoint({f"bad-{p.name}" for p in cases})
    # the registry refuses an adapter shaped for another base at register time (not first at deploy)
    from adapters.validation import base_weight_shapes

    with pytest.raises(FailedPrecondition, match="does not fit"):
        reg.register("code", allowed / "other-base", base_model_id="SmolLM2", base_fingerprint=fingerprint(model_dir),
                     base_shapes=base_weight_shapes(model_dir))


def test_a_squatted_name_is_not_served_after_a_deploy(strict_gateway, model_dir, make_lora, tmp_path):
    """Loading any folder as `code@1` and then deploying the registry's code@1 must serve the registry's files."""
    gw, reg = strict_gateway
    real = make_lora(model_dir, tmp_path / "real", seed=73)
    squatter = make_lora(model_dir, tmp_path / "allowed" / "squatter", seed=74)
    v = reg.register("code", real, base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                     base_fingerprint=fingerprint(model_dir))
    with Client(gw.target, timeout=300) as c:
        c.load_adapter(v.name, str(squatter))
        squatted = c.generate(PROMPT, adapter=v.name, max_tokens=12, temperature=0).text
        c.deploy("code", v.version)
        info = {a.name: a for a in c.list_adapters().loaded}[v.name]
        assert info.path == str(v.path.resolve()) and info.routed
        served = c.generate(PROMPT, task="code", max_tokens=12, temperature=0)
        assert served.adapter == v.name and served.text != squatted
        c.retire("code")


# --------------------------------------------------------------------------------------------- inputs


def test_every_free_text_field_is_bounded_and_errors_quote_little(gateway_factory):
    gw = gateway_factory({"logs": {"enabled": True}, "limits": {"max_message_chars": 5000,
                                                                "max_request_chars": 8000}})
    lim = gw.server.cfg.limits
    with Client(gw.target, timeout=60) as c:
        cases = [
            (lambda: c.generate(PROMPT, stop=["x" * (lim.max_stop_chars + 1)], max_tokens=2), "max_stop_chars"),
            (lambda: c.generate([{"role": "user", "content": "y" * 4000}] * 3, max_tokens=2), "max_request_chars"),
            (lambda: c.generate([{"role": "user", "content": "z"}] * (lim.max_messages + 1), max_tokens=2),
             "max_messages"),
            (lambda: c.generate(PROMPT, adapter="a" * 10_000, max_tokens=2), "longer than"),
            (lambda: c.generate(PROMPT, client_id="c" * 10_000, max_tokens=2), "longer than"),
            (lambda: c.classify("w" * (lim.max_message_chars + 1)), "max_message_chars"),
            (lambda: c.feedback("r" * 10_000, 5), "longer than"),
            (lambda: c.feedback("some-request", 5, correction="k" * (lim.max_feedback_chars + 1)),
             "max_feedback_chars"),
            (lambda: c.feedback("some-request", 5, comment="m" * (lim.max_comment_chars + 1)), "max_comment_chars"),
        ]
        for call, fragment in cases:
            with pytest.raises(GatewayError) as e:
                call()
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, (fragment, e.value)
            assert fragment in e.value.message and len(e.value.message) < 400, e.value.message
        with pytest.raises(GatewayError) as e:  # over the receive limit: refused by gRPC itself, not stored
            c.feedback("some-request", 5, correction="q" * lim.receive_bytes())
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.generate(PROMPT, max_tokens=2).usage.completion_tokens >= 1  # and it keeps serving


def test_tokens_must_be_long_and_their_file_private(tmp_path):
    with pytest.raises(ConfigError, match="shorter than 32"):
        load_tokens(AuthConfig(enabled=True, tokens=[{"token": "short-token-0123456789", "scopes": ["generate"]}]))
    f = tmp_path / "tokens.yaml"
    f.write_text("tokens:\n  - {token: a-long-random-token-0123456789abcdefgh, scopes: [admin]}\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_tokens(AuthConfig(enabled=True, tokens_file=str(f)))
    f.chmod(0o600)
    assert [t.scopes for t in load_tokens(AuthConfig(enabled=True, tokens_file=str(f)))] == [frozenset({"admin"})]


def test_the_sdk_retries_only_unavailable():
    """Permanent errors (FAILED_PRECONDITION, INVALID_ARGUMENT, ...) are never retried: gRPC's retry policy in the
    SDK's channel lists UNAVAILABLE alone; attempts=1 switches retries off."""
    from router.client import RetryPolicy, channel_options

    opts = dict(channel_options())
    policy = json.loads(opts["grpc.service_config"])["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"] and policy["maxAttempts"] == 4
    assert dict(channel_options(RetryPolicy(attempts=1)))["grpc.enable_retries"] == 0
    with pytest.raises(ValueError, match="1..5"):
        RetryPolicy(attempts=9).service_config()
