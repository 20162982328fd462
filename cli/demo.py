"""What `specialist-router demo` shows: real requests through the SDK against the running embedded service.

1. the shipped code specialist (`cli/demo_specialist/`: a LoRA trained by `specialist-router train` on real
   ShareGPT conversations, see its REPRODUCE.md) registered in the adapter registry on first run and deployed
   through the gateway's zero-downtime path (AdminService.DeployAdapter: validate, load into the running vLLM,
   switch the route); a later run finds it registered and deployed and registers nothing,
2. a code prompt routed by the classifier to that specialist, beside the base model's answer to the same prompt
   (greedy decoding, so both are reproducible),
3. a general prompt streamed (no specialist for `general`: the base model answers).
"""
from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import basemodel
from adapters.registry import AdapterVersion, Registry
from adapters.validation import CONFIG_FILE, WEIGHTS_FILE, base_weight_shapes
from core.errors import FailedPrecondition
from core.files import sha256_file
from router.client import AsyncClient, GatewayError

SPECIALIST_DIR = Path(__file__).with_name("demo_specialist")  # package data: ships with the installed package
SPECIALIST_MANIFEST = "registry-manifest.json"  # the manifest the training run's registry wrote for it
SPECIALIST_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # the PEFT files that are registered (the rest is provenance)
SPECIALIST_TAG = "demo_specialist"  # manifest field marking versions registered by the demo
CODE_PROMPT = "Write a Python function that checks whether a string is a palindrome."
MAX_TOKENS = 160


def shipped_manifest(folder: Path = SPECIALIST_DIR) -> dict:
    """The registry manifest of the shipped specialist (task, base fingerprint, data fingerprint, gate metrics)."""
    return json.loads((folder / SPECIALIST_MANIFEST).read_text())


def ensure_specialist(registry: Registry, model_dir: str | Path, folder: Path = SPECIALIST_DIR
                      ) -> tuple[AdapterVersion, bool]:
    """Register the shipped specialist unless the registry already holds it; return (version, registered now).

    Refused (FailedPrecondition) when `model_dir` is not the base it was trained on (weights fingerprint), or when a
    shipped file does not match the sha256 its manifest records. "Already holds it" means a version of the task whose
    weights file has the shipped sha256, so a second run registers no second copy.
    """
    m = shipped_manifest(folder)
    task = m["task"]
    served = basemodel.fingerprint(Path(model_dir))
    if served != m["base_fingerprint"]:
        raise FailedPrecondition(
            f"the shipped {task} specialist was trained on {m['base_model_id']} ({m['base_fingerprint'][:19]}...), "
            f"but the served base {model_dir} is {served[:19]}...; it only runs on the embedded default")
    for name in SPECIALIST_FILES:
        if sha256_file(folder / name) != m["files"][name]:
            raise FailedPrecondition(f"{folder / name} does not match the sha256 in {folder / SPECIALIST_MANIFEST}; "
                                     "reinstall the package (or re-create the specialist: REPRODUCE.md)")
    weights_sha = m["files"][WEIGHTS_FILE]
    if registry.root.joinpath(task).is_dir():
        for v in registry.versions(task):
            if v.manifest.get("files", {}).get(WEIGHTS_FILE) == weights_sha:
                return v, False
    with tempfile.TemporaryDirectory(prefix="demo-specialist-") as tmp:
        for name in SPECIALIST_FILES:  # only the PEFT files: report.json, loss.png... stay out of the version
            shutil.copyfile(folder / name, Path(tmp) / name)
        v = registry.register(task, tmp, base_model_id=m["base_model_id"], base_fingerprint=served,
                              data_fingerprint=m.get("data_fingerprint", ""), metrics=m.get("metrics") or {},
                              base_shapes=base_weight_shapes(model_dir),
                              extra={SPECIALIST_TAG: {"shipped_as": f"{m['name']} of the training run",
                                                      "weights_sha256": weights_sha}})
    return v, True


