"""Users and groups inside a container's rootfs: who the process runs as.

The image's /etc/passwd and /etc/group are untrusted input on a path the image
controls: `/etc/passwd` may be a symlink to `/etc/shadow`, to `../../../etc/shadow`,
or to anything on the host. Paths are therefore resolved component by component with
the rootfs as `/` (symlinks re-rooted, `..` clamped at the root), the way runc's
securejoin does, and the final open refuses a symlink.

Resolution follows containerd's CRI plugin (oci.WithUser / WithAdditionalGIDs),
which follows Docker: run_as_username, else run_as_user, else the image's `User`
("name", "uid", "name:group", "uid:gid"); a name that is not in /etc/passwd is an
error; a numeric uid not in /etc/passwd runs with gid 0.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import NamedTuple

from cri_py.container.model import MERGE, STRICT, User
from cri_py.errors import InvalidArgument

MAX_SYMLINKS = 40  # the kernel's own limit (ELOOP)
MAX_FILE_BYTES = 8 << 20  # a passwd bigger than this is an attack, not a user list


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...] = field(default=())


class ResolvedUser(NamedTuple):
    """The primary identity: uid, gid, home directory, and the passwd name ("" if none)."""

    uid: int
    gid: int
    home: str = "/"
    username: str = ""


def resolve_in_root(root: str, path: str) -> str:
    """`path` as seen with `root` as `/`: every symlink re-rooted, `..` never above root.

    Missing components are kept as they are (the caller's open fails with ENOENT).
    """
    root = os.path.realpath(root)
    pending = [p for p in path.split("/") if p]
    pending.reverse()
    current = ""  # relative to root, no leading slash
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        full = os.path.join(root, candidate)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            current = candidate
            continue
        if not stat.S_ISLNK(st.st_mode):
            current = candidate
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
        target = os.readlink(full)
        if target.startswith("/"):
            current = ""
        parts = [p for p in target.split("/") if p]
        pending.extend(reversed(parts))
    return os.path.join(root, current)


def read_in_root(root: str, path: str) -> str | None:
    """The text of `path` inside `root`, or None when it does not exist (or is not a file)."""
    resolved = resolve_in_root(root, path)
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a symlink after we resolved it
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a fifo or a device would block or lie
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_FILE_BYTES)
    finally:
        os.close(fd)
    return data.decode("utf-8", errors="replace")


def parse_passwd(text: str) -> list[PasswdEntry]:
    """passwd(5) lines `name:pw:uid:gid:gecos:home:shell`; malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) < 4 or not parts[2].isdigit() or not parts[3].isdigit():
            continue
        home = parts[5] if len(parts) > 5 and parts[5] else "/"
        entries.append(PasswdEntry(parts[0], int(parts[2]), int(parts[3]), home))
    return entries


def parse_group(text: str) -> list[GroupEntry]:
    """group(5) lines `name:pw:gid:member,member`; malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) < 3 or not parts[2].isdigit():
            continue
        members = tuple(m.strip() for m in parts[3].split(",") if m.strip()) if len(parts) > 3 else ()
        entries.append(GroupEntry(parts[0], int(parts[2]), members))
    return entries


def _image_file(rootfs: str, path: str) -> str | None:
    """An image's file, with an unreadable one (a symlink loop...) blamed on the image."""
    try:
        return read_in_root(rootfs, path)
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path} in the image: {exc.strerror or exc}") from None


def passwd_entries(rootfs: str) -> list[PasswdEntry]:
    """The image's users; none when it has no /etc/passwd."""
    text = _image_file(rootfs, "/etc/passwd")
    return parse_passwd(text) if text is not None else []


def group_entries(rootfs: str) -> list[GroupEntry]:
    """The image's groups; none when it has no /etc/group."""
    text = _image_file(rootfs, "/etc/group")
    return parse_group(text) if text is not None else []


def user_string(image_user: str, run_as_user: int | None, run_as_group: int | None, run_as_username: str) -> str:
    """The one `user[:group]` string to resolve: the config's identity wins over the image's.

    run_as_group needs run_as_user or run_as_username: the CRI says a runtime MUST
    refuse it alone (critest checks), as containerd does.
    """
    if run_as_group is not None and run_as_user is None and not run_as_username:
        raise InvalidArgument("run_as_group is set without run_as_user or run_as_username")
    user = run_as_username or (str(run_as_user) if run_as_user is not None else "")
    group = ""
    if not user:
        user, _, group = image_user.partition(":")
    if run_as_group is not None:
        group = str(run_as_group)
    if not user and group:
        user = "0"
    return f"{user}:{group}" if group else user


def resolve_user(
    rootfs: str, image_user: str, run_as_user: int | None, run_as_group: int | None, run_as_username: str
) -> ResolvedUser:
    """uid, gid and home for the container's process, looked up in the rootfs."""
    spec = user_string(image_user, run_as_user, run_as_group, run_as_username)
    if not spec:
        return _lookup_uid(rootfs, 0)
    user, _, group = spec.partition(":")
    if user.isdigit():
        resolved = _lookup_uid(rootfs, int(user))
    else:
        resolved = _lookup_name(rootfs, user)
    if group:
        resolved = resolved._replace(gid=_group_id(rootfs, group))
    return resolved


def _lookup_uid(rootfs: str, uid: int) -> ResolvedUser:
    for entry in passwd_entries(rootfs):
        if entry.uid == uid:
            return ResolvedUser(uid, entry.gid, entry.home, entry.name)
    return ResolvedUser(uid, 0, "/", "")


def _lookup_name(rootfs: str, name: str) -> ResolvedUser:
    for entry in passwd_entries(rootfs):
        if entry.name == name:
            return ResolvedUser(entry.uid, entry.gid, entry.home, entry.name)
    raise InvalidArgument(f"user {name!r} not found in the image's /etc/passwd")


def _group_id(rootfs: str, group: str) -> int:
    if group.isdigit():
        return int(group)
    for entry in group_entries(rootfs):
        if entry.name == group:
            return entry.gid
    raise InvalidArgument(f"group {group!r} not found in the image's /etc/group")


def supplemental_groups(rootfs: str, user: int | str, gid: int, extra: list[int], policy: str = MERGE) -> list[int]:
    """The process's additional gids, sorted and unique, the primary gid included.

    "merge": the /etc/group groups listing the user (by name; a uid is mapped to its
    passwd name first) plus the config's; "strict": only the config's, so an image
    cannot grant itself groups the pod spec did not name.
    """
    if policy not in (MERGE, STRICT):
        raise InvalidArgument(f"unknown supplemental groups policy {policy!r}")
    gids = {gid, *extra}
    if policy == MERGE:
        name = user if isinstance(user, str) else _lookup_uid(rootfs, user).username
        if name:
            gids.update(g.gid for g in group_entries(rootfs) if name in g.members)
    return sorted(gids)


def effective_user(
    rootfs: str,
    image_user: str,
    run_as_user: int | None,
    run_as_group: int | None,
    run_as_username: str,
    extra_groups: list[int],
    policy: str = MERGE,
) -> User:
    """resolve_user and supplemental_groups together: the User the spec and status carry."""
    resolved = resolve_user(rootfs, image_user, run_as_user, run_as_group, run_as_username)
    who: int | str = resolved.username or resolved.uid
    return User(resolved.uid, resolved.gid, tuple(supplemental_groups(rootfs, who, resolved.gid, extra_groups, policy)))
