"""Port-forward: TCP connections to 127.0.0.1:<port> inside a pod's network namespace.

A socket keeps the network namespace it was created in, so a short-lived thread of
its own (never a pool thread, whose namespace would leak to later work) enters the
pod's netns with setns(2), connects, and hands the connected socket back to the loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading

CLONE_NEWNET = 0x40000000
CONNECT_TIMEOUT = 10.0
CHUNK = 1 << 16


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _connect_in_netns(netns_path: str, port: int) -> socket.socket:
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)
    return socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT)


async def connect(netns_path: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream pair to 127.0.0.1:port in the netns at `netns_path` (the host's if empty)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[socket.socket] = loop.create_future()

    def worker() -> None:
        try:
            if netns_path:
                sock = _connect_in_netns(netns_path, port)
            else:
                sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop
            loop.call_soon_threadsafe(lambda err=exc: future.done() or future.set_exception(err))
            return

        def deliver() -> None:
            if future.done():
                sock.close()  # the requester went away meanwhile
            else:
                future.set_result(sock)

        loop.call_soon_threadsafe(deliver)

    threading.Thread(target=worker, name=f"portforward-{port}", daemon=True).start()
    sock = await future
    sock.setblocking(False)
    return await asyncio.open_connection(sock=sock, limit=CHUNK * 2)
