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

from cri_py.atomicfile import atomic_write


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
