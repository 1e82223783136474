"""The shim's exec table with real processes: a small Python program stands in for
`runc exec --detach` (it starts the command, writes its pid and exits without ever
reaping it, as runc does), and a child subreaper process plays the shim, so the
orphans come back to it as they would."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# argv: COMMAND PID_FILE [exit status instead of starting anything]; never waits
FAKE_RUNC = textwrap.dedent(
    """
    import os, sys, time
    command, pid_file = sys.argv[1], sys.argv[2]
    if command.startswith("fail:"):
        os._exit(int(command[5:]))
    pid = os.posix_spawnp("sh", ["sh", "-c", command], os.environ)
    if command.startswith("exit"):
        time.sleep(0.2)  # the command is a zombie child of ours before we exit
    if command != "nopid":
        with open(pid_file, "w") as fh:
            fh.write(str(pid))
    os._exit(0)
    """
)

HARNESS = "FAKE_RUNC = " + repr(FAKE_RUNC) + "\n" + textwrap.dedent(
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
    table.start(conn, [sys.executable, "-c", FAKE_RUNC, script, pid_file], [null, null, null], pid_file)
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


@pytest.mark.parametrize("command", ["exit 7", "sleep 0.3; exit 7"])
def test_exit_code_whichever_is_reaped_first(tmp_path, command):
    # the first exits before "runc" does; the second after it
    result = run(command, tmp_path)
    assert result == {"answers": [{"ok": True, "exit_code": 7}], "left": 0, "unclaimed": 0, "logged": []}


def test_killed_by_a_signal_reads_as_128_plus_n(tmp_path):
    result = run("kill -TERM $$", tmp_path)
    assert result["answers"] == [{"ok": True, "exit_code": 143}]


def test_runc_failure_is_reported_with_its_argv(tmp_path):
    result = run("fail:3", tmp_path)
    [answer] = result["answers"]
    assert answer["runc_failed"] == 3 and answer["argv"][-2:] == ["fail:3", str(tmp_path / "exec.pid")]


def test_no_pid_file_is_an_error(tmp_path):
    [answer] = run("nopid", tmp_path)["answers"]
    assert answer["ok"] is False and "no pid" in answer["error"]


def test_a_client_that_left_gets_its_process_killed(tmp_path):
    result = run("sleep 30", tmp_path, "abandon")
    assert result["answers"] == [] and result["left"] == 0  # killed and reaped, well before 30 s
