"""Unpack OCI image layers into directories used as overlayfs lowerdirs.

Each layer goes into its own empty snapshot directory, so nothing of lower
layers is visible here: OCI whiteouts are turned into overlayfs ones (a 0/0
character device, the `trusted.overlay.opaque` xattr) and the kernel applies
them when the snapshots are stacked.

A layer is untrusted input that runs as root. Every path is resolved from the
snapshot root one component at a time through directory file descriptors
opened with O_NOFOLLOW, so neither `..` nor a symlink planted by an earlier
entry can make a later entry land outside the snapshot. Symlink *targets* are
written verbatim: they are only ever resolved inside the container.

Everything here is blocking; the daemon calls `unpack_layer` in an executor.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import os
import re
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from decimal import Decimal
from typing import BinaryIO, cast

import zstandard

from cri_py.errors import InvalidArgument

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_PAX_XATTR_PREFIX = "SCHILY.xattr."
# xattrs whose failure we tolerate: they need privileges or LSM support the
# host may lack, and a container runs fine without them.
_OPTIONAL_XATTR_PREFIXES = ("trusted.", "security.")

_COPY_BUFFER = 1 << 20
# tarfile's stream buffer: its reader copies the unread tail on every read, so
# a big buffer makes each small header read expensive; 64 KiB measured well for
# both many small files and few big ones.
_TAR_BUFFER = 64 << 10

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_NONE, _GZIP, _ZSTD = "none", "gzip", "zstd"
_LAYER_MEDIA_TYPES: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": _NONE,
    "application/vnd.oci.image.layer.v1.tar+gzip": _GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": _ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": _NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": _GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": _ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": _NONE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": _GZIP,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": _ZSTD,
    "application/vnd.docker.image.rootfs.foreign.diff.tar": _NONE,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": _GZIP,
}

_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+", re.ASCII)

_Parts = tuple[str, ...]


class LayerError(InvalidArgument):
    """The layer is malformed or unsafe; the message names the offending entry."""


@dataclass(frozen=True)
class UnpackStats:
    """What one layer held: `file_bytes` is the content of its regular files."""

    entries: int
    file_bytes: int


def is_layer_media_type(media_type: str) -> bool:
    """Whether a manifest descriptor is a filesystem layer we know how to unpack."""
    return media_type.strip() in _LAYER_MEDIA_TYPES


def open_decompressed(fileobj: BinaryIO, media_type: str) -> BinaryIO:
    """A stream of the uncompressed tar inside a layer blob of `media_type`.

    The result reads `fileobj` sequentially and never closes it (for an
    uncompressed layer it *is* `fileobj`): the caller keeps owning the blob.
    """
    compression = _LAYER_MEDIA_TYPES.get(media_type.strip())
    if compression is None:
        raise LayerError(f"unsupported layer media type {media_type!r}")
    if compression == _GZIP:
        return cast(BinaryIO, gzip.GzipFile(fileobj=fileobj, mode="rb"))
    if compression == _ZSTD:
        # Layers may hold several zstd frames (chunked formats); read them all.
        reader = zstandard.ZstdDecompressor().stream_reader(
            fileobj, read_across_frames=True, closefd=False
        )
        return cast(BinaryIO, reader)
    return fileobj


def compute_chain_id(diff_ids: list[str]) -> list[str]:
    """The OCI ChainID of each prefix of `diff_ids`: snapshot keys for the layer stack.

    ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)).
    """
    chain: list[str] = []
    for diff_id in diff_ids:
        if not _DIGEST_RE.fullmatch(diff_id):
            raise InvalidArgument(f"invalid layer diff id {diff_id!r}")
        if chain:
            joined = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + hashlib.sha256(joined).hexdigest())
        else:
            chain.append(diff_id)
    return chain


def unpack_layer(stream: BinaryIO, dest: str) -> UnpackStats:
    """Apply the uncompressed layer tar read from `stream` into directory `dest`.

    Raises LayerError for a malformed or unsafe layer; on any error `dest` is
    left half-written and the caller throws the snapshot away.
    """
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    unpacker = _Unpacker(root_fd)
    try:
        _apply_stream(unpacker, stream)
        unpacker.finish()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as exc:
        raise LayerError(f"layer is not a valid tar stream: {exc}") from exc
    finally:
        unpacker.close()
        os.close(root_fd)
    return UnpackStats(entries=unpacker.entries, file_bytes=unpacker.file_bytes)


def _apply_stream(unpacker: _Unpacker, stream: BinaryIO) -> None:
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", bufsize=_TAR_BUFFER)
    except tarfile.ReadError as exc:
        # A zero-byte blob is an empty layer to Go's archive/tar, hence to
        # containerd and Docker; tarfile calls it an error.
        if str(exc) == "empty file":
            return
        raise
    with tar:
        for member in tar:
            unpacker.apply(tar, member)


class _Unpacker:
    """Writes tar members under a root directory fd, one entry at a time.

    It keeps the fd of the last parent directory open, because tar entries
    come grouped by directory. Every removal is of a child of that directory,
    so the cached fd never goes stale.
    """

    def __init__(self, root_fd: int) -> None:
        self.entries = 0
        self.file_bytes = 0
        self._root_fd = root_fd
        self._parent_parts: _Parts | None = None
        self._parent_fd = -1
        self._dir_times: dict[_Parts, tuple[int, int]] = {}
        # Only root may chown; unprivileged runs (tests) keep their own ids.
        self._chown = os.geteuid() == 0

    def close(self) -> None:
        if self._parent_fd >= 0:
            os.close(self._parent_fd)
            self._parent_fd = -1
            self._parent_parts = None

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.entries += 1
        parts = _entry_parts(member.name)
        if not parts:
            log.debug("layer entry %r names the root: ignored", member.name)
            return
        if any(p.startswith(WHITEOUT_META_PREFIX) for p in parts[:-1]) or (
            parts[-1].startswith(WHITEOUT_META_PREFIX) and parts[-1] != WHITEOUT_OPAQUE
        ):
            log.debug("layer entry %r is AUFS metadata: ignored", member.name)
            return
        try:
            self._apply_entry(tar, member, parts)
        except OSError as exc:
            exc.add_note(f"while unpacking layer entry {member.name!r}")
            raise

    def finish(self) -> None:
        """Set directory times last: creating their children changed them."""
        for parts, times in self._dir_times.items():
            try:
                parent_fd = self._parent(parts, parts[-1], create=False)
            except (FileNotFoundError, LayerError):
                continue
            name = parts[-1]
            st = _lstat(parent_fd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                os.utime(name, ns=times, dir_fd=parent_fd, follow_symlinks=False)

    def _apply_entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: _Parts) -> None:
        name = parts[-1]
        parent_fd = self._parent(parts, member.name, create=True)
        if name == WHITEOUT_OPAQUE:
            os.setxattr(parent_fd, OVERLAY_OPAQUE_XATTR, b"y")
        elif name.startswith(WHITEOUT_PREFIX):
            self._whiteout(member, parent_fd, parts)
        else:
            self._write(tar, member, parent_fd, parts)

    def _whiteout(self, member: tarfile.TarInfo, parent_fd: int, parts: _Parts) -> None:
        """Hide a lower-layer path the way overlayfs expects: a 0/0 char device."""
        target = parts[-1][len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            raise LayerError(f"layer entry {member.name!r}: invalid whiteout")
        self._remove_existing(parent_fd, (*parts[:-1], target))
        os.mknod(target, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent_fd)
        if self._chown:
            os.chown(target, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)

    def _write(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, parent_fd: int, parts: _Parts
    ) -> None:
        name = parts[-1]
        existing = _lstat(parent_fd, name)
        if existing is not None and not (member.isdir() and stat.S_ISDIR(existing.st_mode)):
            self._remove_existing(parent_fd, parts)
        if member.islnk():
            self._hard_link(member, parent_fd, name)
            return  # the inode already carries its metadata from its first entry
        perm = member.mode & 0o7777
        if member.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(name, 0o700, dir_fd=parent_fd)
        elif member.isreg():
            self._write_file(tar, member, parent_fd, name)
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=parent_fd)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
            os.mknod(name, kind | 0o600, device, dir_fd=parent_fd)
        elif member.isfifo():
            os.mknod(name, stat.S_IFIFO | 0o600, dir_fd=parent_fd)
        else:
            raise LayerError(
                f"layer entry {member.name!r}: unsupported tar entry type {member.type!r}"
            )
        self._set_metadata(member, parent_fd, name, perm)
        if member.isdir():
            self._dir_times[parts] = _times_ns(member)

    def _write_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, parent_fd: int, name: str
    ) -> None:
        source = tar.extractfile(member)
        fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=parent_fd)
        with open(fd, "wb") as target:
            if source is not None:
                shutil.copyfileobj(source, target, _COPY_BUFFER)
        self.file_bytes += member.size

    def _hard_link(self, member: tarfile.TarInfo, parent_fd: int, name: str) -> None:
        """Link to a path of this layer; tar link names are relative to the root."""
        target = _entry_parts(member.linkname, what="hard link target", entry=member.name)
        if not target:
            raise LayerError(f"layer entry {member.name!r}: hard link to the layer root")
        try:
            target_dir_fd = self._open_dir(target[:-1], member.name, create=False)
        except FileNotFoundError:
            raise LayerError(
                f"layer entry {member.name!r}: hard link target {member.linkname!r} not found"
            ) from None
        try:
            os.link(
                target[-1],
                name,
                src_dir_fd=target_dir_fd,
                dst_dir_fd=parent_fd,
                follow_symlinks=False,
            )
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            raise LayerError(
                f"layer entry {member.name!r}: cannot hard link to {member.linkname!r}: "
                f"{exc.strerror}"
            ) from None
        finally:
            os.close(target_dir_fd)

    def _set_metadata(
        self, member: tarfile.TarInfo, parent_fd: int, name: str, perm: int
    ) -> None:
        """Owner, then mode (chown clears setuid/setgid), then xattrs
        (chown clears security.capability), then times."""
        if self._chown:
            os.chown(name, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
        if not member.issym():  # Linux has no lchmod; a symlink's mode means nothing
            os.chmod(name, perm, dir_fd=parent_fd)
        _set_xattrs(member, parent_fd, name)
        if not member.isdir():
            os.utime(name, ns=_times_ns(member), dir_fd=parent_fd, follow_symlinks=False)

    def _remove_existing(self, parent_fd: int, parts: _Parts) -> None:
        """Clear the way for an entry of another type (or a whiteout)."""
        name = parts[-1]
        existing = _lstat(parent_fd, name)
        if existing is None:
            return
        if stat.S_ISDIR(existing.st_mode):
            shutil.rmtree(name, dir_fd=parent_fd)
            depth = len(parts)
            for key in [k for k in self._dir_times if k[:depth] == parts]:
                del self._dir_times[key]
        else:
            os.unlink(name, dir_fd=parent_fd)

    def _parent(self, parts: _Parts, entry: str, *, create: bool) -> int:
        """The fd of the directory holding `parts`, owned by the cache."""
        dir_parts = parts[:-1]
        if self._parent_parts != dir_parts:
            fd = self._open_dir(dir_parts, entry, create=create)
            self.close()
            self._parent_parts, self._parent_fd = dir_parts, fd
        return self._parent_fd

    def _open_dir(self, dir_parts: _Parts, entry: str, *, create: bool) -> int:
        """Walk down from the root without following symlinks; the caller closes the fd."""
        fd = os.dup(self._root_fd)
        try:
            for depth, component in enumerate(dir_parts):
                child = _open_child_dir(fd, component, create)
                if child < 0:
                    raise LayerError(
                        f"layer entry {entry!r}: parent {'/'.join(dir_parts[: depth + 1])!r} "
                        f"is {_describe(fd, component)}"
                    )
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd


def _open_child_dir(dir_fd: int, name: str, create: bool) -> int:
    """Open (or create) a subdirectory; -1 if `name` is a symlink or not a directory."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return -1
        raise
    # A layer may omit parent directories; Docker creates them as 0755.
    os.mkdir(name, 0o700, dir_fd=dir_fd)
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    os.chmod(fd, 0o755)  # explicit, so the daemon's umask does not matter
    return fd


