"""File utilities every package uses: one implementation each, one durability promise.

- `sha256_file`: hex digest of a file, streamed.
- `atomic_write_bytes` / `atomic_write_text` / `atomic_write_json` (and `atomic_path` for writers that take
  a file name): write a temporary file in the same folder,
  fsync it, `os.replace` it over the target, fsync the folder. A reader (or a crash) sees the old file or the
  new one, never half of one; after return the new file survives a power cut.
- `publish_dir`: the same for a whole folder written under a temporary name (fsync every file, rename, fsync
  the parent).
- `file_lock`: an exclusive inter-process lock (flock on a lock file); released when the holder exits or dies.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

TMP_SUFFIX = ".tmp"


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder by path (a folder's fsync makes a rename in it durable); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int | None = None, suffix: str = "") -> Iterator[Path]:
    """For writers that take a file name (numpy, safetensors): yields a temporary path in the target's folder;
    on a clean exit it is fsynced and replaces `path` (then the folder is fsynced); on an error it is removed.
    `suffix` ends the temporary name, for writers that append their extension otherwise (numpy's `.npz`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX + suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_path(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Replace `path` with `data` atomically and durably (see the module docstring)."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, mode: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", mode=mode)


def is_leftover_tmp(name: str) -> bool:
    """A temporary file of `atomic_write_*` (`.<name>.<random>.tmp[suffix]`) that a crashed writer left behind."""
    return name.startswith(".") and (name.endswith(TMP_SUFFIX) or TMP_SUFFIX + "." in name)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder below `root` (before publishing it with a rename)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fsync_path(os.path.join(dirpath, f))
        fsync_path(dirpath)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make a fully written temporary folder appear at `final` atomically and durably (`final` must not exist)."""
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_path(Path(final).parent)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive inter-process lock on `path` (created if absent). Closing the file releases it, so a holder
    that dies never leaves it locked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when `path`, with every symlink resolved, lies in `root` (also resolved) or is `root` itself."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([p, r]) == r
