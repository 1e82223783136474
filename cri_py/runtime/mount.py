"""The one wrapper around mount(2) and umount2(2): overlay rootfs, tmpfs, binds.

Called through the syscalls (ctypes), not the mount program: a pod start makes
several mounts, and a fork+exec per mount would cost more than the mount itself.
Failures become MountError naming the mount, its options and the errno text.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from cri_py.errors import Internal

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REMOUNT = 0x20
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(Internal):
    """A mount or unmount failed; the message has the target, options and errno."""


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    """mount(2), raising MountError with the whole call in the message."""
    rc = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        detail = data or f"flags {flags:#x}"
        raise MountError(f"mount {fstype or 'bind'} {source} on {target} ({detail}): {os.strerror(err)}")


def unmount(target: str, detach: bool = False) -> None:
    """umount2(2); a target that is not mounted (or is gone) is not an error."""
    rc = _libc.umount2(target.encode(), MNT_DETACH if detach else 0)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return
        raise MountError(f"unmount {target}: {os.strerror(err)}")


def is_mountpoint(path: str) -> bool:
    """Whether something is mounted exactly at `path` (bind mounts included)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            if _unescape(line.split(" ", 5)[4]) == target:
                return True
    return False


def _unescape(field: str) -> str:
    """mountinfo escapes spaces and friends as octal (\\040)."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape")


def mount_overlay(lowerdirs: list[str], upperdir: str, workdir: str, target: str) -> None:
    """An overlay rootfs: `lowerdirs` top layer first, as overlayfs wants them."""
    if not lowerdirs:
        raise MountError(f"overlay on {target}: no lower layers")
    options = f"lowerdir={':'.join(lowerdirs)},upperdir={upperdir},workdir={workdir}"
    if len(options) >= 4096:
        raise MountError(f"overlay on {target}: {len(lowerdirs)} layers make the mount options too long")
    mount("overlay", target, "overlay", 0, options)


def mount_tmpfs(target: str, size_bytes: int, mode: int = 0o1777) -> None:
    """A size-limited tmpfs (a pod's /dev/shm)."""
    mount("shm", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"mode={mode:o},size={size_bytes}")


def mount_readonly_layers(lowerdirs: list[str], target: str) -> None:
    """A read-only view of image layers (top first): an image volume.

    One layer is a read-only bind; several are an overlay with no upper dir, which
    overlayfs mounts read-only by itself.
    """
    if len(lowerdirs) == 1:
        mount(lowerdirs[0], target, None, MS_BIND | MS_REC)
        try:
            mount("", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        except MountError:
            unmount(target, detach=True)
            raise
        return
    mount("overlay", target, "overlay", MS_RDONLY, f"lowerdir={':'.join(lowerdirs)}")
