"""The daemon's async runc wrapper against a scripted fake binary (no root needed)."""

from __future__ import annotations

import stat

import grpc
import pytest

from cri_py import errors
from cri_py.runtime.runc import Runc, RuncError, RuncNotFound

FAKE = r"""#!/bin/sh
# records its argv and stdin, then behaves as $FAKE_MODE says
echo "$@" >> "{dir}/calls"
case "$*" in
  *" update "*) cat > "{dir}/stdin" ;;
esac
case "$*" in
  *"state missing"*|*"delete missing"*|*"kill missing"*)
    echo 'time="t" level=error msg="container does not exist"' >&2; exit 1 ;;
  *"kill stopped"*)
    echo 'time="t" level=error msg="container not running"' >&2; exit 1 ;;
  *"state good"*) echo '{{"id":"good","pid":42,"status":"running"}}' ;;
  *"list"*) echo 'null' ;;
  *"start broken"*) echo 'time="t" level=error msg="cannot start a container that has stopped"' >&2; exit 1 ;;
  *"create"*)
    log=""; prev=""
    for a in "$@"; do [ "$prev" = "--log" ] && log="$a"; prev="$a"; done
    echo '{{"level":"error","msg":"runc create failed: boom"}}' > "$log"; exit 1 ;;
esac
exit 0
"""


@pytest.fixture
def fake(tmp_path) -> Runc:
    path = tmp_path / "runc"
    path.write_text(FAKE.format(dir=tmp_path))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return Runc(str(path), root=str(tmp_path / "root"), extra_args=["--debug"])


def calls(tmp_path) -> list[str]:
    return (tmp_path / "calls").read_text().splitlines()


async def test_state_parses_json(fake, tmp_path):
    assert (await fake.state("good"))["pid"] == 42
    assert calls(tmp_path) == [f"--root {tmp_path}/root --debug state good"]


async def test_missing_container_is_not_found_with_command_and_words(fake):
    with pytest.raises(RuncNotFound) as info:
        await fake.state("missing")
    exc = info.value
    assert isinstance(exc, errors.NotFound) and isinstance(exc, RuncError)
    assert errors.grpc_code_for(exc) == grpc.StatusCode.NOT_FOUND
    assert "state missing` failed (exit status 1): container does not exist" in str(exc)


async def test_other_failures_are_internal(fake):
    with pytest.raises(RuncError) as info:
        await fake.start("broken")
    assert not isinstance(info.value, errors.NotFound)
    assert errors.grpc_code_for(info.value) == grpc.StatusCode.INTERNAL
    assert "cannot start a container that has stopped" in str(info.value)


async def test_delete_is_idempotent(fake, tmp_path):
    await fake.delete("missing", force=True)
    await fake.delete("other")
    assert calls(tmp_path)[-2:] == [
        f"--root {tmp_path}/root --debug delete --force missing",
        f"--root {tmp_path}/root --debug delete other",
    ]


async def test_kill_reports_not_running(fake, tmp_path):
    with pytest.raises(RuncError) as info:
        await fake.kill("stopped", 15)
    assert info.value.not_running
    await fake.kill("live", 9, all=True)
    assert calls(tmp_path)[-1].endswith("kill --all live 9")


async def test_update_sends_resources_on_stdin(fake, tmp_path):
    await fake.update("c", {"memory": {"limit": 1024}})
    assert (tmp_path / "stdin").read_text() == '{"memory": {"limit": 1024}}'
    assert calls(tmp_path)[-1].endswith("update --resources - c")


async def test_list_handles_null(fake):
    assert await fake.list_containers() == []


async def test_create_reads_the_json_log(fake, tmp_path):
    with pytest.raises(RuncError) as info:
        await fake.create("c", str(tmp_path), str(tmp_path / "init.pid"), stdout=1, stderr=2)
    assert "runc create failed: boom" in str(info.value)
    assert not list(tmp_path.glob(".runc-create.*"))  # its temp log is gone
