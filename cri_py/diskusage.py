"""How much disk a directory tree costs: the image store's ImageFsInfo and a
container's writable layer (stats) both ask."""

from __future__ import annotations

import os
import stat


def disk_usage(root: str) -> tuple[int, int] | None:
    """(allocated bytes, inode count) of the tree at `root`, or None if it is gone.

    Bytes are st_blocks * 512, what the layer costs the disk (sparse files are cheap,
    small files cost a block), as containerd's snapshotter usage reports. The root
    itself counts, and a hard-linked file counts once. Entries vanishing mid-walk
    (the container is writing) are skipped.
    """
    try:
        top = os.lstat(root)
    except OSError:
        return None
    if not stat.S_ISDIR(top.st_mode):
        return None
    total, inodes = top.st_blocks * 512, 1
    linked: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif st.st_nlink > 1:
                    ident = (st.st_dev, st.st_ino)
                    if ident in linked:
                        continue
                    linked.add(ident)
                total += st.st_blocks * 512
                inodes += 1
    return total, inodes
