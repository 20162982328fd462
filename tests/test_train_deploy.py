"""End to end without restarting the gateway: logs -> train (real steps) -> gate -> register -> deploy through
AdminService -> the task's requests are answered by the new adapter version, whose output differs from base."""
from __future__ import annotations

import pytest
from training_fixtures import fast_cfg, fill_store

from adapters.registry import Registry
from basemodel import fingerprint
from cli.train import deploy_through_gateway
from router.client import Client

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_trained_specialist_is_gated_deployed_and_served(gateway_factory, model_dir, tmp_path):
    import training

    gw = gateway_factory({"registry": str(tmp_path / "registry")})
    prompt = "Compute 12 + 30."
    with Client(gw.target, timeout=300) as c:
        base = c.generate(prompt, task="math", max_tokens=16, temperature=0)
        assert base.adapter == ""  # no math specialist yet: base model answers
        fill_store(tmp_path)
        cfg = fast_cfg(tmp_path, "run", forgetting_bound=5.0, deploy=True, gateway=gw.target,
                       base_model=str(model_dir), served_fingerprint=fingerprint(model_dir))
        # the SDK's DeployAdapter call, as `specialist-router train --deploy` passes it
        rep = training.run(cfg, show_progress=False, deploy=deploy_through_gateway(cfg))
        assert rep.status == "deployed", (rep.status, rep.message, rep.gate, rep.deploy)
        reg = Registry(tmp_path / "registry")
        prod = reg.production("math")
        assert prod is not None and prod.name == rep.adapter
        after = c.generate(prompt, task="math", max_tokens=16, temperature=0)
        assert after.adapter == prod.name
        assert after.text != base.text
        assert "SUM" in after.text  # it learned the logged answer format
