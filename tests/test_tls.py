"""TLS and mutual TLS on both doors, with certificates made here (trustme): the SDK and the `openai` client connect
over TLS; a plaintext client is refused; mutual TLS refuses a client without a certificate."""
from __future__ import annotations

import ssl

import grpc
import httpx
import openai
import pytest
import trustme

from router.client import Client, GatewayError, RetryPolicy

pytestmark = pytest.mark.vllm
HELLO = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@example.com")
    files = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key", "client_cert": d / "client.pem",
             "client_key": d / "client.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    for f in files.values():
        f.chmod(0o600)
    return {k: str(v) for k, v in files.items()}


def _ssl_context(pki, with_client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    if with_client_cert:
        ctx.load_cert_chain(pki["client_cert"], pki["client_key"])
    return ctx


def test_tls_on_both_doors_and_plaintext_refused(gateway_factory, pki):
    gw = gateway_factory({"tls": {"cert_file": pki["cert"], "key_file": pki["key"]}})
    assert gw.http_url.startswith("https://")
    with Client(gw.target, root_certificates=pki["ca"], timeout=300) as c:
        assert c.generate(HELLO, adapter="base", max_tokens=3).usage.completion_tokens > 0
    with openai.OpenAI(base_url=f"{gw.http_url}/v1", api_key="unused", max_retries=0,
                       http_client=httpx.Client(verify=_ssl_context(pki, False), timeout=300)) as oai:
        r = oai.chat.completions.create(model="base", messages=HELLO, max_tokens=3)
        assert r.usage.completion_tokens > 0
    with Client(gw.target, timeout=20, retry=RetryPolicy(attempts=1)) as plain:  # plaintext gRPC to a TLS port
        with pytest.raises(GatewayError) as e:
            plain.generate(HELLO, max_tokens=3)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP to the TLS port
        httpx.get(gw.http_url.replace("https://", "http://") + "/health", timeout=20)
    with pytest.raises(httpx.ConnectError):  # TLS, but a client that does not trust the gateway's CA
        httpx.get(f"{gw.http_url}/health", timeout=20)


def test_mutual_tls_refuses_clients_without_a_certificate(gateway_factory, pki):
    gw = gateway_factory({"tls": {"cert_file": pki["cert"], "key_file": pki["key"], "client_ca_file": pki["ca"]}})
    with Client(gw.target, root_certificates=pki["ca"], client_cert=pki["client_cert"], client_key=pki["client_key"],
                timeout=300) as c:
        assert c.generate(HELLO, adapter="base", max_tokens=3).text is not None
    with Client(gw.target, root_certificates=pki["ca"], timeout=20, retry=RetryPolicy(attempts=1)) as no_cert:
        with pytest.raises(GatewayError) as e:
            no_cert.generate(HELLO, max_tokens=3)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    r = httpx.get(f"{gw.http_url}/health", verify=_ssl_context(pki, True), timeout=20)
    assert r.status_code == 200
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.get(f"{gw.http_url}/health", verify=_ssl_context(pki, False), timeout=20)


def test_tls_config_errors_say_what_to_fix(tmp_path):
    from core.errors import ConfigError
    from router import config

    with pytest.raises(ConfigError, match="needs both tls.cert_file and tls.key_file"):
        config.load(None, {"tls": {"cert_file": str(tmp_path / "x.pem")}}).validate()
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(None, {"tls": {"cert_file": str(tmp_path / "x.pem"), "key_file": str(tmp_path / "y")}}).validate()
