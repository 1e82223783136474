"""Containers end to end: real runc and shims, the repo's busybox image, kubelet log files."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri

from tests.e2e.conftest import BUSYBOX, Pod, server_with_network, wait_for

def test_lifecycle_exit_codes_reasons_and_logs(pod):
    ok = pod.run("ok", ["sh", "-c", "echo hello; echo oops >&2"])
    bad = pod.run("bad", ["sh", "-c", "exit 3"])
    st_ok, st_bad = pod.wait_exit(ok), pod.wait_exit(bad)
    assert (st_ok.exit_code, st_ok.reason) == (0, "Completed")
    assert (st_bad.exit_code, st_bad.reason) == (3, "Error")
    assert 0 < st_ok.created_at <= st_ok.started_at <= st_ok.finished_at
    assert st_ok.image_id == pod.image_id  # the ImageService's id for the same image
    assert st_ok.image.image == BUSYBOX
    assert st_ok.log_path == str(pod.log_dir / "ok" / "0.log")
    records = pod.log("ok").splitlines()
    streams = sorted((r.split(" ")[1], r.split(" ", 3)[3]) for r in records)
    assert streams == [("stderr", "oops"), ("stdout", "hello")]
    assert all(r.split(" ")[2] == "F" and r.split(" ")[0].endswith("Z") for r in records)
    listed = pod.runtime.ListContainers(cri.ListContainersRequest()).containers
    assert {c.id for c in listed} == {ok, bad}
    flt = cri.ContainerFilter(label_selector={"name": "ok"})
    assert [c.id for c in pod.runtime.ListContainers(cri.ListContainersRequest(filter=flt)).containers] == [ok]
    flt = cri.ContainerFilter(pod_sandbox_id=pod.id, state=cri.ContainerStateValue(state=cri.CONTAINER_EXITED))
    assert len(pod.runtime.ListContainers(cri.ListContainersRequest(filter=flt)).containers) == 2
    for _ in range(2):
        pod.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=ok))
    assert (pod.log_dir / "ok" / "0.log").exists()  # the kubelet owns log files
    with pytest.raises(grpc.RpcError) as err:
        pod.status(ok)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_requests_change_nothing(pod):
    def code(fn) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as err:
            fn()
        return err.value.code()

    assert code(lambda: pod.create("noimage", ["true"], image="docker.io/library/absent:1")) == grpc.StatusCode.NOT_FOUND
    relative = [cri.Mount(container_path="relative/path", host_path="/tmp")]
    assert code(lambda: pod.create("relmount", ["true"], mounts=relative)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(lambda: pod.create("escape", ["true"], log_path="../../escape.log")) == grpc.StatusCode.INVALID_ARGUMENT
    request = cri.CreateContainerRequest(
        pod_sandbox_id="f" * 64,
        config=cri.ContainerConfig(metadata=cri.ContainerMetadata(name="x"), image=cri.ImageSpec(image=pod.image_id)),
    )
    assert code(lambda: pod.runtime.CreateContainer(request)) == grpc.StatusCode.NOT_FOUND
    running = pod.run("dup", ["sleep", "1000"])
    assert code(lambda: pod.create("dup", ["true"])) == grpc.StatusCode.ALREADY_EXISTS
    assert code(lambda: pod.runtime.StartContainer(cri.StartContainerRequest(container_id=running))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    listed = pod.runtime.ListContainers(cri.ListContainersRequest()).containers
    assert [c.id for c in listed] == [running]
    state = pod.server.base / "state" / "containers"
    assert sorted(os.listdir(state)) == [running]


def test_stop_uses_sigkill_after_the_timeout_and_is_idempotent(pod):
    stubborn = pod.run("stubborn", ["sh", "-c", "trap '' TERM; echo ready; while true; do sleep 1; done"])
    wait_for(lambda: "ready" in pod.log("stubborn"), what="the trap to be set")
    start = time.monotonic()
    pod.runtime.StopContainer(cri.StopContainerRequest(container_id=stubborn, timeout=2), timeout=60)
    assert time.monotonic() - start >= 1.5
    st = pod.status(stubborn).status
    assert st.state == cri.CONTAINER_EXITED and st.exit_code == 128 + signal.SIGKILL
    pod.runtime.StopContainer(cri.StopContainerRequest(container_id=stubborn, timeout=2))
    polite = pod.run("polite", ["sleep", "1000"])
    pod.runtime.StopContainer(cri.StopContainerRequest(container_id=polite, timeout=30))
    assert pod.status(polite).status.exit_code == 128 + signal.SIGTERM


def test_memory_limit_exceeded_is_reported_oomkilled(pod):
    resources = cri.LinuxContainerResources(memory_limit_in_bytes=16 * 1024 * 1024)
    hog = pod.run("hog", ["sh", "-c", "tail /dev/zero"], linux=cri.LinuxContainerConfig(resources=resources))
    st = pod.wait_exit(hog, timeout=60)
    assert st.reason == "OOMKilled", (st.reason, st.exit_code)
    assert st.exit_code == 137


def test_users_groups_readonly_rootfs_and_capabilities(pod):
    named = pod.run("named", ["sh", "-c", "id -u; id -g; id -G"],
                    linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
                        run_as_username="tester", supplemental_groups=[777])))
    pod.wait_exit(named)
    uid, gid, groups = pod.log_lines("named")
    assert (uid, gid) == ("1234", "1234")
    assert set(groups.split()) == {"1234", "4321", "777"}  # /etc/group's extra plus the config's
    status_user = pod.status(named).status.user.linux
    assert (status_user.uid, status_user.gid) == (1234, 1234) and 777 in status_user.supplemental_groups

    ro = pod.run("ro", ["sh", "-c", "touch /newfile; echo rc=$?"],
                 linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(readonly_rootfs=True)))
    pod.wait_exit(ro)
    assert pod.log_lines("ro")[-1] == "rc=1"

    caps = cri.Capability(add_capabilities=["NET_ADMIN"], drop_capabilities=["ALL"])
    capped = pod.run("caps", ["sh", "-c", "grep CapEff /proc/self/status"],
                     linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(capabilities=caps)))
    pod.wait_exit(capped)
    assert pod.log_lines("caps") == ["CapEff:\t0000000000001000"]  # CAP_NET_ADMIN is bit 12 alone


def test_a_long_line_is_logged_as_partial_chunks_then_full(pod):
    long_line = pod.run("long", ["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' a; echo; echo after"])
    pod.wait_exit(long_line)
    records = [r.split(" ", 3) for r in pod.log("long").splitlines()]
    tags = [r[2] for r in records]
    assert tags[-2:] == ["F", "F"] and set(tags[:-2]) == {"P"} and len(tags) > 2
    assert "".join(r[3] for r in records[:-1]) == "a" * 1048576
    assert records[-1][3] == "after"


def test_reopen_log_loses_and_duplicates_nothing(pod):
    writer = pod.run("writer", ["sh", "-c", "i=0; while true; do i=$((i+1)); echo line-$i; done"])
    log_file = pod.log_dir / "writer" / "0.log"
    wait_for(lambda: log_file.exists() and log_file.stat().st_size > 100_000, what="some output")
    rotated = pod.log_dir / "writer" / "0.log.rotated"
    os.rename(log_file, rotated)
    pod.runtime.ReopenContainerLog(cri.ReopenContainerLogRequest(container_id=writer))
    wait_for(lambda: log_file.exists() and log_file.stat().st_size > 100_000, what="output in the new file")
    pod.runtime.StopContainer(cri.StopContainerRequest(container_id=writer, timeout=5))
    lines = []
    for path in (rotated, log_file):
        lines += [r.split(" ", 3)[3] for r in path.read_text().splitlines() if r.split(" ")[2] == "F"]
    numbers = [int(line.split("-")[1]) for line in lines if line.startswith("line-")]
    assert numbers == list(range(1, len(numbers) + 1))


def test_exec_sync_output_exit_code_timeout_and_background_children(pod):
    target = pod.run("target", ["sleep", "1000"])
    result = pod.exec(target, ["sh", "-c", "echo out; echo err >&2; exit 4"])
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 4)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        pod.exec(target, ["sleep", "30"], timeout=1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 10
    assert "sleep 30" not in pod.exec(target, ["ps"]).stdout.decode()  # the timed-out process was killed
    start = time.monotonic()
    result = pod.exec(target, ["sh", "-c", "sleep 60 & echo started"])
    assert result.exit_code == 0 and result.stdout == b"started\n"
    assert time.monotonic() - start < 10
    stopped = pod.run("stopped", ["true"])
    pod.wait_exit(stopped)
    with pytest.raises(grpc.RpcError) as err:
        pod.exec(stopped, ["true"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_concurrent_exec_syncs_each_get_their_own_result(pod):
    """Probes of one container run at once: the shim reaps them all, in any order."""
    from concurrent.futures import ThreadPoolExecutor

    target = pod.run("busy", ["sleep", "1000"])

    def probe(i: int) -> tuple[int, bytes]:
        # half exit at once (before runc is reaped), half a little later
        result = pod.exec(target, ["sh", "-c", f"{'sleep 0.2; ' if i % 2 else ''}echo {i}; exit {i % 7}"])
        return result.exit_code, result.stdout

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(probe, range(32)))
    assert results == [(i % 7, f"{i}\n".encode()) for i in range(32)]


def test_mounts_host_dirs_are_created_and_readonly_is_enforced(pod, tmp_path):
    created = tmp_path / "made-by-runtime"
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("from host")
    mounts = [
        cri.Mount(container_path="/made", host_path=str(created)),
        cri.Mount(container_path="/ro", host_path=str(ro), readonly=True),
    ]
    c = pod.run("mounts", ["sh", "-c", "echo x > /made/f; cat /ro/file; echo; touch /ro/y; echo rc=$?"], mounts=mounts)
    pod.wait_exit(c)
    assert created.is_dir() and (created / "f").read_text() == "x\n"
    assert pod.log_lines("mounts")[0] == "from host"
    assert pod.log_lines("mounts")[-1] == "rc=1"
    assert [m.container_path for m in pod.status(c).status.mounts] == ["/made", "/ro"]


def test_update_container_resources_applies_and_shows(pod):
    c = pod.run("resize", ["sleep", "1000"],
                linux=cri.LinuxContainerConfig(resources=cri.LinuxContainerResources(memory_limit_in_bytes=64 << 20)))
    new = cri.LinuxContainerResources(memory_limit_in_bytes=96 << 20, cpu_shares=512)
    pod.runtime.UpdateContainerResources(cri.UpdateContainerResourcesRequest(container_id=c, linux=new))
    assert pod.status(c).status.resources.linux.memory_limit_in_bytes == 96 << 20
    limit = pod.exec(c, ["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]).stdout
    if limit:  # cgroup v1 inside the container's cgroup namespace view
        assert int(limit) == 96 << 20


def test_containers_survive_a_sigkilled_daemon(pod):
    runner = pod.run("runner", ["sleep", "1000"])
    quick = pod.run("quick", ["sh", "-c", "sleep 2; echo bye; exit 7"])
    pid = json.loads(pod.status(runner, verbose=True).info["info"])["pid"]
    pod.server.terminate(signal.SIGKILL)
    wait_for(lambda: (pod.log_dir / "quick" / "0.log").exists() and "bye" in pod.log("quick"),
             what="the quick container to finish while the daemon is down")
    pod.server.start()
    pod.runtime = pod.server.runtime()
    st = pod.status(runner).status
    assert st.state == cri.CONTAINER_RUNNING and os.path.exists(f"/proc/{pid}")
    st = pod.wait_exit(quick, timeout=10)
    assert st.exit_code == 7 and st.finished_at > st.started_at
    assert pod.log_lines("quick") == ["bye"]
    pod.runtime.StopContainer(cri.StopContainerRequest(container_id=runner, timeout=5))
    assert pod.status(runner).status.exit_code == 128 + signal.SIGTERM


def test_image_volume_is_read_only_with_sub_path_and_digest_in_status(pod):
    pause = pod.server.images().ImageStatus(
        cri.ImageStatusRequest(image=cri.ImageSpec(image="registry.k8s.io/pause:3.10"))).image.id
    mounts = [cri.Mount(container_path="/vol", image=cri.ImageSpec(image="registry.k8s.io/pause:3.10")),
              cri.Mount(container_path="/bin-only", image=cri.ImageSpec(image=BUSYBOX), image_sub_path="bin")]
    c = pod.run("imgvol", ["sh", "-c", "ls /vol; ls /bin-only | grep -c .; touch /vol/x; echo rc=$?"], mounts=mounts)
    pod.wait_exit(c)
    lines = pod.log_lines("imgvol")
    assert lines[0] == "pause" and int(lines[1]) > 50 and lines[-1] == "rc=1"
    shown = {m.container_path: m.image.image for m in pod.status(c).status.mounts}
    assert shown["/vol"] == pause
    pod.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=c))
    assert str(pod.server.base) not in "".join(
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if "image-volumes" in line)


def test_recursive_read_only_mounts(pod, tmp_path):
    import subprocess

    features = pod.runtime.Status(cri.StatusRequest()).runtime_handlers[0].features
    assert features.recursive_read_only_mounts
    host = tmp_path / "rro"
    (host / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(host / "sub")], check=True)
    try:
        rro = [cri.Mount(container_path="/data", host_path=str(host), readonly=True, recursive_read_only=True)]
        c = pod.run("rro", ["sh", "-c", "touch /data/sub/f; echo rc=$?"], mounts=rro)
        pod.wait_exit(c)
        assert pod.log_lines("rro")[-1] == "rc=1"  # the tmpfs under the mount is read-only too
        plain = [cri.Mount(container_path="/data", host_path=str(host), readonly=True)]
        c2 = pod.run("ro-only", ["sh", "-c", "touch /data/sub/f; echo rc=$?"], mounts=plain)
        pod.wait_exit(c2)
        assert pod.log_lines("ro-only")[-1] == "rc=0"  # without rro a submount stays writable
        bad = [cri.Mount(container_path="/data", host_path=str(host), readonly=False, recursive_read_only=True)]
        with pytest.raises(grpc.RpcError) as err:
            pod.create("rro-rw", ["true"], mounts=bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        pod.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=c))
    finally:
        subprocess.run(["umount", str(host / "sub")], check=False)


def test_an_image_in_use_is_not_removed(pod):
    c = pod.run("user", ["sleep", "1000"])
    images = pod.server.images()
    for name in (BUSYBOX, pod.image_id):
        with pytest.raises(grpc.RpcError) as err:
            images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=name)))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and c in err.value.details()
    status = images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=BUSYBOX))).image
    assert status.id == pod.image_id and list(status.repo_tags) == [BUSYBOX]  # nothing changed
    assert pod.exec(c, ["true"]).exit_code == 0
    pod.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=c))
    images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=BUSYBOX)))
    assert not images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=BUSYBOX))).HasField("image")


def test_termination_message_file_and_fallback_to_logs(pod, tmp_path):
    message_file = tmp_path / "termination-log"
    message_file.write_text("")
    annotations = {"io.kubernetes.container.terminationMessagePath": "/dev/termination-log"}
    mounts = [cri.Mount(container_path="/dev/termination-log", host_path=str(message_file))]
    c = pod.run("msg", ["sh", "-c", "echo 'all done' > /dev/termination-log; exit 1"],
                annotations=annotations, mounts=mounts)
    assert pod.wait_exit(c).message == "all done\n"
    fallback = dict(annotations, **{"io.kubernetes.container.terminationMessagePolicy": "FallbackToLogsOnError"})
    empty = tmp_path / "empty-log"
    empty.write_text("")
    mounts = [cri.Mount(container_path="/dev/termination-log", host_path=str(empty))]
    c = pod.run("fallback", ["sh", "-c", "echo first; echo 'it broke'; exit 2"], annotations=fallback, mounts=mounts)
    assert pod.wait_exit(c).message == "first\nit broke\n"
    c = pod.run("fine", ["sh", "-c", "echo quiet"], annotations=fallback, mounts=mounts)
    assert pod.wait_exit(c).message == ""  # only on error


def test_seccomp_devices_pid_namespaces_and_annotations(pod):
    runtime_default = cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault)
    confined = pod.run("seccomp", ["sh", "-c", "grep Seccomp: /proc/self/status"],
                       linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
                           seccomp=runtime_default)))
    pod.wait_exit(confined)
    assert pod.log_lines("seccomp") == ["Seccomp:\t2"]  # filter mode
    unconfined = pod.run("noseccomp", ["sh", "-c", "grep Seccomp: /proc/self/status"],
                         linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
                             seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.Unconfined))))
    pod.wait_exit(unconfined)
    assert pod.log_lines("noseccomp") == ["Seccomp:\t0"]

    devices = [cri.Device(container_path="/dev/mynull", host_path="/dev/null", permissions="rwm")]
    dev = pod.run("dev", ["sh", "-c", "echo x > /dev/mynull && echo ok; ls -l /dev/mynull"], devices=devices)
    pod.wait_exit(dev)
    assert pod.log_lines("dev")[0] == "ok" and pod.log_lines("dev")[1].startswith("crw")

    shared = pod.run("podpid", ["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"])
    pod.wait_exit(shared)
    assert pod.log_lines("podpid")[0].strip() == "/pause"  # the pod's pid namespace: pause is pid 1
    own_ns = cri.NamespaceOption(pid=cri.CONTAINER)
    own = pod.run("ownpid", ["sh", "-c", "echo $$"],
                  linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
                      namespace_options=own_ns)))
    pod.wait_exit(own)
    assert pod.log_lines("ownpid") == ["1"]

    annotated = pod.create("annotated", ["true"], annotations={"example.com/a": "b"})
    spec = json.loads(pod.status(annotated, verbose=True).info["info"])["runtimeSpec"]
    assert spec["annotations"]["example.com/a"] == "b"
    assert spec["annotations"]["io.kubernetes.cri.sandbox-id"] == pod.id


def test_strict_supplemental_groups_policy(pod):
    strict = cri.LinuxContainerSecurityContext(
        run_as_username="tester", supplemental_groups=[777],
        supplemental_groups_policy=cri.SupplementalGroupsPolicy.Strict)
    c = pod.run("strict", ["id", "-G"], linux=cri.LinuxContainerConfig(security_context=strict))
    pod.wait_exit(c)
    assert set(pod.log_lines("strict")[0].split()) == {"1234", "777"}  # /etc/group's 4321 is not merged


def test_events_follow_a_container_life_for_two_subscribers(pod):
    import threading

    calls = [pod.server.runtime().GetContainerEvents(cri.GetEventsRequest()) for _ in range(2)]
    sinks: list[list] = [[], []]

    def drain(call, sink: list) -> None:
        try:
            for event in call:
                sink.append(event)
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    threads = [threading.Thread(target=drain, args=(call, sink)) for call, sink in zip(calls, sinks)]
    for t in threads:
        t.start()
    try:
        # the subscriptions are live once a pod-level event reaches them
        probe = pod.run("probe", ["true"])
        wait_for(lambda: all(any(e.container_id == probe for e in sink) for sink in sinks), what="subscriptions")
        c = pod.run("evented", ["sh", "-c", "exit 5"])
        pod.wait_exit(c)
        pod.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=c))
        expected = [cri.CONTAINER_CREATED_EVENT, cri.CONTAINER_STARTED_EVENT,
                    cri.CONTAINER_STOPPED_EVENT, cri.CONTAINER_DELETED_EVENT]
        for sink in sinks:
            wait_for(lambda s=sink: [e.container_event_type for e in s if e.container_id == c] == expected,
                     what="the four events of the container")
            stopped = [e for e in sink if e.container_id == c][2]
            assert stopped.pod_sandbox_status.id == pod.id
            assert [st.exit_code for st in stopped.containers_statuses if st.id == c] == [5]
    finally:
        for call in calls:
            call.cancel()
        for t in threads:
            t.join(10)


def test_critest_findings_stop_absent_ids_privileged_and_group_without_user(pod):
    # Stop calls are idempotent for ids that do not exist (the kubelet relies on it)
    pod.runtime.StopContainer(cri.StopContainerRequest(container_id="0" * 64, timeout=1))
    pod.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id="0" * 64))
    # an unknown bare image id is an absent image, not a bad reference
    images = pod.server.images()
    assert not images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image="0" * 64))).HasField("image")
    images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image="0" * 64)))
    # run_as_group without a user is refused, as the CRI requires
    group_only = cri.LinuxContainerSecurityContext(run_as_group=cri.Int64Value(value=5))
    with pytest.raises(grpc.RpcError) as err:
        pod.create("grouponly", ["true"], linux=cri.LinuxContainerConfig(security_context=group_only))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_privileged_container_in_a_privileged_pod_gets_the_caps_we_have(server_factory, local_registry, tmp_path, request):
    server, net = server_with_network(server_factory, tmp_path, request)
    runtime = server.runtime()
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="priv", namespace="e2e", uid="uid-priv"), log_directory=str(tmp_path / "l"))
    config.linux.security_context.privileged = True
    try:
        sandbox_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=120).pod_sandbox_id
        pod = Pod(server, sandbox_id, config, tmp_path / "l")
        privileged = cri.LinuxContainerSecurityContext(privileged=True)
        c = pod.run("priv", ["sh", "-c", "grep CapEff /proc/self/status"],
                    linux=cri.LinuxContainerConfig(security_context=privileged))
        st = pod.wait_exit(c)
        assert st.exit_code == 0
        own = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("CapBnd"))
        assert pod.log_lines("priv")[0].split()[1] == own.split()[1]  # exactly our bounding set
    finally:
        for item in runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items:
            runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=item.id), timeout=120)
        net.cleanup()


def test_metrics_count_pods_containers_pulls_cni_and_shims(pod):
    import urllib.request

    c = pod.run("counted", ["sleep", "1000"])
    with urllib.request.urlopen(f"http://127.0.0.1:{pod.server.metrics_port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert 'cri_py_pods{state="READY"} 1.0' in body
    assert 'cri_py_containers{state="CONTAINER_RUNNING"} 1.0' in body
    assert 'cri_py_image_pulls_total{result="success"}' in body
    assert 'cri_py_cni_operation_duration_seconds_count{operation="ADD",result="success"} 1.0' in body
    assert 'cri_py_shim_starts_total{result="success"} 2.0' in body  # the pause and this container
    pod.runtime.StopContainer(cri.StopContainerRequest(container_id=c, timeout=5))

    def log_bytes() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{pod.server.metrics_port}/metrics", timeout=5) as response:
            line = [x for x in response.read().decode().splitlines() if x.startswith("cri_py_log_bytes_written_total ")]
        return float(line[0].split()[1])

    talker = pod.run("talker", ["sh", "-c", "i=0; while [ $i -lt 1000 ]; do echo line-$i; i=$((i+1)); done"])
    pod.wait_exit(talker)
    written = (pod.log_dir / "talker" / "0.log").stat().st_size
    assert log_bytes() == written
    pod.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=talker))
    assert log_bytes() == written  # a counter never goes down when its container goes
