"""Asynchronous, group-committing log writer for the asyncio gateway.

Guarantee: **a record is durable before the RPC's final message is sent.** The gateway does
`await writer.write(record)` and only then sends the last response message (or returns the unary
response). `write()` returns only after the transaction holding the record has committed
(`synchronous=FULL` in WAL mode: fsynced), so a record whose RPC completed survives a crash of the
process (and, with FULL, of the machine).

Group commit: `write()` enqueues the record and awaits a future. One background thread takes
*everything* queued (up to `max_batch`), applies the PII policy, commits it in ONE transaction, then
resolves every waiter through `loop.call_soon_threadsafe`. Concurrent requests therefore share fsyncs
instead of queueing behind each other's, and the event loop never blocks on disk.

Failures never crash the process: if a commit fails (read-only file, full disk, I/O error) every
waiter of that batch gets a `LogWriteError`, `failures` counts the failed records, `last_error` keeps
the message and `healthy` turns False until a later commit succeeds. The gateway still answers the
client and reports the failure (metrics, health). A batch that fails is retried record by record, so
one bad record (e.g. not JSON-serializable) does not take its neighbours down.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

from convlog.pii import PiiPolicy
from convlog.schema import Feedback, LogRecord
from convlog.store import LogStore, LogWriteError


class AsyncLogWriter:
    """Group-commit writer in front of a `LogStore`. Create it inside the running event loop."""

    def __init__(self, store: LogStore, *, pii_policy: PiiPolicy | None = None, max_batch: int = 256):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.store = store
        self.pii_policy = pii_policy or PiiPolicy("off")
        self.max_batch = max_batch
        self._queue: collections.deque[tuple[LogRecord, asyncio.Future, asyncio.AbstractEventLoop]] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._closed = False
        # counters (read from any thread; written by the writer thread only)
        self.written = 0  # records committed (including ignored duplicates)
        self.commits = 0  # transactions committed
        self.failures = 0  # records that could not be committed
        self.last_error: str = ""
        self.last_error_at: float = 0.0
        self._last_ok = True
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    # -- public API
    @property
    def healthy(self) -> bool:
        """False while the last commit failed or the writer thread is gone."""
        return self._last_ok and self._thread.is_alive() and not self._closed

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def write(self, record: LogRecord) -> None:
        """Return once `record` is committed; raise `LogWriteError` if it could not be."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            if self._closing:
                raise LogWriteError("log writer is closed")
            self._queue.append((record, fut, loop))
            self._cond.notify()
        # the record is queued: even if this task is cancelled, the writer still commits it
        await asyncio.shield(fut)

    async def add_feedback(self, request_id: str, rating: int, correction: str = "",
                           comment: str = "") -> tuple[Feedback, bool]:
        """`store.add_feedback` with the PII policy applied to the free text, off the event loop."""
        p = self.pii_policy
        return await asyncio.to_thread(self.store.add_feedback, request_id, rating, p.apply(correction or ""),
                                       p.apply(comment or ""))

    def stats(self) -> dict[str, Any]:
        return {"written": self.written, "commits": self.commits, "failures": self.failures,
                "pending": self.pending, "healthy": self.healthy, "last_error": self.last_error}

    async def close(self) -> None:
        """Flush everything queued, stop the thread. The store stays open (its owner closes it)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        self._closed = True

    # -- writer thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue and self._closing:
                    return
                n = min(len(self._queue), self.max_batch)
                batch = [self._queue.popleft() for _ in range(n)]
            self._commit(batch)

    def _commit(self, batch: list) -> None:
        results: list[BaseException | None] = [None] * len(batch)
        try:
            records = [self.pii_policy.apply_record(r) for r, _, _ in batch]
            self.store.write_many(records)
            self.commits += 1
            self.written += len(batch)
            self._last_ok = True
        except Exception as exc:  # noqa: BLE001 - never let the writer thread die
            if len(batch) > 1:
                # isolate the bad record(s): retry one by one
                for i, (r, _, _) in enumerate(batch):
                    try:
                        self.store.write_many([self.pii_policy.apply_record(r)])
                        self.commits += 1
                        self.written += 1
                    except Exception as one:  # noqa: BLE001
                        results[i] = self._fail(one)
                self._last_ok = all(r is None for r in results)
            else:
                results[0] = self._fail(exc)
                self._last_ok = False
        for (_, fut, loop), err in zip(batch, results):
            try:
                loop.call_soon_threadsafe(_resolve, fut, err)
            except RuntimeError:
                pass  # loop closed: nobody is waiting any more

    def _fail(self, exc: BaseException) -> LogWriteError:
        self.failures += 1
        self.last_error = str(exc)
        self.last_error_at = time.time()
        return exc if isinstance(exc, LogWriteError) else LogWriteError(f"log record not written: {exc!r}")


def _resolve(fut: asyncio.Future, err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)
