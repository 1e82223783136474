"""Entry point: `python -m cri_py.shim --task-dir DIR` runs one shim; `... launcher ...`
runs the shim launcher. The daemon starts both through a bootstrap that skips
cri_py/__init__.py (it loads importlib.metadata, ~4.7 MB a process; see
cri_py.runtime.launch), so this module must stay importable on its own.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """Dispatch on the first argument; imports only what that role needs."""
    if argv and argv[0] == "launcher":
        from cri_py.shim import launcher

        return launcher.main(argv[1:])
    if argv and argv[0] == "shim":
        argv = argv[1:]
    from cri_py.shim import shim

    return shim.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
