"""TaskManager + shims + launcher against a fake runc: the whole task layer, no root.

The fake runc keeps runc's contract where the shim depends on it: `create` leaves an
init process blocked until `start` (an exec fifo), writes --pid-file and exits, so the
init is reparented to the shim (subreaper); errors are logrus lines on stderr and JSON
lines in --log; `delete --force` kills. Real runc is covered by tests/e2e/test_tasks.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
import textwrap
import time

import pytest

from cri_py import errors
from cri_py.runtime import shim_client
from cri_py.runtime.runc import RuncError
from cri_py.runtime.tasks import TaskManager, TaskSpec, TaskState
from cri_py.shim import protocol as p
from cri_py.shim.linux import PR_SET_CHILD_SUBREAPER, prctl

FAKE_RUNC = textwrap.dedent(
    '''
    import json, os, shutil, signal, sys, time

    args = sys.argv[1:]
    root, log = "/tmp/fake-runc", ""
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag == "--root":
            root = args.pop(0)
        elif flag == "--log":
            log = args.pop(0)
        elif flag == "--log-format":
            args.pop(0)
    cmd = args.pop(0)
    flags = {}
    rest = []
    while args:
        a = args.pop(0)
        if a in ("--bundle", "--pid-file", "--console-socket"):
            flags[a] = args.pop(0)
        elif a.startswith("--"):
            flags[a] = True
        else:
            rest.append(a)

    def fail(msg):
        if log:
            with open(log, "a") as fh:
                fh.write(json.dumps({"level": "error", "msg": msg}) + "\\n")
        sys.stderr.write('time="t" level=error msg="%s"\\n' % msg.replace('"', '\\\\"'))
        sys.exit(1)

    def alive(pid):
        try:
            with open("/proc/%d/stat" % pid) as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False

    cdir = os.path.join(root, rest[0]) if rest else ""
    state = os.path.join(cdir, "state.json")
    if cmd == "create":
        spec = json.load(open(os.path.join(flags["--bundle"], "config.json")))
        argv = spec["process"]["args"]
        if argv[0] == "HANG":  # a create that never finishes in time (bounded: no leak)
            time.sleep(1.5)
            fail("hung")
        if shutil.which(argv[0]) is None:
            fail('runc create failed: unable to start container process: exec: "%s": '
                 'stat %s: no such file or directory' % (argv[0], argv[0]))
        os.makedirs(cdir)
        fifo = os.path.join(cdir, "exec.fifo")
        os.mkfifo(fifo)
        pid = os.fork()
        if pid == 0:
            fd = os.open(fifo, os.O_RDONLY)
            os.read(fd, 1)
            os.execvp(argv[0], argv)
        json.dump({"pid": pid}, open(state, "w"))
        with open(flags["--pid-file"], "w") as fh:
            fh.write(str(pid))
        sys.exit(0)
    if not os.path.exists(state):
        fail("container does not exist")
    pid = json.load(open(state))["pid"]
    if cmd == "start":
        fd = os.open(os.path.join(cdir, "exec.fifo"), os.O_WRONLY)
        os.write(fd, b"0")
        os.close(fd)
    elif cmd == "kill":
        if not alive(pid):
            fail("container not running")
        os.kill(pid, int(rest[1]))
    elif cmd == "delete":
        if alive(pid):
            if "--force" not in flags:
                fail("cannot delete container that is not stopped")
            os.kill(pid, signal.SIGKILL)
            deadline = time.time() + 5
            while alive(pid) and time.time() < deadline:
                time.sleep(0.01)
        shutil.rmtree(cdir)
    elif cmd == "state":
        print(json.dumps({"id": rest[0], "pid": pid, "status": "running" if alive(pid) else "stopped"}))
    '''
)


@pytest.fixture
def env(tmp_path):
    """A fake runc, a bundle factory and the paths a test works in."""
    runc_path = tmp_path / "fake-runc"
    runc_path.write_text(f"#!{sys.executable}\n" + FAKE_RUNC)
    runc_path.chmod(runc_path.stat().st_mode | stat.S_IXUSR)

    class Env:
        state = str(tmp_path / "state")
        runc_root = str(tmp_path / "runc-root")
        runc = str(runc_path)

        def spec(self, id: str, *args: str, **kw) -> TaskSpec:
            bundle = tmp_path / "bundles" / id
            bundle.mkdir(parents=True)
            (bundle / "config.json").write_text(json.dumps({"process": {"args": list(args)}}))
            return TaskSpec(id, str(bundle), runtime_binary=self.runc, runtime_root=self.runc_root, **kw)

    return Env()


def shim_pids(state_dir: str) -> list[int]:
    """Live shims whose cwd is under state_dir (shims chdir into their task dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as fh:
                if fh.read().strip() != "cri-py-shim":
                    continue
            with open(f"/proc/{entry}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            if os.readlink(f"/proc/{entry}/cwd").startswith(state_dir):
                found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.fixture(params=[True, False], ids=["launcher", "exec"])
async def managers(request, env):
    """TaskManager factory; teardown deletes every task it can find and closes all."""
    made: list[TaskManager] = []

    def make(on_exit=None) -> TaskManager:
        manager = TaskManager(env.state, on_exit=on_exit, use_launcher=request.param)
        made.append(manager)
        return manager

    yield make
    cleaner = TaskManager(env.state, use_launcher=request.param)
    await cleaner.restore()
    tasks_dir = os.path.join(env.state, "tasks")
    for name in os.listdir(tasks_dir) if os.path.isdir(tasks_dir) else []:
        await cleaner.delete(name)
    for manager in made + [cleaner]:
        await manager.close()
    for pid in shim_pids(env.state):  # only if a test broke the rules above
        os.kill(pid, signal.SIGKILL)
    assert not shim_pids(env.state)


async def test_create_start_exit_code_and_on_exit(managers, env):
    exits: list[TaskState] = []
    tm = managers(on_exit=exits.append)
    before = time.time_ns()
    created = await tm.create(env.spec("t1", "sh", "-c", "exit 3"))
    assert created.status == "created" and created.pid > 0 and created.exit_code is None
    assert (await tm.state("t1")).status == "created"
    started = await tm.start("t1")
    assert started.status in ("running", "stopped") and started.started_at_ns >= before
    final = await tm.wait("t1", timeout=10)
    assert final.status == "stopped" and final.exit_code == 3
    assert final.started_at_ns <= final.exited_at_ns <= time.time_ns()
    await asyncio.sleep(0)  # the watcher delivers after waking waiters
    assert exits == [final]
    assert await tm.state("t1") == final
    exit_file = p.read_json(os.path.join(env.state, "tasks", "t1", p.EXIT_FILE))
    assert exit_file["exit_code"] == 3 and exit_file["exited_at_ns"] == final.exited_at_ns
    assert os.path.exists(os.path.join(env.state, "tasks", "t1", p.EXIT_DELIVERED_FILE))
    await tm.delete("t1")
    assert not os.path.exists(os.path.join(env.state, "tasks", "t1"))
    assert exits == [final]  # delete of a stopped task is no second exit
    assert not shim_pids(env.state)


async def test_kill_sigterm_gives_143_and_killing_again_is_fine(managers, env):
    tm = managers()
    await tm.create(env.spec("t", "sleep", "1000"))
    await tm.start("t")
    await tm.kill("t", signal.SIGTERM)
    state = await tm.wait("t", timeout=10)
    assert state.exit_code == 143
    await tm.kill("t", signal.SIGKILL)  # stopped: not an error
    await tm.delete("t")


async def test_output_goes_to_the_log_path(managers, env, tmp_path):
    tm = managers()
    log = tmp_path / "ctr.log"
    await tm.create(env.spec("t", "sh", "-c", "echo out; echo err >&2; head -c 200000 /dev/zero", log_path=str(log)))
    await tm.start("t")
    assert (await tm.wait("t", timeout=10)).exit_code == 0
    data = log.read_bytes()  # complete once the exit is reported
    assert b"out\n" in data and b"err\n" in data and data.count(b"\0") == 200000
    await tm.delete("t")


async def test_container_inherits_only_its_stdio(managers, env, tmp_path):
    """No shim fd (its socket, the log file, pipes) leaks into runc or the container."""
    tm = managers()
    log = tmp_path / "ctr.log"
    await tm.create(env.spec("t", "sh", "-c", "ls /proc/self/fd", log_path=str(log)))
    await tm.start("t")
    await tm.wait("t", timeout=10)
    # 0 1 2, plus the fd ls itself opened to list the directory: one CRI record each
    assert len(log.read_text().splitlines()) == 4, log.read_text()
    await tm.delete("t")


async def test_stdin_pipe_stays_open(managers, env, tmp_path):
    """With stdin requested the container reads a pipe the shim holds open, not EOF."""
    tm = managers()
    log = tmp_path / "ctr.log"
    await tm.create(env.spec("t", "sh", "-c", "ls -l /proc/self/fd/0; read -t 0.3 x; echo rc=$?", log_path=str(log), stdin=True))
    await tm.start("t")
    await tm.wait("t", timeout=10)
    out = log.read_text()
    assert "pipe:" in out and "rc=0" not in out  # read timed out: no EOF, no data
    await tm.delete("t")


async def test_create_failure_reports_runc_and_leaves_nothing(managers, env):
    tm = managers()
    with pytest.raises(RuncError) as info:
        await tm.create(env.spec("bad", "/nonexistent/binary"))
    message = str(info.value)
    assert "runc create failed" in message and "/nonexistent/binary" in message
    assert f"{env.runc} --root {env.runc_root}" in message  # the command is named
    assert not os.path.exists(os.path.join(env.state, "tasks", "bad"))
    assert not os.path.exists(os.path.join(env.runc_root, "bad"))
    assert not shim_pids(env.state)
    with pytest.raises(errors.NotFound):
        await tm.state("bad")
    # the id is free again
    await tm.create(env.spec("bad2", "true"))
    await tm.delete("bad2")


async def test_delete_is_idempotent_and_kills_running_tasks(managers, env):
    exits: list[TaskState] = []
    tm = managers(on_exit=exits.append)
    await tm.delete("never-existed")
    await tm.create(env.spec("c", "sleep", "1000"))  # created, never started
    await tm.create(env.spec("r", "sleep", "1000"))
    await tm.start("r")
    await tm.delete("c")
    await tm.delete("r")
    await tm.delete("r")
    assert sorted(e.id for e in exits) == ["c", "r"]
    assert all(e.exit_code == 137 for e in exits)
    assert not shim_pids(env.state)
    assert os.listdir(os.path.join(env.state, "tasks")) == []
    with pytest.raises(errors.NotFound):
        await tm.state("r")


async def test_errors_map_to_domain_errors(managers, env):
    tm = managers()
    with pytest.raises(errors.InvalidArgument):
        await tm.create(env.spec("../escape", "true"))
    await tm.create(env.spec("t", "sleep", "1000"))
    with pytest.raises(errors.AlreadyExists):
        await tm.create(env.spec("t2", "true").__class__("t", env.spec("t3", "true").bundle))
    await tm.start("t")
    with pytest.raises(errors.FailedPrecondition):
        await tm.start("t")
    with pytest.raises(asyncio.TimeoutError):
        await tm.wait("t", timeout=0.1)
    with pytest.raises(errors.NotFound):
        await tm.kill("nope", 9)
    await tm.delete("t")


async def test_shim_protocol_waiters_and_bad_requests(managers, env):
    tm = managers()
    await tm.create(env.spec("t", "sleep", "1000"))
    task_dir = os.path.join(env.state, "tasks", "t")
    waiters = [asyncio.create_task(shim_client.call(task_dir, {"op": "wait"}, timeout=None)) for _ in range(3)]
    async with shim_client.ShimConnection(task_dir) as conn:
        bad = await conn.raw({"op": "frobnicate"})
        assert bad == {"ok": False, "kind": "invalid_argument", "error": "unknown op 'frobnicate'"}
        with pytest.raises(errors.InvalidArgument):
            await conn.request({"op": "kill"})  # no signal
        refused = await conn.raw({"op": "shutdown"})
        assert refused["kind"] == "failed_precondition"
    await tm.start("t")
    await tm.kill("t", signal.SIGKILL)
    replies = await asyncio.gather(*waiters)
    assert {r["state"]["exit_code"] for r in replies} == {137}
    await tm.delete("t")


async def test_restore_after_restart_reports_exits_that_happened_meanwhile(managers, env):
    first = managers()
    await first.create(env.spec("done", "sh", "-c", "exit 7"))
    await first.create(env.spec("live", "sleep", "1000"))
    await first.create(env.spec("fresh", "sleep", "1000"))
    await first.start("live")
    await first.close()  # daemon goes away; shims stay
    assert len(shim_pids(env.state)) == 3

    before = time.time_ns()
    async with shim_client.ShimConnection(os.path.join(env.state, "tasks", "done")) as conn:
        await conn.request({"op": "start"})  # exits 7 while no daemon watches
    exit_path = os.path.join(env.state, "tasks", "done", p.EXIT_FILE)
    deadline = time.monotonic() + 10
    while not os.path.exists(exit_path) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)

    exits: list[TaskState] = []
    second = managers(on_exit=exits.append)
    states = {s.id: s for s in await second.restore()}
    assert states["done"].status == "stopped" and states["done"].exit_code == 7
    assert before <= states["done"].exited_at_ns <= time.time_ns()
    assert states["live"].status == "running" and states["fresh"].status == "created"
    assert [e.id for e in exits] == ["done"]  # delivered before restore returned
    assert exits[0].exited_at_ns == states["done"].exited_at_ns

    await second.kill("live", signal.SIGTERM)
    assert (await second.wait("live", timeout=10)).exit_code == 143  # watched again
    await asyncio.sleep(0)
    assert sorted(e.id for e in exits) == ["done", "live"]
    await second.close()

    third = managers(on_exit=exits.append)
    await third.restore()
    assert sorted(e.id for e in exits) == ["done", "live"]  # never delivered twice


async def test_restore_with_dead_shim_uses_exit_file_or_reports_unknown(managers, env):
    first = managers()
    await first.create(env.spec("exited", "true"))
    await first.start("exited")
    await first.wait("exited", timeout=10)
    await first.create(env.spec("orphan", "sleep", "1000"))
    await first.start("orphan")
    await first.close()
    for pid in shim_pids(env.state):  # shims die (OOM kill, admin) while the daemon is down
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while shim_pids(env.state) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)

    second = managers()
    states = {s.id: s for s in await second.restore()}
    assert states["exited"].status == "stopped" and states["exited"].exit_code == 0
    assert states["orphan"].status == "unknown" and states["orphan"].pid > 0
    with pytest.raises(errors.Internal):
        await second.wait("orphan", timeout=5)  # nobody can report that exit
    await second.kill("orphan", signal.SIGKILL)  # falls back to runc itself
    await second.delete("orphan")
    await second.delete("exited")
    assert os.listdir(os.path.join(env.state, "tasks")) == []


