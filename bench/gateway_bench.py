"""`python bench/gateway_bench.py`: gateway vs direct vLLM, same prompts, interleaved in one run.

Real first-turn prompts from ShareGPT; greedy decoding so both paths generate the same tokens. For every
concurrency level the modes alternate (gateway, direct, gateway, direct, ...) so drift on a shared machine
hits both alike. Reported: output tokens/s ratio (gateway / direct) and the latency the gateway adds
(TTFT and end-to-end, p50 and p99, in ms). The gateway runs as its own process (as in production);
optional variants with the classifier and/or conversation logging on run in the same interleaving.
`--http` adds the gateway's OpenAI-compatible HTTP door (`gateway-http`, the same gateway process, streamed SSE read
exactly as the direct path reads vLLM's); `--metrics-off` adds a gateway started with `--no-metrics`, so metrics on
vs off is a ratio of the same run. `--paired N` adds a concurrency-1 measurement interleaved per request (each prompt through every mode back
to back, N rounds) that reports the median paired difference with a bootstrap 95 % interval: the precise
way to resolve a few milliseconds of added latency on a noisy machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunStats:
    mode: str
    concurrency: int
    ttft_ms: list = field(default_factory=list)
    e2e_ms: list = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    errors: int = 0
    round: int = 0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


class _Direct:
    """One persistent HTTP session to vLLM; `once(prompt)` -> (ttft_ms, e2e_ms, tokens)."""

    def __init__(self, url: str, model: str, max_tokens: int, limit: int = 4, api_key: str = ""):
        self.url, self.model, self.max_tokens, self.limit = url, model, max_tokens, limit
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def __aenter__(self):
        import aiohttp

        self.s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.limit), headers=self.headers)
        return self

    async def __aexit__(self, *exc):
        await self.s.close()

    async def once(self, p: str) -> tuple[float, float, int]:
        body = {"model": self.model, "messages": [{"role": "user", "content": p}], "max_tokens": self.max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        t0, ttft, tokens = time.perf_counter(), None, 0
        async with self.s.post(f"{self.url}/v1/chat/completions", json=body) as r:
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                chunk = json.loads(line[5:])
                ch = chunk.get("choices") or []
                if ch and (ch[0].get("delta") or {}).get("content") and ttft is None:
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
        e2e = time.perf_counter() - t0
        return 1000 * (ttft if ttft is not None else e2e), 1000 * e2e, tokens


class _Gateway:
    """One persistent gRPC channel to a gateway; `once(prompt)` -> (ttft_ms, e2e_ms, tokens)."""

    def __init__(self, target: str, mode: str, max_tokens: int):
        self.target, self.mode, self.max_tokens = target, mode, max_tokens

    async def __aenter__(self):
        import grpc

        from router.v1 import router_pb2_grpc as pbg

        self.ch = grpc.aio.insecure_channel(self.target)
        self.stub = pbg.RouterServiceStub(self.ch)
        return self

    async def __aexit__(self, *exc):
        await self.ch.close()

    async def once(self, p: str) -> tuple[float, float, int]:
        from router.v1 import router_pb2 as pb

        req = pb.GenerateStreamRequest(messages=[pb.ChatMessage(role="user", content=p)],
                                       sampling=pb.SamplingParams(max_tokens=self.max_tokens, temperature=0),
                                       adapter="base" if self.mode == "gateway" else "")
        t0, ttft, tokens = time.perf_counter(), None, 0
        async for m in self.stub.GenerateStream(req, timeout=600):
            if m.delta and ttft is None:
                ttft = time.perf_counter() - t0
            if m.finished:
                tokens = m.usage.completion_tokens
        e2e = time.perf_counter() - t0
        return 1000 * (ttft if ttft is not None else e2e), 1000 * e2e, tokens




async def _run_block(client, mode: str, prompts: list[str], conc: int) -> RunStats:
    """All prompts through one client at `conc` concurrent requests."""
    st = RunStats(mode, conc)
    sem = asyncio.Semaphore(conc)

    async def one(p: str) -> None:
        async with sem:
            try:
                ttft, e2e, tokens = await client.once(p)
            except Exception:
                st.errors += 1
                return
            st.ttft_ms.append(ttft)
            st.e2e_ms.append(e2e)
            st.tokens += tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    st.wall_s = time.perf_counter() - t0
    return st


async def run_direct(url: str, model: str, prompts: list[str], conc: int, max_tokens: int,
                     api_key: str = "") -> RunStats:
    async with _Direct(url, model, max_tokens, limit=conc * 2, api_key=api_key) as client:
        return await _run_block(client, "direct", prompts, conc)


HTTP_SUFFIX = "-http"


def client_for(mode: str, target: str, max_tokens: int, conc: int = 4):
    """The client of a gateway mode: gRPC streaming, or (`...-http`) OpenAI SSE against the gateway's HTTP door."""
    if mode.endswith(HTTP_SUFFIX):
        return _Direct(target, "base", max_tokens, limit=conc * 2)
    return _Gateway(target, mode, max_tokens)


