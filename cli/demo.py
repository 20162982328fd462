"""What `specialist-router demo` shows: real requests through the SDK against the running embedded service.

1. a prompt routed by the classifier (the base model answers until a specialist is deployed),
2. the same answer streamed,
3. a LoRA adapter hot-loaded at run time (a small demo adapter made with peft on the real base, so this
   works on a fresh machine before any specialist has been trained), answering the same prompt.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from core import paths
from core.files import publish_dir
from router.client import AsyncClient

DEMO_ADAPTER = "demo-lora"


def make_adapter(base_dir: str | Path, out_dir: str | Path, *, seed: int = 0, r: int = 8,
                 target_modules=("q_proj", "k_proj", "v_proj", "o_proj")) -> Path:
    """A real PEFT LoRA on the base model with random non-zero weights (changes outputs; not trained)."""
    # lazy: torch + transformers + peft (~4 s), only for the one-time demo adapter
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if (out / "adapter_model.safetensors").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    # init_lora_weights=False: both A and B random (the default B=0 would be a no-op adapter)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules),
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    tmp = out.with_name(f".{out.name}.tmp")
    peft_model.save_pretrained(str(tmp))
    publish_dir(tmp, out)
    return out


async def run_demo(server, *, once: bool = False) -> None:
    prompt = "Write a Python function that returns the square of a number."
    async with AsyncClient(server.target, timeout=300) as c:
        print("\n=== 1. Generate (routed by the classifier) ===")
        r = await c.generate(prompt, max_tokens=80, temperature=0)
        print(f"route: task={r.route.task or '-'} confidence={r.route.confidence:.2f} reason={r.route.reason}")
        print(f"adapter: {r.adapter or 'base model'}  tokens: {r.usage.prompt_tokens}+{r.usage.completion_tokens}"
              f"  ttft: {r.timings.ttft_ms:.0f} ms  total: {r.timings.total_ms:.0f} ms")
        print(r.text)

        print("\n=== 2. GenerateStream (one message per text delta) ===")
        async for ch in c.stream("Name three primary colors.", max_tokens=40, temperature=0):
            print(ch.delta, end="", flush=True)
        print()

        print(f"\n=== 3. A LoRA adapter hot-loaded at run time ({DEMO_ADAPTER}: random weights, untrained;"
              " trained specialists come from `specialist-router train`) ===")
        if server.model_dir:
            path = await asyncio.get_running_loop().run_in_executor(
                None, make_adapter, server.model_dir, paths.local_adapters_dir() / f"{DEMO_ADAPTER}-v2")
            if DEMO_ADAPTER not in (a.name for a in (await c.list_adapters()).loaded):
                await c.load_adapter(DEMO_ADAPTER, str(path))
            base = await c.generate(prompt, max_tokens=40, temperature=0, adapter="base")
            lora = await c.generate(prompt, max_tokens=40, temperature=0, adapter=DEMO_ADAPTER)
            print(f"base model : {base.text!r}")
            print(f"{DEMO_ADAPTER:<11}: {lora.text!r}  (adapter field: {lora.adapter})")
            print("the adapter changed the answer" if base.text != lora.text else "same answer (unexpected)")
        else:
            print("(external backend without a local base folder: skipped; deploy specialists with "
                  "`specialist-router adapters deploy`)")
        listing = await c.list_adapters()
        print("\nloaded adapters:", [a.name for a in listing.loaded] or "none",
              "| routes:", listing.routes or "none (base model answers)")
    if not once:
        print(f"\nTry it yourself:\n  .venv/bin/python -c \"from router.client import Client; "
              f"print(Client('{server.target}').generate('Hello!').text)\"")