async def test_many_tasks_concurrently(managers, env):
    tm = managers()
    ids = [f"c{i}" for i in range(8)]
    await asyncio.gather(*(tm.create(env.spec(i, "sh", "-c", f"exit {n}")) for n, i in enumerate(ids)))
    await asyncio.gather(*(tm.start(i) for i in ids))
    states = await asyncio.gather(*(tm.wait(i, timeout=20) for i in ids))
    assert [s.exit_code for s in states] == list(range(8))
    await asyncio.gather(*(tm.delete(i) for i in ids))
    assert not shim_pids(env.state)


async def test_shim_setup_failure_is_reported_and_cleaned(managers, env, tmp_path):
    """A log path that cannot be opened fails create with the shim's reason."""
    tm = managers()
    with pytest.raises(errors.Internal) as info:
        await tm.create(env.spec("t", "true", log_path=str(tmp_path / "no" / "such" / "dir" / "x.log")))
    assert "shim setup failed" in str(info.value) and "No such file or directory" in str(info.value)
    assert not os.path.exists(os.path.join(env.state, "tasks", "t"))
    assert not shim_pids(env.state)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _eventually(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_launcher_is_reused_after_restart_and_retired_for_new_code(env):
    managers: list[TaskManager] = []
    try:
        first = TaskManager(env.state)
        managers.append(first)
        await first.create(env.spec("a", "sleep", "1000"))
        old = first.launcher_pid
        await first.close()
        assert _alive(old)  # it still has a shim to reap

        second = TaskManager(env.state)
        managers.append(second)
        await second.restore()
        await second.create(env.spec("b", "sleep", "1000"))
        assert second.launcher_pid == old  # a restarted daemon reuses it
        await second.close()

        third = TaskManager(env.state)
        managers.append(third)
        third._spawner.version = "newer-code"  # as after an upgrade of the shim code
        await third.restore()
        await third.create(env.spec("c", "sleep", "1000"))
        new = third.launcher_pid
        assert new not in (0, old) and _alive(old)  # the old one keeps serving its shims
        for id in ("a", "b", "c"):
            await third.delete(id)
        await _eventually(lambda: not _alive(old))  # retired: leaves with its last shim
        await third.close()
        await _eventually(lambda: not _alive(new))
    finally:
        cleaner = TaskManager(env.state)
        await cleaner.restore()
        for name in os.listdir(os.path.join(env.state, "tasks")):
            await cleaner.delete(name)
        for manager in managers + [cleaner]:
            await manager.close()
    assert not shim_pids(env.state)


async def test_reopen_log_after_rotation(managers, env, tmp_path):
    tm = managers()
    log, flag = tmp_path / "ctr.log", tmp_path / "flag"
    script = f"echo one; while [ ! -e {flag} ]; do sleep 0.02; done; echo two"
    await tm.create(env.spec("t", "sh", "-c", script, log_path=str(log)))
    await tm.start("t")
    await _eventually(lambda: log.exists() and log.read_bytes().endswith(b" stdout F one\n"))
    os.rename(log, tmp_path / "ctr.log.1")
    await tm.reopen_log("t")
    flag.touch()
    await tm.wait("t", timeout=10)
    assert [r.split(b" ", 3)[1:] for r in (tmp_path / "ctr.log.1").read_bytes().splitlines()] == [[b"stdout", b"F", b"one"]]
    assert [r.split(b" ", 3)[1:] for r in log.read_bytes().splitlines()] == [[b"stdout", b"F", b"two"]]
    await tm.delete("t")
    with pytest.raises(errors.NotFound):
        await tm.reopen_log("t")


def _reap_orphans(comm: str) -> bool:
    """Collect exited children named `comm`; True once none of them is left."""
    me, left = os.getpid(), False
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                name, rest = fh.read().split("(", 1)[1].rsplit(")", 1)
        except OSError:
            continue
        state, ppid = rest.split()[:2]
        if name == comm and int(ppid) == me:
            if state == "Z":
                os.waitpid(int(entry), 0)
            else:
                left = True
    return not left


async def test_create_timeout_kills_the_shim_and_cleans_up(managers, env):
    tm = managers()
    # the hung `runc create` is orphaned when its shim is killed; as subreaper we
    # collect it instead of leaving a zombie to a pid 1 that may not reap
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await tm.create(env.spec("slow", "HANG"), timeout=0.5)
        assert time.monotonic() - started < 2.5  # did not wait for the hung runc
        assert not os.path.exists(os.path.join(env.state, "tasks", "slow"))
        assert not shim_pids(env.state)
        with pytest.raises(errors.NotFound):
            await tm.state("slow")
        await _eventually(lambda: _reap_orphans("fake-runc"))
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0)
