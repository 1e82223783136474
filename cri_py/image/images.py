"""The image manager: image records, tags and digests, pulls, removal and garbage.

An image is identified by its config digest (as containerd does); its names are
repo tags (`docker.io/library/busybox:latest`) and repo digests
(`docker.io/library/busybox@sha256:<manifest>`). A name points at one image; pulling
a tag that moved takes the tag from the old image, which stays listed by id.
Blobs and snapshots belong to images; what no image (and no pull in progress) holds
is garbage and is deleted after a removal or a failed pull.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cri_py.config import Config
from cri_py.diskusage import disk_usage
from cri_py.errors import FailedPrecondition, grpc_code_for
from cri_py.image.archive import read_archive
from cri_py.image.content import ContentStore, SnapshotStore
from cri_py.image.pull import Layer, Puller, ResolvedImage
from cri_py.image.reference import Reference, is_image_id, parse_reference
from cri_py.image.registry import Credentials, RegistryClient
from cri_py.metrics.registry import image_pull_bytes, image_pull_duration, image_pulls
from cri_py.store import Store

log = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    """One stored image, as persisted in the store's images table."""

    id: str
    repo_tags: list[str]
    repo_digests: list[str]
    size: int
    layers: list[dict[str, Any]]
    blobs: list[str]
    config: dict[str, Any]
    manifest_digest: str = ""
    pinned: bool = False
    created_at: float = field(default_factory=time.time)

    @property
    def chain_ids(self) -> list[str]:
        return [layer["chain_id"] for layer in self.layers]

    @property
    def user(self) -> str:
        runtime = self.config.get("config") or {}
        return str(runtime.get("User") or "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def split_user(user: str) -> tuple[int | None, str]:
    """An image config's User as the CRI reports it: a numeric uid, or a username."""
    name = user.split(":", 1)[0]
    if name.isdigit():
        return int(name), ""
    return None, name


class ImageManager:
    """Owns the image records and the stores below them."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.content = ContentStore(config.root)
        self.snapshots = SnapshotStore(config.root)
        self.puller = Puller(self.content, self.snapshots, config.image.max_concurrent_downloads)
        self._images: dict[str, ImageRecord] = {}
        self._names: dict[str, str] = {}  # repo tag or repo digest -> image id
        self._lock = asyncio.Lock()  # record updates and garbage collection
        self._usage: tuple[float, int, int] | None = None
        self._imports = 0  # archive blobs land before they are held: no sweeping meanwhile
        # set by the container side: image id -> a container using it (whose rootfs stacks its snapshots)
        self.user_of: Callable[[str], str | None] = lambda image_id: None

    async def load(self) -> None:
        """Rebuild the in-memory view from the store; drop what crashed pulls left."""
        await asyncio.to_thread(self.content.cleanup_temp)
        await asyncio.to_thread(self.snapshots.cleanup_temp)
        for data in await self.store.images.all():
            record = ImageRecord.from_dict(data)
            self._images[record.id] = record
            for name in record.repo_tags + record.repo_digests:
                self._names[name] = record.id

    # --- lookup ----------------------------------------------------------------

    def list(self) -> list[ImageRecord]:
        return list(self._images.values())

    def resolve(self, name: str) -> ImageRecord | None:
        """The image a CRI ImageSpec names: by id, repo tag, or repo digest."""
        image_id = is_image_id(name)
        if image_id is not None:
            return self._images.get(image_id)  # an id, known or not, is never a repository name
        ref = parse_reference(name)
        image_id = self._names.get(ref.docker_ref)
        if image_id is None and ref.digest is not None:
            image_id = self._names.get(f"{ref.name}@{ref.digest}")
        return self._images.get(image_id) if image_id else None

    def is_pinned_name(self, ref: Reference) -> bool:
        """The sandbox image is pinned: the kubelet's image GC must not remove it."""
        try:
            sandbox = parse_reference(self.config.image.sandbox_image)
        except Exception:  # a bad sandbox_image is reported when pods start, not here
            return False
        return sandbox.docker_ref == ref.docker_ref

    # --- pull ------------------------------------------------------------------

    async def pull(self, name: str, credentials: Credentials | None = None) -> ImageRecord:
        """Pull `name` from its registry (mirrors first) and record it."""
        ref = parse_reference(name)
        client = RegistryClient(self.config.registry, credentials)
        held: list[str] = []
        start = time.perf_counter()
        try:
            resolved, endpoint, repository = await self.puller.resolve(client, ref)
            held = resolved.blobs + [layer.chain_id for layer in resolved.layers]
            self.puller.hold(held)
            await self.puller.fetch_layers(client, endpoint, repository, resolved.layers)
            record = await self._record(ref, resolved)
            _count_pull("success", start, resolved.size)
            return record
        except BaseException as exc:
            _count_pull(grpc_code_for(exc).name, start, 0)
            self.puller.release(held)
            held = []
            await self.collect_garbage()
            raise
        finally:
            self.puller.release(held)
            await asyncio.to_thread(client.close)

    async def import_archive(self, path: str, name: str | None = None) -> list[ImageRecord]:
        """Load an OCI layout or docker-save archive; unpack and record its images."""
        self._imports += 1
        try:
            images = await asyncio.to_thread(read_archive, path, self.content, name)
            records = []
            for image in images:
                await self.puller.fetch_layers(None, None, "", image.resolved.layers)
                record = None
                for ref in image.names or [None]:
                    record = await self._record(ref, image.resolved)
                assert record is not None
                records.append(record)
            return records
        finally:
            self._imports -= 1
            await self.collect_garbage()

    async def _record(self, ref: Reference | None, resolved: ResolvedImage) -> ImageRecord:
        """Create or update the image record and point the pulled name at it."""
        async with self._lock:
            record = self._images.get(resolved.config_digest)
            if record is None:
                record = ImageRecord(
                    id=resolved.config_digest,
                    repo_tags=[],
                    repo_digests=[],
                    size=resolved.size,
                    layers=[_layer_dict(layer) for layer in resolved.layers],
                    blobs=list(dict.fromkeys(resolved.blobs)),
                    config=resolved.config.raw,
                    manifest_digest=resolved.manifest_digest,
                )
            else:
                record.blobs = list(dict.fromkeys(record.blobs + resolved.blobs))
            if ref is not None:
                if ref.digest is None:
                    self._point(ref.docker_ref, record, record.repo_tags)
                self._point(f"{ref.name}@{resolved.manifest_digest}", record, record.repo_digests)
                record.pinned = record.pinned or self.is_pinned_name(ref)
            self._images[record.id] = record
            await self.store.images.put(record.id, record.to_dict())
            self._usage = None
            return record

    def _point(self, name: str, record: ImageRecord, names: list[str]) -> None:
        """Move `name` to `record`, taking it from any other image (a tag that moved)."""
        previous = self._names.get(name)
        if previous and previous != record.id and previous in self._images:
            old = self._images[previous]
            old.repo_tags = [t for t in old.repo_tags if t != name]
            old.repo_digests = [d for d in old.repo_digests if d != name]
            self.store.images.put_sync(old.id, old.to_dict())
        self._names[name] = record.id
        if name not in names:
            names.append(name)

    # --- removal and garbage -----------------------------------------------------

    async def remove(self, name: str) -> None:
        """Remove an image by id (all its names) or one of its names; absent is fine.

        Removing by tag untags; the image goes when it has no tag left, as the last
        `docker rmi` of a tag does. Blobs and snapshots no other image uses follow.
        """
        record = self.resolve(name)
        if record is None:
            return
        async with self._lock:
            if is_image_id(name) == record.id:
                drop = record.repo_tags + record.repo_digests
            else:
                ref = parse_reference(name)
                drop = [ref.docker_ref] if ref.digest is None else [f"{ref.name}@{ref.digest}"]
            tags_left = [t for t in record.repo_tags if t not in drop]
            user = None if tags_left else self.user_of(record.id)
            if user is not None:  # checked before changing anything: its layers are a rootfs
                raise FailedPrecondition(f"image {record.id} is in use by container {user}")
            for n in drop:
                self._names.pop(n, None)
            record.repo_tags = tags_left
            record.repo_digests = [d for d in record.repo_digests if d not in drop]
            if record.repo_tags:
                await self.store.images.put(record.id, record.to_dict())
                return
            for n in record.repo_digests:
                self._names.pop(n, None)
            self._images.pop(record.id, None)
            await self.store.images.delete(record.id)
            self._usage = None
        await self.collect_garbage()

    async def collect_garbage(self) -> None:
        """Delete blobs and snapshots that no image and no pull in progress holds."""
        if self._imports:
            return
        async with self._lock:
            keep_blobs = {d for r in self._images.values() for d in r.blobs} | set(self.puller.busy)
            keep_snaps = {c for r in self._images.values() for c in r.chain_ids} | set(self.puller.busy)
            await asyncio.to_thread(self._sweep, keep_blobs, keep_snaps)
            self._usage = None

    def _sweep(self, keep_blobs: set[str], keep_snaps: set[str]) -> None:
        for digest in list(self.content.digests()):
            if digest not in keep_blobs:
                self.content.delete(digest)
        for chain_id in list(self.snapshots.chain_ids()):
            if chain_id not in keep_snaps:
                self.snapshots.remove(chain_id)

    # --- filesystem usage ------------------------------------------------------

    async def fs_usage(self) -> tuple[float, int, int, str]:
        """(timestamp, bytes, inodes, mountpoint) of the image store; walked only after changes."""
        if self._usage is None:
            used, inodes = await asyncio.to_thread(_tree_usage, [self.content.blob_dir, self.snapshots.dir])
            self._usage = (time.time(), used, inodes)
        stamp, used, inodes = self._usage
        return stamp, used, inodes, mountpoint_of(self.config.root)


def _count_pull(result: str, start: float, size: int) -> None:
    """Image pull metrics: count, duration and bytes, by result."""
    image_pulls.labels(result).inc()
    image_pull_duration.labels(result).observe(time.perf_counter() - start)
    if size:
        image_pull_bytes.inc(size)


def _layer_dict(layer: Layer) -> dict[str, Any]:
    d = layer.descriptor
    return {"digest": d.digest, "media_type": d.media_type, "size": d.size, "diff_id": layer.diff_id, "chain_id": layer.chain_id}


def _tree_usage(roots: list[str]) -> tuple[int, int]:
    """Bytes (allocated blocks) and inodes under all of `roots`."""
    used = inodes = 0
    for root in roots:
        usage = disk_usage(root)
        if usage is not None:
            used, inodes = used + usage[0], inodes + usage[1]
    return used, inodes


def mountpoint_of(path: str) -> str:
    """The mount point of the filesystem holding `path`."""
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path
