"""What a container's end looks like from outside: OOM kills, reasons, termination messages.

The kubelet shows these to users (`kubectl describe`: OOMKilled, Error, Completed,
and the termination message), so they are read from the kernel and the files the
kubelet set up, not guessed.
"""

from __future__ import annotations

import os
import signal

from cri_py.errors import InvalidArgument

MAX_MESSAGE_BYTES = 4096  # the kubelet's own cap on a termination message
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048

TERMINATION_PATH_ANNOTATION = "io.kubernetes.container.terminationMessagePath"
TERMINATION_POLICY_ANNOTATION = "io.kubernetes.container.terminationMessagePolicy"


def oom_kills(cgroup_dir: str) -> int:
    """How many processes the kernel OOM-killed in this memory cgroup."""
    for name in ("memory.events", "memory.oom_control"):  # v2, then v1 (kernel >= 4.13)
        try:
            with open(os.path.join(cgroup_dir, name), encoding="utf-8") as fh:
                for line in fh:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return 0


def exit_reason(exit_code: int, oom_killed: bool) -> str:
    """The CRI reason the kubelet expects for a finished container."""
    if oom_killed:
        return "OOMKilled"
    return "Completed" if exit_code == 0 else "Error"


def parse_signal(value: str | int | None, default: int = signal.SIGTERM) -> int:
    """An image's StopSignal (`SIGQUIT`, `QUIT`, `3`) as a number."""
    if value is None or value == "":
        return default
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    name = str(value).upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise InvalidArgument(f"unknown stop signal {value!r}") from None


def termination_message(
    annotations: dict[str, str], host_paths: dict[str, str], exit_code: int, log_file: str
) -> str:
    """The message per the container's termination message policy.

    `host_paths` maps container paths of the container's mounts to host paths: the
    kubelet mounts the termination log file, and the runtime reads it back from there.
    With FallbackToLogsOnError an empty message on failure becomes the log's tail.
    """
    message = ""
    path = annotations.get(TERMINATION_PATH_ANNOTATION, "")
    host = host_paths.get(path) if path else None
    if host:
        try:
            with open(host, "rb") as fh:
                message = fh.read(MAX_MESSAGE_BYTES).decode("utf-8", "replace")
        except OSError:
            message = ""
    policy = annotations.get(TERMINATION_POLICY_ANNOTATION, "File")
    if not message and exit_code != 0 and policy == "FallbackToLogsOnError" and log_file:
        message = log_tail(log_file)
    return message


def log_tail(path: str, lines: int = FALLBACK_LOG_LINES, limit: int = FALLBACK_LOG_BYTES) -> str:
    """The last lines of a CRI-format log file as the container printed them."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except OSError:
        return ""
    out: list[bytes] = []
    for record in data.splitlines():
        parts = record.split(b" ", 3)
        if len(parts) < 3:
            continue
        content = parts[3] if len(parts) == 4 else b""
        out.append(content + (b"\n" if parts[2] == b"F" else b""))
    text = b"".join(out)
    tail = b"\n".join(text.split(b"\n")[-(lines + 1) :])
    return tail[-limit:].decode("utf-8", "replace")
