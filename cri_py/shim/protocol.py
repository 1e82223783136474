"""The daemon <-> shim (and daemon <-> launcher) wire format and task-dir layout.

Shared by both sides, so it imports the standard library only: the shim must stay
small and must never pull in grpc, tinydb or anything of the daemon.

Wire format: JSON lines over a unix stream socket. A request is one object with an
"op" key; the answer is one object with "ok" true (plus fields) or "ok" false with
"kind" (an ErrorKind) and "error" (a message). Requests on one connection are answered
in order; a deferred request (`wait`) holds the later ones back until it is answered.
"""

from __future__ import annotations

import json
import os

TYPE_CHECKING = False  # typing costs every shim memory; checkers know this name
if TYPE_CHECKING:
    from typing import Any

from cri_py.atomicfile import atomic_write

PROTOCOL_VERSION = 1

# --- task directory layout: <state>/tasks/<id>/... -------------------------------
TASK_FILE = "task.json"  # the TaskSpec, written by the daemon before the shim starts
SHIM_SOCKET = "shim.sock"  # requests
SHIM_PID_FILE = "shim.pid"
LOG_BYTES_FILE = "log-bytes"  # an 8-byte counter the shim keeps mmap'ed: bytes written to the log
SHIM_LOG = "shim.log"  # the shim's own stdout/stderr
INIT_PID_FILE = "init.pid"  # written by `runc create --pid-file`
RUNC_LOG = "runc-create.log"  # `runc --log` of the create call (JSON lines)
EXIT_FILE = "exit.json"  # written atomically by the shim when init exits
CREATE_ERROR_FILE = "create-error.json"  # written by the shim when runc create fails
EXIT_DELIVERED_FILE = "exit.delivered"  # the daemon has handed this exit to on_exit

LAUNCHER_SOCKET = "shim-launcher.sock"  # <state>/shim-launcher.sock
LAUNCHER_LOG = "shim-launcher.log"

# --- task status ------------------------------------------------------------------
CREATED = "created"
RUNNING = "running"
STOPPED = "stopped"
UNKNOWN = "unknown"

# --- error kinds (the daemon maps them onto its domain errors) -----------------------
NOT_FOUND = "not_found"
FAILED_PRECONDITION = "failed_precondition"
INVALID_ARGUMENT = "invalid_argument"
INTERNAL = "internal"

MAX_LINE = 1 << 20  # a request line longer than this is a protocol error


# --- attach streams ------------------------------------------------------------------
# After an `attach` request is answered, that connection carries binary frames both
# ways: one byte of kind, four bytes of big-endian length, the payload.
ATTACH_STDIN = 0  # client -> shim: bytes for the container's stdin
ATTACH_STDOUT = 1  # shim -> client: container output
ATTACH_STDERR = 2
ATTACH_END = 3  # shim -> client: the session is over; payload is JSON {"reason", "exit_code"}
ATTACH_RESIZE = 4  # client -> shim: width then height, two big-endian uint16 (tty only)
ATTACH_CLOSE_STDIN = 5  # client -> shim: the client's stdin has ended
FRAME_HEADER = 5
MAX_FRAME = 1 << 20  # a peer announcing more than this is broken

class ProtocolError(Exception):
    """A peer sent something that is not a protocol message."""


def encode(message: dict[str, Any]) -> bytes:
    """One message as one line; compact separators keep replies a single small write."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line (without its newline) into a message object."""
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


def ok(**fields: Any) -> dict[str, Any]:
    """A success answer."""
    return {"ok": True, **fields}


def error(kind: str, message: str) -> dict[str, Any]:
    """A failure answer; `kind` says which domain error the daemon raises."""
    return {"ok": False, "kind": kind, "error": message}


class LineBuffer:
    """Splits a byte stream into messages, per chunk (bytes.split), never per byte."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._pending = b""
        self._limit = limit

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add received bytes; return every complete message they finish."""
        buf = self._pending + data if self._pending else data
        if b"\n" not in buf:
            if len(buf) > self._limit:
                raise ProtocolError(f"line longer than {self._limit} bytes")
            self._pending = buf
            return []
        *lines, self._pending = buf.split(b"\n")
        if len(self._pending) > self._limit:
            raise ProtocolError(f"line longer than {self._limit} bytes")
        return [decode(line) for line in lines if line.strip()]

    @property
    def pending(self) -> bytes:
        """Bytes of an unfinished line (for tests and diagnostics)."""
        return self._pending


def exit_code_of(wait_status: int) -> int:
    """A waitpid status as the shell and the kubelet spell it: 128+N when killed by N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def write_json_atomic(path: str, obj: Any) -> None:
    """Replace `path` with JSON so that readers and crashes see old or new, never half."""
    atomic_write(path, json.dumps(obj, separators=(",", ":")).encode())


def read_json(path: str) -> Any:
    """The JSON in `path`, or None when the file is absent or (never expected) torn."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


# sun_path is 108 bytes including the NUL; deep task dirs (tests, long state roots)
# exceed it, so such sockets are reached through a directory fd instead.
UNIX_PATH_MAX = 107


class UnixPath:
    """A usable name for a unix socket path of any length, as a context manager.

    Short paths are used as they are. A long one is reached as
    /proc/self/fd/<dirfd>/<name>, which the kernel resolves through the open directory;
    the fd stays open for the duration of the `with` block (bind or connect).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> str:
        if len(os.fsencode(self.path)) <= UNIX_PATH_MAX:
            return self.path
        directory, name = os.path.split(self.path)
        self._fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._fd}/{name}"

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def frame(kind: int, payload: bytes = b"") -> bytes:
    """One attach frame."""
    return bytes((kind,)) + len(payload).to_bytes(4, "big") + payload


class FrameBuffer:
    """Splits an attach byte stream into (kind, payload) frames, whatever the chunking."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add received bytes; every frame they complete, in order."""
        buf = self._pending + data if self._pending else data
        frames = []
        start = 0
        while len(buf) - start >= FRAME_HEADER:
            size = int.from_bytes(buf[start + 1 : start + FRAME_HEADER], "big")
            if size > MAX_FRAME:
                raise ProtocolError(f"attach frame of {size} bytes (max {MAX_FRAME})")
            end = start + FRAME_HEADER + size
            if end > len(buf):
                break
            frames.append((buf[start], buf[start + FRAME_HEADER : end]))
            start = end
        self._pending = buf[start:]
        return frames
