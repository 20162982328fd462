"""The one log schema shared by the gateway (writer) and training (reader). Never edited in place:
feedback is its own record linked by request id."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LogRecord:
    request_id: str
    created_at: float  # unix seconds (UTC)
    messages: list[dict]  # [{"role": ..., "content": ...}] as sent (after the PII policy)
    response_text: str = ""
    reasoning_text: str = ""
    client_id: str = ""
    task: str = ""  # classifier's (or the override's) task; "" when none ran
    confidence: float = 0.0
    route_reason: str = ""  # e.g. "specialist", "low_confidence", "general_task", "no_adapter", "adapter_override"
    adapter: str = ""  # vLLM name, e.g. "code@3"; "" = base model
    adapter_task: str = ""
    adapter_version: str = ""
    model: str = ""  # base model id
    prompt_tokens: int = 0
    completion_tokens: int = 0
    classify_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    backend_ms: float = 0.0
    finish_reason: str = ""  # stop | length | cancelled | error
    status: str = "ok"  # ok | error | cancelled
    error: str = ""  # gRPC code + message when status != ok
    source: str = "live"  # live | import
    stream: bool = False
    sampling: dict = field(default_factory=dict)


@dataclass
class Feedback:
    feedback_id: str
    request_id: str
    created_at: float
    rating: int  # 1 (bad) .. 5 (excellent); <= 2 counts as negative
    correction: str = ""
    comment: str = ""

    @property
    def negative(self) -> bool:
        return self.rating <= 2
