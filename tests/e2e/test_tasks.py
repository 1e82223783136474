"""The task layer against real runc: shims, launcher, exits, restarts, cleanup.

Every test runs with its own state dir and its own `runc --root`, so nothing collides
with other tests or a real daemon. Bundles share one read-only rootfs per image,
unpacked once per session from the OCI layouts in build/images.

While a test runs, the pytest process is a child subreaper: shims orphaned by a
killed launcher are reparented to it (not to pid 1, which does not reap on every
host) and collected in teardown, so tests leave no zombies either.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from cri_py import errors
from cri_py.runtime.runc import RuncError
from cri_py.runtime.tasks import TaskManager, TaskSpec, TaskState
from cri_py.shim import protocol as p
from tests.e2e.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "build" / "images"
RUNC = "/usr/sbin/runc" if os.path.exists("/usr/sbin/runc") else "runc"
PR_SET_CHILD_SUBREAPER = 36

pytestmark = pytest.mark.e2e


# --- images and bundles -----------------------------------------------------------


def _blob(layout: Path, digest: str) -> Path:
    algo, hexdigest = digest.split(":", 1)
    return layout / "blobs" / algo / hexdigest


def unpack_image(layout: Path, dest: Path) -> None:
    """Extract every layer of the layout's first manifest into dest (no whiteouts in
    these self-built test images)."""
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]).read_text())
    dest.mkdir(parents=True)
    for layer in manifest["layers"]:
        with tarfile.open(_blob(layout, layer["digest"])) as tar:
            tar.extractall(dest, filter="tar")


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory) -> dict[str, str]:
    """Read-only rootfs per test image, shared by all bundles of the session."""
    base = tmp_path_factory.mktemp("images")
    out = {}
    for name in ("busybox", "pause"):
        unpack_image(IMAGES / name, base / name)
        out[name] = str(base / name)
    return out


def oci_spec(
    args: list[str],
    rootfs: str,
    *,
    terminal: bool = False,
    pid_ns: str | None = None,
    env: list[str] | None = None,
) -> dict:
    """A minimal but complete OCI runtime spec (the shape `runc spec` prints).

    No oomScoreAdj: without CAP_SYS_RESOURCE runc may not lower it below ours.
    """
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                key: ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
                for key in ("bounding", "effective", "permitted")
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": True},
        "hostname": "task",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],  # fmt: skip
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid", **({"path": pid_ns} if pid_ns else {})},
                {"type": "network"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


class Env:
    """Paths of one test and helpers to make bundles and specs."""

    def __init__(self, base: Path, rootfs: dict[str, str]) -> None:
        self.base = base
        self.state = str(base / "state")
        self.runc_root = str(base / "runc")
        self.rootfs = rootfs

    def bundle(self, args: list[str], image: str = "busybox", **kw) -> str:
        path = self.base / "bundles" / uuid.uuid4().hex[:12]
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(oci_spec(args, self.rootfs[image], **kw)))
        return str(path)

    def spec(self, id: str, args: list[str], image: str = "busybox", *, tty: bool = False, pid_ns: str | None = None, **kw) -> TaskSpec:
        bundle = self.bundle(args, image, terminal=tty, pid_ns=pid_ns)
        return TaskSpec(id, bundle, runtime_binary=RUNC, runtime_root=self.runc_root, tty=tty, **kw)

    def runc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([RUNC, "--root", self.runc_root, *args], capture_output=True, text=True, check=check)

    def runc_ids(self) -> list[str]:
        out = self.runc("list", "--format", "json").stdout.strip()
        return [c["id"] for c in json.loads(out or "null") or []]

    def task_dir(self, id: str) -> str:
        return os.path.join(self.state, "tasks", id)

    def shim_pid(self, id: str) -> int:
        return int(p.read_json(os.path.join(self.task_dir(id), p.SHIM_PID_FILE)))


# --- process helpers (plain /proc scanning) --------------------------------------


def proc_state(pid: int) -> str | None:
    """The one-letter state of pid, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def processes(comm: str, under: str) -> list[int]:
    """Live processes named `comm` whose cwd or command line mentions `under`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not alive(int(entry)):
            continue
        try:
            with open(f"/proc/{entry}/comm") as fh:
                if fh.read().strip() != comm:
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().decode(errors="replace")
            if os.readlink(f"/proc/{entry}/cwd").startswith(under) or under in cmdline:
                found.append(int(entry))
        except OSError:
            continue
    return found


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl")


def _reap_zombie_children() -> None:
    """Collect exited processes reparented to us while we were a subreaper."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == me:
            try:
                os.waitpid(int(entry), os.WNOHANG)
            except ChildProcessError:
                pass


