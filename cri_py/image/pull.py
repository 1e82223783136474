"""Pulling an image: resolve the manifest, then fetch and unpack layers in parallel.

Each layer is one pipeline in one worker thread: bytes arrive from the registry, are
hashed and written to the content store, and are decompressed and untarred into a
temp snapshot, all from the same read. Nothing is read twice and no layer waits for
its whole blob before unpacking starts. The blob must hash to its digest and the
uncompressed tar to its diff ID before either is published, so a corrupt or
truncated download stores nothing.

Two pulls needing one layer share one job; the job is cancelled only when every
pull waiting on it is.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cri_py.errors import CriError, Internal
from cri_py.image.content import ContentStore, DigestMismatch, SnapshotStore
from cri_py.image.manifest import (
    INDEX_TYPES,
    Descriptor,
    ImageConfig,
    media_type_of,
    parse_config,
    parse_manifest,
    select_platform,
)
from cri_py.image.reference import Reference
from cri_py.image.registry import RegistryClient
from cri_py.image.unpack import compute_chain_id, is_layer_media_type, open_decompressed, unpack_layer

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class PullCancelled(Internal):
    """Every pull waiting on a layer went away."""


class _ChunkReader:
    """A file object over an iterator of chunks that tees every byte to a sink.

    tarfile and the decompressors read through this; the sink (a BlobWriter) hashes
    and stores each chunk once as it arrives, then `drain` takes what they left.
    Reads slice the current chunk by offset, so no byte is copied more than once.
    """

    def __init__(self, chunks: Iterable[bytes], sink: Any, cancel: threading.Event) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._sink = sink
        self._cancel = cancel
        self._chunk = b""
        self._pos = 0
        self._eof = False

    def _refill(self) -> bool:
        """Load the next non-empty chunk; False at the end of the blob."""
        if self._cancel.is_set():
            raise PullCancelled("pull cancelled")
        for chunk in self._chunks:
            if chunk:
                self._sink.write(chunk)
                self._chunk, self._pos = chunk, 0
                return True
        self._eof = True
        self._chunk, self._pos = b"", 0
        return False

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        parts: list[bytes] = []
        wanted = size
        while wanted > 0:
            if self._pos >= len(self._chunk) and (self._eof or not self._refill()):
                break
            piece = self._chunk[self._pos : self._pos + wanted]
            self._pos += len(piece)
            wanted -= len(piece)
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        """Consume what the tar reader left (padding, trailing frames) so the hash is whole."""
        while not self._eof and self._refill():
            pass


class _HashingReader:
    """Hashes the uncompressed tar as it is read, to check the layer's diff ID."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._hash.update(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> str:
        while data := self._raw.read(CHUNK):
            self._hash.update(data)
        return "sha256:" + self._hash.hexdigest()


@dataclass
class Layer:
    """One layer of a resolved image."""

    descriptor: Descriptor
    diff_id: str
    chain_id: str


@dataclass
class ResolvedImage:
    """What a pull resolved: enough to record the image."""

    manifest_digest: str
    manifest_media_type: str
    config_digest: str
    config: ImageConfig
    layers: list[Layer]
    blobs: list[str]  # every digest the image owns: index, manifest, config, layers

    @property
    def size(self) -> int:
        """The image's content size as containerd reports it: its compressed layers + config."""
        return sum(layer.descriptor.size for layer in self.layers)


@dataclass
class _Job:
    task: asyncio.Future[None]
    cancel: threading.Event = field(default_factory=threading.Event)
    waiters: int = 0


