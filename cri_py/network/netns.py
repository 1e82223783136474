"""Network namespaces pinned by bind mounts at paths the daemon chooses.

A pod's network namespace must outlive every process in it (the pause process can
die and be restarted, CNI DEL runs after the pod stopped), so it is pinned by a bind
mount of its nsfs file at `<state>/netns/<sandbox-id>`, not under /run/netns: the
namespaces belong to this daemon and are cleaned up with its state.

Namespaces are per thread in Linux. A thread that unshare()s or setns()s never goes
back cleanly if anything fails halfway, so every such switch happens in a fresh,
short-lived thread that dies afterwards; the daemon's own threads (event loop,
executor pool) never change namespace. Netlink sockets opened in such a thread stay
in its namespace, which is how `lo` is brought up and link stats are read.

These functions block; the daemon calls them through asyncio.to_thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import IPRoute

from cri_py import errors

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
NS_GET_NSTYPE = 0xB703  # ioctl: which kind of namespace an nsfs fd is (Linux >= 4.11)

STATS_KEYS = ("rx_bytes", "tx_bytes", "rx_errors", "tx_errors")

T = TypeVar("T")

_libc: ctypes.CDLL | None = None
_dir_lock = threading.Lock()


class NetnsError(errors.Internal):
    """A namespace could not be created, entered or removed; the message says which step."""


def _c() -> ctypes.CDLL:
    """libc with errno capture, loaded once: mount/umount2/unshare/setns have no os.* wrapper."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    """Turn a failed libc call into an OSError carrying errno, so callers can branch on it."""
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, flags: int) -> None:
    """mount(2) without a filesystem type: only binds and propagation changes are needed."""
    _check(_c().mount(source.encode(), target.encode(), b"none", flags, None), f"mount {source} on {target}")


def _umount_detach(target: str) -> None:
    """Lazily unmount: a CNI plugin or nsenter may still hold the namespace open."""
    _check(_c().umount2(target.encode(), MNT_DETACH), f"umount {target}")


def _run_in_fresh_thread(fn: Callable[..., T], *args: object) -> T:
    """Run `fn` in a new OS thread that exits afterwards, so namespace changes die with it."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="cri-py-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _make_private_mountpoint(directory: str) -> None:
    """Make `directory` a self-bind mount point with private propagation.

    `ip netns add` does the same self-bind for /run/netns but marks it shared. Under a
    shared parent (systemd makes / shared) every pin would be replicated into each
    peer mount and show up there again; private keeps pins and unpins local to the
    daemon's mount namespace, which is where the CNI plugins it runs look for them.
    """
    with _dir_lock:  # two sandboxes starting at once must not stack two self-binds
        try:
            _mount("", directory, MS_PRIVATE | MS_REC)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not a mount point yet
                raise NetnsError(f"netns dir {directory}: {exc}") from exc
        try:
            _mount(directory, directory, MS_BIND | MS_REC)
            _mount("", directory, MS_PRIVATE | MS_REC)
        except OSError as exc:
            raise NetnsError(f"netns dir {directory}: {exc}") from exc


def _bring_lo_up() -> None:
    """Bring up loopback in the calling thread's namespace: pods expect 127.0.0.1 to work."""
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="lo")
        if not index:
            raise NetnsError("new network namespace has no lo interface")
        ipr.link("set", index=index[0], state="up")


def _pin_new_netns(path: str) -> None:
    """In a throw-away thread: enter a new netns, pin it at `path`, bring lo up."""
    try:
        _check(_c().unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        _mount(f"/proc/self/task/{threading.get_native_id()}/ns/net", path, MS_BIND)
    except OSError as exc:
        raise NetnsError(f"create netns {path}: {exc}") from exc
    _bring_lo_up()


def create_netns(path: str) -> None:
    """Create a network namespace pinned at `path`, with lo up; on failure nothing is left.

    Raises AlreadyExists if `path` exists: it may pin a live pod's namespace, so it is
    never reused or overwritten.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o711, exist_ok=True)
    _make_private_mountpoint(parent)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
    except FileExistsError:
        raise errors.AlreadyExists(f"netns path {path} already exists") from None
    try:
        _run_in_fresh_thread(_pin_new_netns, path)
    except BaseException as exc:
        try:
            remove_netns(path)
        except NetnsError as cleanup:
            exc.add_note(f"cleanup of {path} failed too: {cleanup}")
        if isinstance(exc, errors.CriError):
            raise
        raise NetnsError(f"create netns {path}: {exc}") from exc


def remove_netns(path: str) -> None:
    """Unpin and delete `path`; absent or already unmounted is fine (CRI removes are idempotent)."""
    for _ in range(16):  # a pin mounted twice (e.g. a crash mid-create retried) needs two unmounts
        try:
            _umount_detach(path)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):  # not a mount point / no such path
                break
            raise NetnsError(f"remove netns {path}: {exc}") from exc
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise NetnsError(f"remove netns {path}: {exc}") from exc


def release_netns_dir(directory: str) -> None:
    """Undo the private self-bind of a netns dir (tests, uninstall); absent or unmounted is fine.

    The self-bind stays while the daemon runs, as /run/netns does for iproute2; only
    whoever removes the whole state dir needs this, or the rmdir fails with EBUSY.
    The detach is recursive: pins still under the dir are dropped with it.
    """
    try:
        _umount_detach(os.path.abspath(directory))
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise NetnsError(f"release netns dir {directory}: {exc}") from exc


def netns_exists(path: str) -> bool:
    """True if `path` is a live network namespace (a pinned nsfs file), not just a leftover file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:  # ENOTTY: a plain file, the pin is gone
        return False
    finally:
        os.close(fd)


def _enter_netns(path: str) -> None:
    """setns() the calling (throw-away) thread into the namespace pinned at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errors.NotFound(f"netns {path} does not exist") from None
    try:
        _check(_c().setns(fd, CLONE_NEWNET), f"setns {path}")
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # a plain file: the namespace was removed
            raise errors.NotFound(f"netns {path} is not a network namespace") from None
        raise NetnsError(str(exc)) from exc
    finally:
        os.close(fd)


def _read_stats(path: str) -> dict[str, dict[str, int]]:
    """In a throw-away thread: enter the netns and read per-link counters over netlink."""
    _enter_netns(path)
    stats: dict[str, dict[str, int]] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            counters = link.get_attr("IFLA_STATS64") or link.get_attr("IFLA_STATS") or {}
            stats[name] = {key: int(counters.get(key, 0)) for key in STATS_KEYS}
    return stats


def interface_stats(path: str) -> dict[str, dict[str, int]]:
    """rx/tx bytes and errors of every interface in the netns at `path`, for pod network stats."""
    return _run_in_fresh_thread(_read_stats, path)