# --- fixtures ---------------------------------------------------------------------


@pytest.fixture
def env(tmp_path, rootfs):
    """Per-test paths; teardown removes any runc container and process left behind."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    e = Env(tmp_path, rootfs)
    yield e
    try:
        for id in e.runc_ids() if os.path.isdir(e.runc_root) else []:
            e.runc("delete", "--force", id, check=False)
        for pid in processes("cri-py-shim", e.state) + processes("cri-py-launcher", e.state):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not processes("cri-py-shim", e.state), what="stray shims to die")
    finally:
        _prctl(PR_SET_CHILD_SUBREAPER, 0)
        time.sleep(0.05)
        _reap_zombie_children()


@pytest.fixture
async def managers(env):
    """TaskManager factory; teardown deletes every task on disk, then closes all."""
    made: list[TaskManager] = []

    def make(on_exit=None, use_launcher: bool = True) -> TaskManager:
        manager = TaskManager(env.state, on_exit=on_exit, use_launcher=use_launcher)
        made.append(manager)
        return manager

    yield make
    cleaner = TaskManager(env.state)
    made.append(cleaner)
    await cleaner.restore()
    tasks_dir = os.path.join(env.state, "tasks")
    for name in os.listdir(tasks_dir) if os.path.isdir(tasks_dir) else []:
        await cleaner.delete(name)
    for manager in made:
        await manager.close()


def assert_clean(env: Env) -> None:
    """No runc container, no shim, no task dir, no launcher left."""
    assert env.runc_ids() == []
    wait_for(lambda: not processes("cri-py-shim", env.state), 10, what="shims to exit")
    tasks_dir = os.path.join(env.state, "tasks")
    assert not os.path.isdir(tasks_dir) or os.listdir(tasks_dir) == []


# --- tests ------------------------------------------------------------------------


async def test_create_then_start_then_kill(managers, env):
    tm = managers()
    created = await tm.create(env.spec("c1", ["sleep", "1000"]))
    assert created.status == "created" and created.pid > 0
    assert alive(created.pid)
    assert json.loads(env.runc("state", "c1").stdout)["status"] == "created"
    assert (await tm.state("c1")).pid == created.pid

    started = await tm.start("c1")
    assert started.status == "running" and started.pid == created.pid
    assert started.started_at_ns > 0
    assert json.loads(env.runc("state", "c1").stdout)["status"] == "running"
    with open(f"/proc/{created.pid}/cmdline", "rb") as fh:
        assert fh.read().split(b"\0")[0] == b"sleep"

    await tm.kill("c1", signal.SIGKILL)
    final = await tm.wait("c1", timeout=20)
    assert final.status == "stopped" and final.exit_code == 137
    await tm.delete("c1")
    assert_clean(env)


async def test_exit_code_reaches_wait_and_on_exit(managers, env):
    exits: list[TaskState] = []
    tm = managers(on_exit=exits.append)
    await tm.create(env.spec("c3", ["sh", "-c", "exit 3"]))
    started = await tm.start("c3")
    final = await tm.wait("c3", timeout=20)
    assert final.exit_code == 3 and final.status == "stopped"
    assert started.started_at_ns <= final.exited_at_ns <= time.time_ns()
    await asyncio.sleep(0.05)
    assert exits == [final]
    await tm.delete("c3")
    assert exits == [final]
    assert_clean(env)


async def test_sigterm_kills_sleep_with_143_and_pause_exits_0(managers, env):
    """`sleep` shares the pause container's pid namespace (as in a pod with a shared
    pid namespace): it is not that namespace's init, so SIGTERM's default action applies.
    pause is an init with a SIGTERM handler and exits 0."""
    tm = managers()
    pause = await tm.create(env.spec("pause", ["/pause"], image="pause"))
    await tm.start("pause")
    await tm.create(env.spec("sleeper", ["sleep", "1000"], pid_ns=f"/proc/{pause.pid}/ns/pid"))
    await tm.start("sleeper")
    await tm.kill("sleeper", signal.SIGTERM)
    assert (await tm.wait("sleeper", timeout=20)).exit_code == 143
    await tm.kill("sleeper", signal.SIGTERM)  # stopped already: fine
    await tm.delete("sleeper")
    await tm.kill("pause", signal.SIGTERM)
    assert (await tm.wait("pause", timeout=20)).exit_code == 0
    await tm.delete("pause")
    assert_clean(env)


async def test_output_is_written_to_log_path_completely(managers, env, tmp_path):
    tm = managers()
    log = tmp_path / "c.log"
    script = "echo to-stdout; echo to-stderr >&2; head -c 1000000 /dev/zero; echo; echo last"
    await tm.create(env.spec("out", ["sh", "-c", script], log_path=str(log)))
    await tm.start("out")
    assert (await tm.wait("out", timeout=20)).exit_code == 0
    data = log.read_bytes()
    assert b"to-stdout\n" in data and b"to-stderr\n" in data
    assert data.count(b"\0") == 1000000 and data.endswith(b"last\n")
    await tm.delete("out")
    assert_clean(env)


async def test_tty_output_reaches_the_log(managers, env, tmp_path):
    # a state dir too deep for sun_path: the shim's and the console socket's long paths
    env.state = str(tmp_path / ("deep" * 20) / "state")
    tm = managers()
    log = tmp_path / "tty.log"
    await tm.create(env.spec("tty", ["sh", "-c", "tty; echo done"], tty=True, log_path=str(log)))
    assert len(os.path.join(env.task_dir("tty"), "console.sock")) > p.UNIX_PATH_MAX
    await tm.start("tty")
    assert (await tm.wait("tty", timeout=20)).exit_code == 0
    data = log.read_bytes()
    assert b"/dev/pts/0\r\n" in data and b"done\r\n" in data
    await tm.delete("tty")
    assert_clean(env)


async def test_create_failure_reports_runc_error_and_leaves_nothing(managers, env):
    tm = managers()
    with pytest.raises(RuncError) as info:
        await tm.create(env.spec("broken", ["/no/such/binary"]))
    message = str(info.value)
    assert isinstance(info.value, errors.Internal)
    assert "runc create failed" in message and "/no/such/binary" in message
    assert f"{RUNC} --root {env.runc_root}" in message and " create " in message
    assert not os.path.exists(env.task_dir("broken"))
    assert env.runc_ids() == []
    assert processes("cri-py-shim", env.state) == []
    with pytest.raises(errors.NotFound):
        await tm.state("broken")
    assert_clean(env)


async def test_delete_is_idempotent_and_shims_exit(managers, env):
    exits: list[TaskState] = []
    tm = managers(on_exit=exits.append)
    await tm.delete("absent")
    await tm.create(env.spec("created", ["sleep", "1000"]))
    await tm.create(env.spec("running", ["sleep", "1000"]))
    await tm.start("running")
    await tm.create(env.spec("exited", ["true"]))
    await tm.start("exited")
    await tm.wait("exited", timeout=20)
    shims = {id: env.shim_pid(id) for id in ("created", "running", "exited")}
    assert all(alive(pid) for pid in shims.values())
    for id in shims:
        await tm.delete(id)
        await tm.delete(id)
        assert not alive(shims[id]), f"shim of {id} still runs"
        with pytest.raises(errors.NotFound):
            await tm.state(id)
    assert sorted((e.id, e.exit_code) for e in exits) == [("created", 137), ("exited", 0), ("running", 137)]
    assert_clean(env)
    await tm.close()
    # the launcher leaves once no daemon is connected and no shim remains
    wait_for(lambda: not processes("cri-py-launcher", env.state), 10, what="launcher to exit")


async def test_restart_restores_exit_that_happened_while_down(managers, env):
    first = managers()
    trap = "trap 'exit 7' TERM; while :; do sleep 0.1; done"
    await first.create(env.spec("trapper", ["sh", "-c", trap]))
    await first.start("trapper")
    await first.create(env.spec("sleeper", ["sleep", "1000"]))
    await first.start("sleeper")
    await first.close()  # the daemon stops; shims and containers stay

    before = time.time_ns()
    env.runc("kill", "trapper", "TERM")  # exits 7 while nobody watches
    wait_for(lambda: os.path.exists(os.path.join(env.task_dir("trapper"), p.EXIT_FILE)), what="exit.json")
    after = time.time_ns()

    exits: list[TaskState] = []
    second = managers(on_exit=exits.append)
    states = {s.id: s for s in await second.restore()}
    assert states["trapper"].status == "stopped" and states["trapper"].exit_code == 7
    assert before <= states["trapper"].exited_at_ns <= after
    assert states["sleeper"].status == "running"
    assert [(e.id, e.exit_code) for e in exits] == [("trapper", 7)]
    await second.kill("sleeper", signal.SIGKILL)
    assert (await second.wait("sleeper", timeout=20)).exit_code == 137
    await second.delete("trapper")
    await second.delete("sleeper")
    assert_clean(env)


DAEMON = textwrap.dedent(
    """
    import asyncio, json, sys
    sys.path.insert(0, {repo!r})
    from cri_py.runtime.tasks import TaskManager, TaskSpec

    async def main():
        tm = TaskManager({state!r})
        await tm.create(TaskSpec(**json.loads({spec!r})))
        state = await tm.start({id!r})
        print(json.dumps({{"pid": state.pid}}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_shim_survives_daemon_and_launcher_sigkill(managers, env):
    spec = env.spec("survivor", ["sleep", "1000"])
    script = DAEMON.format(repo=str(REPO), state=env.state, spec=json.dumps(spec.__dict__), id="survivor")
    daemon = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(daemon.stdout.readline), 60)
        init_pid = json.loads(line)["pid"]
        shim = env.shim_pid("survivor")
        [launcher] = processes("cri-py-launcher", env.state)
        os.killpg(daemon.pid, signal.SIGKILL)  # the daemon and anything in its group
        daemon.wait(10)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        daemon.stdout.close()
    time.sleep(0.2)
    assert alive(shim) and alive(init_pid) and alive(launcher)
    assert json.loads(env.runc("state", "survivor").stdout)["status"] == "running"
    os.kill(launcher, signal.SIGKILL)  # the shim's parent
    wait_for(lambda: not alive(launcher), what="launcher to die")
    time.sleep(0.2)
    assert alive(shim) and alive(init_pid)

    tm = managers()
    [restored] = await tm.restore()
    assert restored.status == "running" and restored.pid == init_pid
    await tm.create(env.spec("after", ["true"]))  # a new launcher takes over spawning
    assert tm.launcher_pid not in (0, launcher)
    await tm.kill("survivor", signal.SIGKILL)
    assert (await tm.wait("survivor", timeout=20)).exit_code == 137
    await tm.delete("survivor")
    await tm.delete("after")
    assert not alive(shim)
    assert_clean(env)


async def test_without_launcher(managers, env, tmp_path):
    tm = managers(use_launcher=False)
    log = tmp_path / "c.log"
    await tm.create(env.spec("plain", ["sh", "-c", "echo plain; exit 5"], log_path=str(log)))
    await tm.start("plain")
    assert (await tm.wait("plain", timeout=20)).exit_code == 5
    [record] = log.read_bytes().splitlines()
    assert record.split(b" ", 1)[1] == b"stdout F plain"
    await tm.delete("plain")
    assert_clean(env)
    assert processes("cri-py-launcher", env.state) == []
