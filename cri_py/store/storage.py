"""Crash-safe tinydb storage.

tinydb's JSONStorage rewrites its file in place: a daemon killed mid-write leaves a
truncated JSON file and loses every record. This storage writes a temp file in the
same directory, fsyncs it, renames it over the old one and fsyncs the directory, so
a crash at any instant leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tinydb.storages import Storage


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that readers and crashes see old or new, never half."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make a rename in `directory` durable."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class AtomicJSONStorage(Storage):
    """A tinydb Storage that persists every write with `atomic_write`."""

    def __init__(self, path: str) -> None:
        self._path = path
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)

    def read(self) -> dict[str, dict[str, Any]] | None:
        """The whole database, or None for a new one (tinydb's contract)."""
        try:
            with open(self._path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return None
        if not raw:
            return None
        return json.loads(raw)

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        """Persist the whole database atomically."""
        atomic_write(self._path, json.dumps(data, separators=(",", ":")).encode())

    def close(self) -> None:
        """Nothing stays open between writes."""
