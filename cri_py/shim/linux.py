"""The few Linux process controls the shim needs that the os module lacks.

ctypes is imported here once; under the launcher it is loaded before gc.freeze() and
fork, so its pages are shared by every shim.
"""

from __future__ import annotations

import ctypes
import os

PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


def prctl(option: int, arg: int) -> None:
    """prctl(2) with one argument; OSError on failure."""
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def set_child_subreaper() -> None:
    """Orphaned descendants (the container's init once runc exits) become our children.

    Without it the init would be reparented to pid 1 and the shim could never learn
    its exit status with waitpid.
    """
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_process_name(name: str) -> None:
    """Set the comm name `ps` and /proc/<pid>/comm show (15 bytes at most).

    A forked shim would otherwise look exactly like its launcher; operators and
    tests find shims by this name. Written through /proc/self/comm (same effect as
    PR_SET_NAME) because it runs no ctypes code in the freshly forked child.
    """
    fd = os.open("/proc/self/comm", os.O_WRONLY)
    try:
        os.write(fd, name.encode()[:15])
    finally:
        os.close(fd)


def drain(fd: int) -> None:
    """Empty a non-blocking wakeup pipe (signals only say "look again")."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