async def run_gateway(target: str, mode: str, prompts: list[str], conc: int, max_tokens: int) -> RunStats:
    async with client_for(mode, target, max_tokens, conc) as client:
        return await _run_block(client, mode, prompts, conc)


def _median_ci(xs: list[float], iters: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Median and its 95 % bootstrap interval."""
    import random
    import statistics

    if not xs:
        return float("nan"), float("nan"), float("nan")
    rnd = random.Random(seed)
    meds = sorted(statistics.median(rnd.choices(xs, k=len(xs))) for _ in range(iters))
    return statistics.median(xs), meds[int(0.025 * iters)], meds[int(0.975 * iters) - 1]


async def run_paired(url: str, model: str, targets: dict, prompts: list[str], max_tokens: int,
                     rounds: int, api_key: str = "") -> dict:
    """Concurrency 1, interleaved per request: every prompt goes through every mode back to back (the order
    rotates per prompt), so the paired difference (mode - direct) for the same prompt and the same greedy
    tokens cancels prompt length and machine drift. Reports the median paired difference with a 95 % CI."""
    from contextlib import AsyncExitStack

    modes = ["direct", *targets]
    diffs: dict = {m: {"ttft": [], "e2e": [], "itl": []} for m in targets}
    raw: dict = {m: {"ttft": [], "e2e": []} for m in modes}
    errors = {m: 0 for m in modes}
    async with AsyncExitStack() as stack:
        clients = {"direct": await stack.enter_async_context(_Direct(url, model, max_tokens, api_key=api_key))}
        for m, t in targets.items():
            clients[m] = await stack.enter_async_context(client_for(m, t, max_tokens))
        for rnd in range(rounds):
            for i, p in enumerate(prompts):
                k = (i + rnd) % len(modes)
                res = {}
                for m in modes[k:] + modes[:k]:
                    try:
                        res[m] = await clients[m].once(p)
                    except Exception:
                        errors[m] += 1
                for m, (ttft, e2e, _n) in res.items():
                    raw[m]["ttft"].append(ttft)
                    raw[m]["e2e"].append(e2e)
                d = res.get("direct")
                for m in targets:
                    g = res.get(m)
                    if d is None or g is None or g[2] != d[2]:
                        continue  # same tokens only (greedy): otherwise the pair is not comparable
                    diffs[m]["ttft"].append(g[0] - d[0])
                    diffs[m]["e2e"].append(g[1] - d[1])
                    if g[2] > 1:  # added time per streamed token after the first
                        diffs[m]["itl"].append(((g[1] - g[0]) - (d[1] - d[0])) / (g[2] - 1))
    out: dict = {"pairs": {}, "direct_ttft_p50": pct(raw["direct"]["ttft"], 50),
                 "direct_e2e_p50": pct(raw["direct"]["e2e"], 50), "errors": errors}
    for m in targets:
        out["pairs"][m] = {k: dict(zip(("median", "ci_lo", "ci_hi"), _median_ci(v))) | {"n": len(v)}
                           for k, v in diffs[m].items()}
    return out


def render_paired(res: dict) -> str:
    lines = [f"concurrency 1, per-request interleaving; direct TTFT p50 {res['direct_ttft_p50']:.1f} ms, "
             f"e2e p50 {res['direct_e2e_p50']:.1f} ms",
             "| mode | pairs | added TTFT, median [95 % CI] ms | added e2e, median [95 % CI] ms | "
             "added per token after the first, median [95 % CI] ms |", "|---|---|---|---|---|"]
    for m, d in res["pairs"].items():
        f = lambda k: f"{d[k]['median']:+.2f} [{d[k]['ci_lo']:+.2f}, {d[k]['ci_hi']:+.2f}]"  # noqa: E731
        lines.append(f"| {m} | {d['ttft']['n']} | {f('ttft')} | {f('e2e')} | {f('itl')} |")
    return "\n".join(lines)


def start_gateway(url: str, model: str, port: int, *, classifier: bool, logs: bool, data_dir: Path,
                  classifier_threads: int | None = None, api_key: str = "", http_port: int = 0,
                  metrics: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cli", "serve", "--backend-url", url, "--model", model, "--port", str(port),
           "--http-port", str(http_port), "--log-level", "WARNING"]
    if not metrics:
        cmd.append("--no-metrics")
    if not classifier:
        cmd.append("--no-classifier")
    if not logs:
        cmd.append("--no-logs")
    env = dict(os.environ, SPECIALIST_ROUTER__LOGS__PATH=str(data_dir / f"bench-logs-{port}.sqlite3"),
               SPECIALIST_ROUTER__BACKEND__API_KEY=api_key)
    if classifier_threads is not None:
        env["SPECIALIST_ROUTER__CLASSIFIER__THREADS"] = str(classifier_threads)
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_gateway(target: str, timeout_s: float = 300) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with grpc.aio.insecure_channel(target) as ch:
                r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError(f"gateway {target} did not become SERVING")


def summarize(runs: list[RunStats], modes: list[str], concs: list[int]) -> dict:
    out: dict = {}
    for c in concs:
        agg = {}
        for m in modes:
            rs = [r for r in runs if r.mode == m and r.concurrency == c]
            agg[m] = dict(tok_s=sum(r.tokens for r in rs) / max(1e-9, sum(r.wall_s for r in rs)),
                          ttft_p50=pct([x for r in rs for x in r.ttft_ms], 50),
                          ttft_p99=pct([x for r in rs for x in r.ttft_ms], 99),
                          e2e_p50=pct([x for r in rs for x in r.e2e_ms], 50),
                          e2e_p99=pct([x for r in rs for x in r.e2e_ms], 99),
                          errors=sum(r.errors for r in rs), requests=sum(len(r.e2e_ms) for r in rs))
        d = agg["direct"]
        for m in modes:
            if m == "direct":
                continue
            g = agg[m]
            g["ratio_tok_s"] = g["tok_s"] / d["tok_s"] if d["tok_s"] else float("nan")
            # one ratio per interleaved round (mode and direct ran back to back): their spread is the noise
            per_round = []
            for rnd in sorted({r.round for r in runs if r.concurrency == c}):
                a = [r for r in runs if r.mode == m and r.concurrency == c and r.round == rnd]
                b = [r for r in runs if r.mode == "direct" and r.concurrency == c and r.round == rnd]
                if a and b and b[0].tok_s:
                    per_round.append(a[0].tok_s / b[0].tok_s)
            g["ratio_per_round"] = per_round
            g["ratio_median"] = pct(per_round, 50)
            for k in ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99"):
                g["added_" + k] = g[k] - d[k]
        out[str(c)] = agg
    return out


def render(summary: dict) -> str:
    lines = ["| concurrency | mode | tok/s | ratio vs direct (pooled; per-round median [min, max]) | TTFT p50 / p99 ms | "
             "added TTFT p50 / p99 | e2e p50 / p99 ms | added e2e p50 / p99 | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c, agg in summary.items():
        for m, g in agg.items():
            ratio = "1"
            if "ratio_tok_s" in g:
                pr = g.get("ratio_per_round") or [float("nan")]
                ratio = f"{g['ratio_tok_s']:.3f}; {g['ratio_median']:.3f} [{min(pr):.3f}, {max(pr):.3f}]"
            added_t = f"{g['added_ttft_p50']:+.1f} / {g['added_ttft_p99']:+.1f}" if "added_ttft_p50" in g else "-"
            added_e = f"{g['added_e2e_p50']:+.1f} / {g['added_e2e_p99']:+.1f}" if "added_e2e_p50" in g else "-"
            lines.append(f"| {c} | {m} | {g['tok_s']:.1f} | {ratio} | {g['ttft_p50']:.1f} / {g['ttft_p99']:.1f} | "
                         f"{added_t} | {g['e2e_p50']:.1f} / {g['e2e_p99']:.1f} | {added_e} | {g['errors']} |")
    return "\n".join(lines)


async def bench(args) -> dict:
    from basemodel import prepare
    from convlog.sharegpt import first_turn_prompts
    from core import paths
    from router.config import BackendConfig
    from router.managed import ManagedVLLM, free_port

    model = str(prepare())
    managed = None
    api_key = ""
    url = getattr(args, "backend_url", None)
    if not url:
        managed = ManagedVLLM(BackendConfig(max_model_len=2048), model)
        print(f"[bench] starting vLLM ({model}) ...", flush=True)
        await managed.start()
        url, api_key = managed.url, managed.api_key
    variants = {"gateway": dict(classifier=False, logs=False)}
    if args.classifier:
        threads = [int(t) for t in str(getattr(args, "classifier_threads", "") or "").split(",") if t.strip()]
        if not threads:
            variants["gateway+classifier"] = dict(classifier=True, logs=False)
        for t in threads:
            variants[f"gateway+classifier({t} thread{'s' if t != 1 else ''})"] = dict(
                classifier=True, logs=False, classifier_threads=t)
    if args.logs:
        variants["gateway+logs"] = dict(classifier=False, logs=True)
    if getattr(args, "metrics_off", False):
        variants["gateway(metrics off)"] = dict(classifier=False, logs=False, metrics=False)
    procs, targets = [], {}
    data = paths.data_dir() / "bench"
    data.mkdir(parents=True, exist_ok=True)
    try:
        for name, kw in variants.items():
            port, http_port = free_port(), free_port()
            procs.append(start_gateway(url, model, port, data_dir=data, api_key=api_key, http_port=http_port, **kw))
            targets[name] = f"127.0.0.1:{port}"
            if name == "gateway" and getattr(args, "http", False):
                http_target = f"http://127.0.0.1:{http_port}"
        for t in targets.values():
            await wait_gateway(t)
        if getattr(args, "http", False):
            targets["gateway" + HTTP_SUFFIX] = http_target
        prompts = first_turn_prompts(args.prompts, max_chars=1500)
        concs = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
        modes = [*targets, "direct"]
        runs: list[RunStats] = []
        # warm-up (compile paths, caches) not measured
        await run_direct(url, model, prompts[:4], 4, 8, api_key)
        for m, t in targets.items():
            await run_gateway(t, m, prompts[:4], 4, 8)
        paired = None
        if getattr(args, "paired", 0):
            paired = await run_paired(url, model, targets, prompts, args.max_tokens, args.paired, api_key=api_key)
            print(render_paired(paired), flush=True)
        for c in concs:
            for rnd in range(args.rounds):
                order = modes if rnd % 2 == 0 else list(reversed(modes))
                for m in order:
                    if m == "direct":
                        st = await run_direct(url, model, prompts, c, args.max_tokens, api_key)
                    else:
                        st = await run_gateway(targets[m], m, prompts, c, args.max_tokens)
                        st.mode = m
                    st.round = rnd
                    runs.append(st)
                    print(f"[bench] c={c} round={rnd} {m:<20} {st.tok_s:7.1f} tok/s  "
                          f"e2e p50 {pct(st.e2e_ms, 50):7.1f} ms  errors {st.errors}", flush=True)
        summary = summarize(runs, modes, concs) if concs else {}
        result = {"prompts": len(prompts), "max_tokens": args.max_tokens, "rounds": args.rounds,
                  "model": model, "summary": summary, "paired_c1": paired}
        if summary:
            print(render(summary))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2))
        return result
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(30)
            except Exception:
                pass
        if managed is not None:
            await managed.stop()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=48, help="real first-turn prompts per (mode, concurrency)")
    p.add_argument("--concurrency", default="1,8", help="comma-separated levels for the throughput blocks; '' skips them")
    p.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                   help="also measure added latency at concurrency 1 interleaved per request, ROUNDS passes "
                        "over the prompts (median paired difference with a 95%% CI)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (gateway, direct, gateway, direct, ...)")
    p.add_argument("--classifier", action="store_true", help="also measure with the classifier on")
    p.add_argument("--classifier-threads", default="", metavar="LIST",
                   help="with --classifier: one classifier variant per comma-separated torch thread count "
                        "(classifier.threads), e.g. 1,2; default: one variant with the config's setting")
    p.add_argument("--logs", action="store_true", help="also measure with conversation logging on")
    p.add_argument("--http", action="store_true", help="also measure the gateway's OpenAI-compatible HTTP door")
    p.add_argument("--metrics-off", action="store_true", help="also measure a gateway with metrics off "
                                                              "(--no-metrics): the cost of metrics as a ratio")
    p.add_argument("--json-out", help="write the figures as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    asyncio.run(bench(parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
