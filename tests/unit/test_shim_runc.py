"""runc command lines and error text as the shim builds them; its blocking runner."""

from __future__ import annotations

import os
import signal
import stat
import sys

import pytest

from cri_py.shim import runc


def test_argv_puts_global_flags_before_the_subcommand():
    cmd = runc.RuncCommand("/usr/sbin/runc", "/run/r", ["--debug"], systemd_cgroup=True)
    assert cmd.argv("create", "--bundle", "/b", "id", log="/t/log.json") == [
        "/usr/sbin/runc", "--root", "/run/r", "--log", "/t/log.json", "--log-format", "json",
        "--systemd-cgroup", "--debug", "create", "--bundle", "/b", "id",
    ]  # fmt: skip
    assert runc.RuncCommand().argv("state", "x") == ["runc", "state", "x"]


def test_error_detail_reads_logrus_lines_once():
    stderr = (
        b'time="2024-01-01T00:00:00Z" level=error msg="container does not exist"\n'
        b"container does not exist\n"
    )
    assert runc.error_detail(stderr) == "container does not exist"
    quoted = b'time="t" level=error msg="exec: \\"/nope\\": stat /nope: no such file"\n'
    assert runc.error_detail(quoted) == 'exec: "/nope": stat /nope: no such file'
    assert runc.error_detail(b"plain failure\n\n") == "plain failure"
    assert runc.error_detail(b"") == ""


def test_json_log_errors_keeps_error_levels():
    log = (
        b'{"level":"info","msg":"starting"}\n'
        b'{"level":"error","msg":"runc create failed: unable to start container process"}\n'
        b"garbage line\n"
        b'{"level":"error","msg":"runc create failed: unable to start container process"}\n'
    )
    assert runc.json_log_errors(log) == "runc create failed: unable to start container process"
    assert runc.json_log_errors(b"") == ""


def test_format_error_names_command_outcome_and_words():
    argv = ["runc", "--root", "/r", "kill", "c1", "15"]
    assert runc.format_error(argv, 1, "container not running") == (
        "`runc --root /r kill c1 15` failed (exit status 1): container not running"
    )
    assert "timed out" in runc.format_error(argv, None, "")
    assert "killed by signal 9" in runc.format_error(argv, -9, "x")
    assert runc.format_error(argv, 2, "").endswith("no error output")


def test_classifiers():
    assert runc.is_not_exist("container does not exist")
    assert not runc.is_not_exist("permission denied")
    assert runc.is_not_running("container not running")
    assert runc.is_not_running("process already finished")
    failure = runc.RuncFailure(["runc", "delete", "x"], 1, "container does not exist")
    assert failure.not_exist and not failure.not_running
    assert "runc delete x" in str(failure)


@pytest.fixture
def fake_binary(tmp_path):
    """Write an executable script; returns its path."""

    def make(body: str) -> str:
        path = tmp_path / "fake-runc"
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return str(path)

    return make


def test_check_returns_stdout(fake_binary):
    binary = fake_binary('echo "{\\"id\\":\\"$2\\"}"')
    assert runc.check([binary, "state", "abc"]) == b'{"id":"abc"}\n'


def test_check_raises_with_stderr(fake_binary):
    binary = fake_binary('echo \'time="t" level=error msg="container does not exist"\' >&2; exit 1')
    with pytest.raises(runc.RuncFailure) as info:
        runc.check([binary, "delete", "abc"])
    assert info.value.not_exist
    assert info.value.status == 1
    assert f"`{binary} delete abc` failed (exit status 1): container does not exist" == str(info.value)


def test_run_collects_large_output_without_deadlock(fake_binary):
    binary = fake_binary("head -c 300000 /dev/zero; head -c 200000 /dev/zero >&2")
    result = runc.run([binary])
    assert (result.status, len(result.stdout), len(result.stderr)) == (0, 300000, 200000)


def test_run_times_out_and_kills(fake_binary):
    binary = fake_binary("exec sleep 30")
    with pytest.raises(runc.RuncFailure) as info:
        runc.run([binary], timeout=0.3)
    assert info.value.status is None and "no answer within 0.3s" in str(info.value)


def test_spawn_resets_signal_dispositions_python_ignores(tmp_path):
    """Python ignores SIGPIPE; runc and the container must not inherit that."""
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
    out_r, out_w = os.pipe()
    pid = runc.spawn(["sh", "-c", "grep SigIgn /proc/self/status"], 0, out_w, 2)
    os.close(out_w)
    data = os.read(out_r, 4096)
    os.close(out_r)
    os.waitpid(pid, 0)
    ignored = int(data.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)), data


def test_spawn_missing_binary_raises():
    with pytest.raises(FileNotFoundError):
        runc.spawn(["/nonexistent/runc"], 0, 1, 2)
    assert sys.platform.startswith("linux")
