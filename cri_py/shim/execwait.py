"""`execwait`: run `runc exec --detach` and wait for the exec'd process as its subreaper.

A plain `runc exec` copies the process's output through pipes of its own and does
not exit until they close, so a command that leaves a background child holding its
stdout (`sh -c 'daemon & echo ok'`) would hang a probe forever. With `--detach` the
process writes straight to the daemon's pipes and runc exits at once; this small
program, a child subreaper, then becomes the process's parent, reaps it and reports
its exit code as JSON on a status fd. Orphans it leaves behind are reaped too, until
the exec'd process itself has exited.

    execwait STATUS_FD PID_FILE RUNC_ARGV...   (stdio: the command's)
"""

from __future__ import annotations

import json
import os
import sys

from cri_py.shim.linux import set_child_subreaper

def main(argv: list[str]) -> int:
    status_fd, pid_file, runc_argv = int(argv[0]), argv[1], argv[2:]

    def report(status: dict) -> int:
        os.write(status_fd, json.dumps(status).encode())
        return 0

    set_child_subreaper()
    runc_pid = os.posix_spawnp(runc_argv[0], runc_argv, os.environ)
    _, status = os.waitpid(runc_pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        return report({"runc_failed": code})
    with open(pid_file) as fh:
        pid = int(fh.read().strip())
    while True:
        try:
            reaped, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return report({"error": f"exec'd process {pid} was not reparented to execwait"})
        if reaped == pid:
            code = os.waitstatus_to_exitcode(status)
            return report({"exit_code": code if code >= 0 else 128 - code})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
