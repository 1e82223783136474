"""The metadata store: tinydb tables for sandboxes, containers and images, plus names.

Records are plain JSON dicts keyed by the object's id. Writes go through
`AtomicJSONStorage` (crash-safe); reads come from an in-memory copy of the file, so
listing 110 pods touches no disk. The async methods run in a worker thread because a
write fsyncs and a read may wait on the lock a write holds: the loop never blocks.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterable
from typing import Any

from tinydb import Query, TinyDB

from cri_py.errors import AlreadyExists
from cri_py.store.storage import AtomicJSONStorage

TABLES = ("sandboxes", "containers", "images")


class CachedAtomicStorage(AtomicJSONStorage):
    """Serves reads from memory; every write still lands on disk before returning.

    A failed write drops the cache, so memory never claims what the disk lacks.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._cache: dict[str, dict[str, Any]] | None = None

    def read(self) -> dict[str, dict[str, Any]] | None:
        if self._cache is None:
            self._cache = super().read()
        return self._cache

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        try:
            super().write(data)
        except BaseException:
            self._cache = None
            raise
        self._cache = data


class Table:
    """One kind of record, keyed by id, with async methods for the daemon's loop."""

    def __init__(self, store: "Store", name: str) -> None:
        self._store = store
        self._name = name

    def _table(self):  # noqa: ANN202 - tinydb's Table type
        return self._store.db.table(self._name)

    def put_sync(self, key: str, record: dict[str, Any]) -> None:
        """Insert or replace the record with id `key` (replace: keys it lacks go too)."""
        doc = dict(record, id=key)

        def replace(stored: dict[str, Any]) -> None:
            stored.clear()
            stored.update(doc)

        with self._store.lock:
            table = self._table()
            if not table.update(replace, Query().id == key):
                table.insert(doc)

    def get_sync(self, key: str) -> dict[str, Any] | None:
        """The record with id `key`, or None."""
        with self._store.lock:
            doc = self._table().get(Query().id == key)
        return dict(doc) if doc is not None else None

    def delete_sync(self, key: str) -> bool:
        """Remove the record; False when it was not there (deletes are idempotent)."""
        with self._store.lock:
            return bool(self._table().remove(Query().id == key))

    def all_sync(self) -> list[dict[str, Any]]:
        """Every record of the table."""
        with self._store.lock:
            return [dict(doc) for doc in self._table().all()]

    async def put(self, key: str, record: dict[str, Any]) -> None:
        await asyncio.to_thread(self.put_sync, key, record)

    async def get(self, key: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.get_sync, key)

    async def delete(self, key: str) -> bool:
        return await asyncio.to_thread(self.delete_sync, key)

    async def all(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.all_sync)


class Store:
    """The daemon's metadata database under `<root>/metadata.json`."""

    def __init__(self, root: str) -> None:
        os.makedirs(root, mode=0o700, exist_ok=True)
        self.path = os.path.join(root, "metadata.json")
        self.lock = threading.RLock()
        self.db = TinyDB(self.path, storage=CachedAtomicStorage)
        self.sandboxes = Table(self, "sandboxes")
        self.containers = Table(self, "containers")
        self.images = Table(self, "images")

    def close(self) -> None:
        """Release the database (all writes are already on disk)."""
        with self.lock:
            self.db.close()


class NameRegistrar:
    """Reserves unique names (pods, containers) for their ids, atomically.

    Two concurrent RunPodSandbox calls with one name must see exactly one winner;
    a lock (not the event loop's single thread) guarantees it even when callers run
    in worker threads. Reservations are rebuilt from the store on start.
    """

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._lock = threading.Lock()
        self._names: dict[str, str] = {}

    def reserve(self, name: str, key: str) -> None:
        """Reserve `name` for `key`; reserving it again for the same key is a no-op."""
        with self._lock:
            holder = self._names.get(name)
            if holder is not None and holder != key:
                raise AlreadyExists(
                    f"{self._kind} name {name!r} is reserved for {holder!r}"
                )
            self._names[name] = key

    def release(self, name: str) -> None:
        """Free `name`; releasing a free name is a no-op."""
        with self._lock:
            self._names.pop(name, None)

    def holder(self, name: str) -> str | None:
        """The id holding `name`, if any."""
        with self._lock:
            return self._names.get(name)

    def load(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Restore reservations (name, id) from stored records."""
        for name, key in pairs:
            self.reserve(name, key)