class Puller:
    """Fetches images into the content and snapshot stores."""

    def __init__(self, content: ContentStore, snapshots: SnapshotStore, max_concurrent: int = 3) -> None:
        self.content = content
        self.snapshots = snapshots
        self._limit = asyncio.Semaphore(max(1, max_concurrent))
        self._jobs: dict[str, _Job] = {}
        self.busy: dict[str, int] = {}  # digests and chain ids in use by pulls: not garbage

    def hold(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.busy[key] = self.busy.get(key, 0) + 1

    def release(self, keys: Iterable[str]) -> None:
        for key in keys:
            left = self.busy.get(key, 0) - 1
            if left > 0:
                self.busy[key] = left
            else:
                self.busy.pop(key, None)

    async def resolve(self, client: RegistryClient, ref: Reference) -> tuple[ResolvedImage, Any, str]:
        """Fetch manifest (through an index if needed) and config; store them."""
        top = await asyncio.to_thread(client.get_manifest, ref)
        media_type = media_type_of(top.data, top.media_type)
        blobs = [top.digest]
        manifest_bytes, manifest_digest = top.data, top.digest
        await asyncio.to_thread(self.content.put, top.digest, top.data)
        if media_type in INDEX_TYPES:
            chosen = select_platform(top.data, f"{ref} index {top.digest}")
            child = await asyncio.to_thread(client.get_manifest_by_digest, top.endpoint, top.repository, chosen.digest)
            manifest_bytes, manifest_digest = child.data, child.digest
            media_type = media_type_of(child.data, child.media_type)
            blobs.append(child.digest)
            await asyncio.to_thread(self.content.put, child.digest, child.data)
        manifest = parse_manifest(manifest_bytes, f"{ref} manifest {manifest_digest}")
        config_bytes = await asyncio.to_thread(self._fetch_small, client, top, manifest.config)
        config = parse_config(config_bytes, f"{ref} config {manifest.config.digest}")
        layer_descs = [d for d in manifest.layers if is_layer_media_type(d.media_type)]
        if len(layer_descs) != len(config.diff_ids):
            raise Internal(
                f"{ref}: manifest has {len(layer_descs)} layers but config lists {len(config.diff_ids)} diff ids"
            )
        chain = compute_chain_id(list(config.diff_ids))
        layers = [Layer(d, diff, ch) for d, diff, ch in zip(layer_descs, config.diff_ids, chain)]
        blobs += [manifest.config.digest] + [layer.descriptor.digest for layer in layers]
        resolved = ResolvedImage(top.digest, media_type, manifest.config.digest, config, layers, blobs)
        return resolved, top.endpoint, top.repository

    def _fetch_small(self, client: RegistryClient, top: Any, desc: Descriptor) -> bytes:
        """A config blob: small, verified, stored."""
        if self.content.has(desc.digest):
            return self.content.read(desc.digest)
        writer = self.content.writer(desc.digest, desc.size)
        try:
            with client.open_blob(top.endpoint, top.repository, desc.digest) as blob:
                for chunk in blob.iter_chunks(CHUNK):
                    writer.write(chunk)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        return self.content.read(desc.digest)

    async def fetch_layers(self, client: RegistryClient | None, endpoint: Any, repository: str, layers: list[Layer]) -> None:
        """Make sure every layer has its blob and snapshot; shared jobs, parallel threads."""
        await asyncio.gather(*(self._ensure(client, endpoint, repository, layer) for layer in layers))

    async def _ensure(self, client: RegistryClient | None, endpoint: Any, repository: str, layer: Layer) -> None:
        key = layer.chain_id
        if self.snapshots.has(key) and self.content.has(layer.descriptor.digest):
            return
        job = self._jobs.get(key)
        if job is None:
            job = _Job(asyncio.get_running_loop().create_future())
            job.task = asyncio.ensure_future(self._run_job(job, client, endpoint, repository, layer))
            self._jobs[key] = job
            job.task.add_done_callback(lambda _t: self._jobs.pop(key, None))
        job.waiters += 1
        try:
            await asyncio.shield(job.task)
        except asyncio.CancelledError:
            job.waiters -= 1
            if job.waiters == 0:
                job.cancel.set()
            raise
        job.waiters -= 1

    async def _run_job(self, job: _Job, client: RegistryClient | None, endpoint: Any, repository: str, layer: Layer) -> None:
        async with self._limit:
            await asyncio.to_thread(self._layer_pipeline, client, endpoint, repository, layer, job.cancel)

    def _layer_pipeline(
        self, client: RegistryClient | None, endpoint: Any, repository: str, layer: Layer, cancel: threading.Event
    ) -> None:
        """Blocking: one layer from registry (or local blob) to a published snapshot."""
        desc = layer.descriptor
        tmp = self.snapshots.prepare()
        try:
            if self.content.has(desc.digest):
                with open(self.content.path(desc.digest), "rb") as fh:
                    self._unpack(_ChunkReader(iter(lambda: fh.read(CHUNK), b""), _NullSink(), cancel), layer, tmp)
            elif client is None:
                raise Internal(f"layer {desc.digest} is not in the content store")
            else:
                writer = self.content.writer(desc.digest, desc.size)
                try:
                    with client.open_blob(endpoint, repository, desc.digest) as blob:
                        reader = _ChunkReader(blob.iter_chunks(CHUNK), writer, cancel)
                        self._unpack(reader, layer, tmp)
                        reader.drain()
                    writer.commit()
                except BaseException:
                    writer.abort()
                    raise
            self.snapshots.commit(tmp, layer.chain_id)
        except CriError as exc:
            self.snapshots.discard(tmp)
            if desc.digest in str(exc):
                raise
            raise type(exc)(f"layer {desc.digest}: {exc}") from exc  # say which layer
        except BaseException:
            self.snapshots.discard(tmp)
            raise

    def _unpack(self, reader: _ChunkReader, layer: Layer, tmp: str) -> None:
        hashed = _HashingReader(open_decompressed(reader, layer.descriptor.media_type))  # type: ignore[arg-type]
        unpack_layer(hashed, tmp)  # type: ignore[arg-type]
        diff_id = hashed.drain()
        reader.drain()
        if diff_id != layer.diff_id:
            raise DigestMismatch(f"layer {layer.descriptor.digest}: uncompressed content is {diff_id}, config says {layer.diff_id}")


class _NullSink:
    """A sink for bytes that are already stored."""

    def write(self, chunk: bytes) -> None:
        pass