async def deploy_specialist(c: AsyncClient, server) -> str:
    """Register (first run) and deploy the shipped specialist through the gateway; return its adapter name, or ""
    when it cannot run here (another base, an external backend without a local base folder)."""
    if not server.model_dir:
        print("(external backend without a local base folder: the shipped specialist is skipped; deploy your own "
              "with `specialist-router adapters deploy`)")
        return ""
    registry = Registry(server.cfg.registry or None)
    loop = asyncio.get_running_loop()
    try:
        v, registered = await loop.run_in_executor(None, ensure_specialist, registry, server.model_dir)
    except FailedPrecondition as exc:
        print(f"(shipped specialist skipped: {exc})")
        return ""
    m = v.manifest.get("metrics") or {}
    print(f"{v.name}: LoRA rank {v.rank} on {', '.join(v.target_modules)}, trained by `specialist-router train` on "
          f"{m.get('train_records', '?')} real ShareGPT {v.task} conversations ({m.get('steps', '?')} steps); "
          f"held-out {v.task} loss {m.get('base_eval_loss', float('nan')):.3f} (base) -> "
          f"{m.get('eval_loss', float('nan')):.3f} (specialist), forgetting on other tasks {m.get('forgetting', 0):+.1%}")
    print(f"registry: {'registered now as' if registered else 'already holds it as'} {v.name} ({v.path})")
    prod = await loop.run_in_executor(None, registry.production, v.task)
    if prod is not None and prod.version == v.version:
        print(f"deploy: {v.name} already serves {v.task} (deployed on an earlier run, loaded at gateway start)")
        return v.name
    if prod is not None and SPECIALIST_TAG not in prod.manifest:
        print(f"deploy: skipped, {v.task} is served by your {prod.name}; the demo leaves it in place "
              f"(`specialist-router adapters deploy {v.task} {v.version}` switches to the shipped one)")
        return v.name
    try:  # no production yet, or an older shipped specialist (the demo's own): deploy this one
        d = await c.deploy(v.task, v.version)
    except GatewayError as exc:  # the gateway refuses it (validation, vLLM): say why, the rest of the demo still runs
        print(f"deploy: refused by the gateway: {exc}")
        return ""
    print(f"deploy: {d.adapter} validated, hot-loaded into the running vLLM and routed for {d.task} "
          f"(AdminService.DeployAdapter, no restart, no dropped request; swap {d.swap_ms:.0f} ms)")
    return d.adapter


def _show(label: str, r) -> None:
    print(f"--- {label}: adapter={r.adapter or 'base'}  tokens={r.usage.prompt_tokens}+{r.usage.completion_tokens}"
          f"  finish={r.finish_reason}  total={r.timings.total_ms:.0f} ms")
    print(r.text.rstrip())


async def run_demo(server, *, once: bool = False) -> None:
    async with AsyncClient(server.target, timeout=300) as c:
        print("\n=== 1. The shipped code specialist: registered, deployed with no downtime ===")
        specialist = await deploy_specialist(c, server)

        print("\n=== 2. A code prompt, routed by the classifier (greedy decoding) ===")
        print(f"prompt: {CODE_PROMPT}")
        r = await c.generate(CODE_PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        print(f"route: task={r.route.task or '-'} confidence={r.route.confidence:.2f} reason={r.route.reason} "
              f"adapter={r.adapter or 'base'}")
        base = await c.generate(CODE_PROMPT, max_tokens=MAX_TOKENS, temperature=0, adapter="base")
        _show("routed answer", r)
        _show("base model answer to the same prompt (adapter=\"base\")", base)
        if specialist and r.adapter == specialist:
            print(f"the classifier sent the prompt to {specialist}; "
                  + ("its answer differs from the base model's" if r.text != base.text else "same text as the base"))

        print("\n=== 3. GenerateStream, a general prompt (no specialist: the base model answers) ===")
        route = None
        async for ch in c.stream("Name three primary colors.", max_tokens=40, temperature=0):
            print(ch.delta, end="", flush=True)
            route = ch.route or route
        print(f"\n(route: task={route.task or '-'} reason={route.reason})" if route else "")
        listing = await c.list_adapters()
        print("\nloaded adapters:", [a.name for a in listing.loaded] or "none",
              "| routes:", listing.routes or "none (base model answers)")
    if not once:
        print(f"\nTry it yourself:\n  .venv/bin/python -c \"from router.client import Client; "
              f"r = Client('{server.target}').generate('Write a SQL query that counts users per country.'); "
              f"print(r.adapter or 'base', r.text)\"")
