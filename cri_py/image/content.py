"""The content store (blobs by digest) and the snapshot store (unpacked layers by chain ID).

Both publish by rename: a blob is written under `ingest/` and a snapshot under
`.tmp-*`, and only a verified, complete one is renamed into place. A pull that
fails, is cancelled, or dies with the daemon therefore leaves at most temp entries,
which `cleanup_temp` removes at start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator

from cri_py.errors import Internal, InvalidArgument

log = logging.getLogger(__name__)


class DigestMismatch(Internal):
    """Downloaded bytes do not hash to the digest their descriptor promised."""


def digest_hex(digest: str) -> str:
    """The hex part of a sha256 digest; anything else is refused as unsafe."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InvalidArgument(f"unsupported digest {digest!r}")
    return hexpart


def _remove_quietly(path: str) -> None:
    """Remove a file or tree that may not exist."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


class BlobWriter:
    """Receives one blob's bytes, hashes them as they arrive, commits only if they verify."""

    def __init__(self, store: "ContentStore", digest: str, size: int | None) -> None:
        self.store = store
        self.digest = digest
        self.expected_size = size
        self.tmp = os.path.join(store.ingest_dir, f"{digest_hex(digest)}-{uuid.uuid4().hex[:8]}")
        self._fh = open(self.tmp, "wb")
        self._hash = hashlib.sha256()
        self.written = 0

    def write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._fh.write(chunk)
        self.written += len(chunk)

    def commit(self) -> str:
        """Verify size and digest, then publish; on mismatch nothing is stored."""
        self._fh.close()
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest or (self.expected_size is not None and self.written != self.expected_size):
            self.abort()
            raise DigestMismatch(
                f"blob {self.digest}: got {actual} ({self.written} bytes"
                + (f", expected {self.expected_size})" if self.expected_size is not None else ")")
            )
        path = self.store.path(self.digest)
        os.rename(self.tmp, path)
        return path

    def abort(self) -> None:
        """Throw the partial blob away."""
        if not self._fh.closed:
            self._fh.close()
        _remove_quietly(self.tmp)


class ContentStore:
    """Blobs under `<root>/content/blobs/sha256/<hex>`."""

    def __init__(self, root: str) -> None:
        self.blob_dir = os.path.join(root, "content", "blobs", "sha256")
        self.ingest_dir = os.path.join(root, "content", "ingest")
        os.makedirs(self.blob_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.ingest_dir, mode=0o700, exist_ok=True)

    def path(self, digest: str) -> str:
        return os.path.join(self.blob_dir, digest_hex(digest))

    def has(self, digest: str) -> bool:
        return os.path.exists(self.path(digest))

    def size(self, digest: str) -> int:
        return os.path.getsize(self.path(digest))

    def read(self, digest: str) -> bytes:
        with open(self.path(digest), "rb") as fh:
            return fh.read()

    def writer(self, digest: str, size: int | None = None) -> BlobWriter:
        return BlobWriter(self, digest, size)

    def put(self, digest: str, data: bytes) -> None:
        """Store a small document (manifest, config) after verifying it."""
        if self.has(digest):
            return
        writer = self.writer(digest, len(data))
        try:
            writer.write(data)
        except BaseException:
            writer.abort()
            raise
        writer.commit()

    def delete(self, digest: str) -> None:
        _remove_quietly(self.path(digest))

    def digests(self) -> Iterator[str]:
        for name in os.listdir(self.blob_dir):
            yield "sha256:" + name

    def usage(self) -> tuple[int, int]:
        """(bytes, inodes) the blobs use."""
        total = count = 0
        for name in os.listdir(self.blob_dir):
            try:
                total += os.lstat(os.path.join(self.blob_dir, name)).st_blocks * 512
                count += 1
            except FileNotFoundError:
                pass
        return total, count

    def cleanup_temp(self) -> None:
        """Drop partial blobs a crashed or cancelled pull left."""
        for name in os.listdir(self.ingest_dir):
            _remove_quietly(os.path.join(self.ingest_dir, name))


class SnapshotStore:
    """Unpacked layers under `<root>/snapshots/<chain-id-hex>`, used as overlay lowerdirs."""

    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "snapshots")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def path(self, chain_id: str) -> str:
        return os.path.join(self.dir, digest_hex(chain_id))

    def has(self, chain_id: str) -> bool:
        return os.path.isdir(self.path(chain_id))

    def prepare(self) -> str:
        """A fresh, empty temp dir to unpack into (same filesystem, for the rename)."""
        path = os.path.join(self.dir, f".tmp-{uuid.uuid4().hex}")
        os.mkdir(path, 0o755)
        return path

    def commit(self, tmp: str, chain_id: str) -> str:
        """Publish an unpacked snapshot; if another pull won the race, keep theirs."""
        path = self.path(chain_id)
        try:
            os.rename(tmp, path)
        except OSError:
            if not self.has(chain_id):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def discard(self, tmp: str) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def remove(self, chain_id: str) -> None:
        _remove_quietly(self.path(chain_id))

    def chain_ids(self) -> Iterator[str]:
        for name in os.listdir(self.dir):
            if not name.startswith("."):
                yield "sha256:" + name

    def cleanup_temp(self) -> None:
        for name in os.listdir(self.dir):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
