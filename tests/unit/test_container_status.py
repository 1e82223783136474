"""Exit reasons, stop signals, termination messages and the log tail, without containers."""

import signal

import pytest

from cri_py.container.status import (
    TERMINATION_PATH_ANNOTATION,
    TERMINATION_POLICY_ANNOTATION,
    exit_reason,
    log_tail,
    oom_kills,
    parse_signal,
    termination_message,
)
from cri_py.errors import InvalidArgument


@pytest.mark.parametrize("value, number", [(None, signal.SIGTERM), ("", signal.SIGTERM), ("SIGQUIT", 3),
                                           ("quit", 3), ("9", 9), (15, 15), ("SIGRTMIN", signal.SIGRTMIN)])
def test_stop_signals(value, number):
    assert parse_signal(value) == number


def test_unknown_stop_signal_is_invalid():
    with pytest.raises(InvalidArgument, match="SIGNOPE"):
        parse_signal("SIGNOPE")


def test_exit_reasons():
    assert exit_reason(0, False) == "Completed"
    assert exit_reason(1, False) == "Error"
    assert exit_reason(137, True) == "OOMKilled"


def test_oom_kills_from_v1_and_v2_files(tmp_path):
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert oom_kills(str(v1)) == 2
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n")
    assert oom_kills(str(v2)) == 1
    assert oom_kills(str(tmp_path / "gone")) == 0


def _log(path, records):
    path.write_text("".join(f"2024-01-01T00:00:00.000000000Z {stream} {tag} {text}\n" for stream, tag, text in records))


def test_log_tail_rebuilds_lines_from_partial_records(tmp_path):
    log = tmp_path / "0.log"
    _log(log, [("stdout", "F", "one"), ("stderr", "P", "tw"), ("stderr", "F", "o"), ("stdout", "F", "")])
    assert log_tail(str(log)) == "one\ntwo\n\n"
    assert log_tail(str(log), lines=1).endswith("\n")
    assert log_tail(str(tmp_path / "absent.log")) == ""


def test_termination_message_file_then_fallback_only_on_error(tmp_path):
    message = tmp_path / "msg"
    message.write_text("bye")
    log = tmp_path / "0.log"
    _log(log, [("stdout", "F", "from the log")])
    annotations = {TERMINATION_PATH_ANNOTATION: "/dev/termination-log"}
    paths = {"/dev/termination-log": str(message)}
    assert termination_message(annotations, paths, 1, str(log)) == "bye"
    message.write_text("")
    assert termination_message(annotations, paths, 1, str(log)) == ""  # policy File: no fallback
    fallback = dict(annotations, **{TERMINATION_POLICY_ANNOTATION: "FallbackToLogsOnError"})
    assert termination_message(fallback, paths, 1, str(log)) == "from the log\n"
    assert termination_message(fallback, paths, 0, str(log)) == ""
    message.write_text("x" * 10000)
    assert len(termination_message(annotations, paths, 0, str(log))) == 4096