def _describe(dir_fd: int, name: str) -> str:
    st = _lstat(dir_fd, name)
    if st is not None and stat.S_ISLNK(st.st_mode):
        return "a symbolic link (refusing to follow it)"
    return "not a directory"


def _entry_parts(name: str, *, what: str = "path", entry: str | None = None) -> _Parts:
    """Normalize a tar path to components under the root.

    Leading `/` is dropped (Docker treats absolute entries as root-relative);
    `..` is resolved lexically, and climbing above the root is an error.
    """
    shown = name if entry is None else entry
    label = f"layer entry {shown!r}: {what} {name!r}"
    if "\x00" in name:
        raise LayerError(f"{label} contains a NUL byte")
    parts: list[str] = []
    for component in name.split("/"):
        if component in ("", "."):
            continue
        if component == "..":
            if not parts:
                raise LayerError(f"{label} escapes the layer root")
            parts.pop()
        else:
            parts.append(component)
    return tuple(parts)


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _set_xattrs(member: tarfile.TarInfo, parent_fd: int, name: str) -> None:
    """Apply `SCHILY.xattr.*` PAX records without following a final symlink.

    os.setxattr has no dir_fd, so the parent is named through /proc/self/fd:
    the kernel resolves that to the directory we hold, not to a path again.
    """
    path = f"/proc/self/fd/{parent_fd}/{name}"
    for key, value in member.pax_headers.items():
        if not key.startswith(_PAX_XATTR_PREFIX):
            continue
        attr = key[len(_PAX_XATTR_PREFIX) :]
        # tarfile decodes PAX values as UTF-8 with surrogateescape; undo it for the raw bytes.
        raw = value.encode("utf-8", "surrogateescape")
        try:
            os.setxattr(path, attr, raw, follow_symlinks=False)
        except OSError as exc:
            if not attr.startswith(_OPTIONAL_XATTR_PREFIXES):
                raise
            log.warning("layer entry %r: skipping xattr %s: %s", member.name, attr, exc.strerror)


def _times_ns(member: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns, exact from PAX's decimal strings where present."""
    mtime = _to_ns(member.pax_headers.get("mtime"))
    if mtime is None:
        mtime = _to_ns(member.mtime) or 0
    atime = _to_ns(member.pax_headers.get("atime"))
    return (mtime if atime is None else atime, mtime)


def _to_ns(value: str | float | None) -> int | None:
    if value is None:
        return None
    try:
        return int(Decimal(str(value)) * 1_000_000_000)
    except (ArithmeticError, ValueError):
        return None
