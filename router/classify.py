"""The gateway's classifier: predictions off the event loop, the abstain threshold, and a hot swap.

Predictions run in a small thread pool (`classifier.workers` threads), each with torch's thread count set to
`classifier.threads` (OpenMP keeps that setting per calling thread, so it is set in each worker).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from pathlib import Path

import classifier as classifier_pkg
from core.errors import FailedPrecondition, quoted
from core.files import is_inside
from core.paths import classifier_dir
from router.config import ClassifierConfig

log = logging.getLogger("router.gateway")


def _torch_threads(n: int) -> None:
    """Pool thread initializer: torch's intra-op thread count (0 keeps the default)."""
    if n:
        import torch  # lazy: only the gateway's classify threads need torch here; it is loaded by then

        torch.set_num_threads(n)


class TaskClassifier:
    """The current classifier (None when classification is off) and how the gateway calls it."""

    def __init__(self, clf, cfg: ClassifierConfig):
        self.current = clf
        self.cfg = cfg
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=cfg.workers, thread_name_prefix="classify", initializer=_torch_threads,
            initargs=(cfg.threads,))

    @property
    def enabled(self) -> bool:
        return self.current is not None

    @property
    def tasks(self) -> list[str] | None:
        return list(self.current.tasks) if self.current is not None else None

    def threshold(self) -> float:
        if self.current is None:
            return 0.0
        t = self.cfg.threshold
        return t if t >= 0 else float(self.current.threshold)

    async def predict(self, text: str):
        """The classifier's Prediction for one text, or None when classification is off."""
        clf = self.current
        if clf is None:
            return None
        preds = await asyncio.get_running_loop().run_in_executor(self._pool, clf.predict_detailed, [text])
        return preds[0]

    def allowed_roots(self) -> list[Path]:
        """Where artifacts may be loaded from: the data root's classifier folder and the configured artifact."""
        return [classifier_dir(), *([Path(self.cfg.path)] if self.cfg.path else [])]

    async def reload(self, path: str | None):
        """Load and warm the artifact at `path` (None: the configured or default one), then swap it in; requests
        keep the current classifier until the new one is ready. Encoders only the old one used are released.
        Only folders the gateway owns are read (symlinks resolved first); anything else is refused before any
        file in it is opened, with the same message whether it exists or not."""
        if path:
            roots = self.allowed_roots()
            if not any(is_inside(path, r) for r in roots):
                raise FailedPrecondition(f"ReloadClassifier path {quoted(path)} is outside the gateway's classifier "
                                         f"folder {roots[0]}: artifacts are loaded only from there (or the "
                                         "configured classifier.path); train into it with `specialist-router "
                                         "classifier train --out`")
        path = path or self.cfg.path or None

        def load_warm():
            clf = classifier_pkg.load(path)
            return clf, clf.warm_up()  # its encoder loads now, not in the next user request

        clf, embedders = await asyncio.get_running_loop().run_in_executor(None, load_warm)
        self.current = clf
        dropped = classifier_pkg.retain_encoders(*embedders)
        log.info("classifier %s loaded from %s (%s); %d unused encoder(s) released", clf.version, clf.path,
                 clf.kind, dropped)
        return clf

    def close(self) -> None:
        self._pool.shutdown(wait=False)
