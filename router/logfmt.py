"""Log line formats of the gateway process: `text` (human) or `json` (one object per line, for log pipelines).

A JSON line carries `ts` (ISO 8601, UTC), `level`, `logger`, `message`, `request_id` when the line was written
while serving a request (gRPC or HTTP; the id the client got), and `exc` (the formatted traceback) for errors.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from router.grpc_errors import REQUEST_ID

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        rid = REQUEST_ID.get()
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger on stderr (replacing earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
