"""The shim's exec table with real processes: a shell stands in for `runc exec --detach`
(it starts the command in the background, writes its pid and exits), and a child
subreaper process plays the shim, so the orphans come back to it as they would."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

HARNESS = textwrap.dedent(
    """
    import json, os, sys, time
    from cri_py.shim.execs import ExecTable
    from cri_py.shim.linux import set_child_subreaper

    set_child_subreaper()
    script, abandon = sys.argv[1], sys.argv[2] == "abandon"
    pid_file = os.path.join(sys.argv[3], "exec.pid")
    answers, logged = [], []
    table = ExecTable(lambda conn, msg: answers.append(msg), logged.append)
    null = os.open(os.devnull, os.O_RDWR)
    conn = object()
    table.start(conn, ["sh", "-c", script.replace("PIDFILE", pid_file)], [null, null, null], pid_file)
    if abandon:
        table.abandon(conn)
    deadline = time.monotonic() + 20
    while (table.starting or table.running) and time.monotonic() < deadline:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        table.reaped(pid, status)
        table.settle()
    print(json.dumps({"answers": answers, "left": len(table.starting) + len(table.running),
                      "unclaimed": len(table.unclaimed), "logged": logged}))
    """
)


def run(script: str, tmp_path, mode: str = "wait") -> dict:
    out = subprocess.run([sys.executable, "-c", HARNESS, script, mode, str(tmp_path)],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("delay", ["", "sleep 0.2;"])
def test_exit_code_whichever_is_reaped_first(tmp_path, delay):
    # with no delay the command usually exits before "runc"; with one, after it
    result = run(f"({delay} exit 7) & echo $! > PIDFILE", tmp_path)
    assert result == {"answers": [{"ok": True, "exit_code": 7}], "left": 0, "unclaimed": 0, "logged": []}


def test_killed_by_a_signal_reads_as_128_plus_n(tmp_path):
    result = run("sh -c 'kill -TERM $$' & echo $! > PIDFILE", tmp_path)
    assert result["answers"] == [{"ok": True, "exit_code": 143}]


def test_runc_failure_is_reported_with_its_argv(tmp_path):
    result = run("exit 3", tmp_path)
    [answer] = result["answers"]
    assert answer["runc_failed"] == 3 and answer["argv"][:2] == ["sh", "-c"]


def test_no_pid_file_is_an_error(tmp_path):
    [answer] = run("true", tmp_path)["answers"]
    assert answer["ok"] is False and "no pid" in answer["error"]


def test_a_client_that_left_gets_its_process_killed(tmp_path):
    result = run("sleep 30 & echo $! > PIDFILE", tmp_path, "abandon")
    assert result["answers"] == [] and result["left"] == 0  # killed and reaped, well before 30 s
