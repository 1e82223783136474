"""The server as the kubelet and crictl meet it: identity, health, socket, shutdown, metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.request

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri

from tests.e2e.conftest import wait_for

# RPCs whose behaviour this test module covers; every other one must be UNIMPLEMENTED
IMPLEMENTED = {
    "RuntimeService/Version",
    "RuntimeService/Status",
    "RuntimeService/RuntimeConfig",
    "RuntimeService/UpdateRuntimeConfig",
    "ImageService/PullImage",
    "ImageService/ListImages",
    "ImageService/ImageStatus",
    "ImageService/RemoveImage",
    "ImageService/ImageFsInfo",
    "RuntimeService/RunPodSandbox",
    "RuntimeService/StopPodSandbox",
    "RuntimeService/RemovePodSandbox",
    "RuntimeService/PodSandboxStatus",
    "RuntimeService/ListPodSandbox",
    "RuntimeService/CreateContainer",
    "RuntimeService/StartContainer",
    "RuntimeService/StopContainer",
    "RuntimeService/RemoveContainer",
    "RuntimeService/ListContainers",
    "RuntimeService/ContainerStatus",
    "RuntimeService/UpdateContainerResources",
    "RuntimeService/ExecSync",
    "RuntimeService/Exec",
    "RuntimeService/Attach",
    "RuntimeService/PortForward",
    "RuntimeService/ReopenContainerLog",
    "RuntimeService/GetContainerEvents",
    "RuntimeService/ContainerStats",
    "RuntimeService/ListContainerStats",
    "RuntimeService/PodSandboxStats",
    "RuntimeService/ListPodSandboxStats",
    "RuntimeService/ListMetricDescriptors",
    "RuntimeService/ListPodSandboxMetrics",
}


def test_version(server):
    response = server.runtime().Version(cri.VersionRequest(version="0.1.0"))
    assert response.runtime_name == "cri-py"
    assert response.runtime_api_version == "v1"
    assert response.version == "0.1.0"
    from cri_py import __version__

    assert response.runtime_version == __version__


def _conditions(server, verbose=False):
    response = server.runtime().Status(cri.StatusRequest(verbose=verbose))
    return {c.type: c for c in response.status.conditions}, response


def test_status_conditions_follow_the_cni_conf_dir(server):
    conditions, _ = _conditions(server)
    assert conditions["RuntimeReady"].status is True
    network = conditions["NetworkReady"]
    assert network.status is False
    assert network.reason == "NetworkPluginNotReady"
    assert str(server.conf_dir) in network.message

    (server.conf_dir / "10-test.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "e2e-unused",
                "plugins": [{"type": "bridge", "bridge": "cripy-unused0"}, {"type": "portmap"}],
            }
        )
    )
    conditions, _ = _conditions(server)
    assert conditions["NetworkReady"].status is True, conditions["NetworkReady"].message
    os.unlink(server.conf_dir / "10-test.conflist")
    conditions, _ = _conditions(server)
    assert conditions["NetworkReady"].status is False


def test_status_verbose_carries_the_config(server):
    _, response = _conditions(server, verbose=True)
    config = json.loads(response.info["config"])
    assert config["grpc"]["address"] == f"unix://{server.socket_path}"
    assert config["runtime"]["cgroup_driver"] == "cgroupfs"
    assert "" in [h.name for h in response.runtime_handlers]
    _, plain = _conditions(server)
    assert "config" not in plain.info


def test_runtime_config_reports_the_cgroup_driver(server_factory):
    assert server_factory().runtime().RuntimeConfig(cri.RuntimeConfigRequest()).linux.cgroup_driver == cri.CGROUPFS
    systemd = server_factory('[runtime]\ncgroup_driver = "systemd"\n')
    assert systemd.runtime().RuntimeConfig(cri.RuntimeConfigRequest()).linux.cgroup_driver == cri.SYSTEMD


def test_socket_is_root_only(server):
    st = os.stat(server.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, 0)


def _all_methods():
    descriptor = cri.DESCRIPTOR
    for service_name in ("RuntimeService", "ImageService"):
        service = descriptor.services_by_name[service_name]
        for method in service.methods:
            yield service_name, method


def test_every_unbuilt_rpc_answers_unimplemented(server):
    channel = server.channel()
    checked = 0
    for service_name, method in _all_methods():
        full = f"{service_name}/{method.name}"
        if full in IMPLEMENTED:
            continue
        request_class = getattr(cri, method.input_type.name)
        response_class = getattr(cri, method.output_type.name)
        path = f"/runtime.v1.{full}"
        if method.server_streaming:
            call = channel.unary_stream(path, request_class.SerializeToString, response_class.FromString)
            with pytest.raises(grpc.RpcError) as err:
                list(call(request_class(), timeout=10))
        else:
            call = channel.unary_unary(path, request_class.SerializeToString, response_class.FromString)
            with pytest.raises(grpc.RpcError) as err:
                call(request_class(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, full
        assert method.name in err.value.details()
        checked += 1
    assert checked >= 1  # UpdatePodSandboxResources and CheckpointContainer today


def test_sigterm_exits_zero_and_releases_the_socket(server_factory):
    server = server_factory()
    server.runtime().Version(cri.VersionRequest())
    assert server.terminate(signal.SIGTERM) == 0
    assert not os.path.exists(server.socket_path)
    # the same paths serve again right away
    server.start()
    server.runtime().Version(cri.VersionRequest())
    assert server.terminate(signal.SIGINT) == 0


def test_stale_socket_is_replaced(server_factory):
    server = server_factory(start=False)
    os.makedirs(os.path.dirname(server.socket_path))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(server.socket_path)
    stale.close()  # the file stays, nothing listens
    server.start()
    assert server.runtime().Version(cri.VersionRequest()).runtime_name == "cri-py"


def test_live_socket_is_an_error(server_factory):
    first = server_factory()
    second = server_factory(start=False)
    second.base.joinpath("state").mkdir()
    second.write_config()
    text = second.config_path.read_text().replace(second.socket_path, first.socket_path)
    second.config_path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "cri_py.cli", "serve", "--config", str(second.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "another server is listening" in result.stderr
    # and the first one is untouched
    assert first.runtime().Version(cri.VersionRequest()).runtime_name == "cri-py"


def test_bad_config_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[runtime]\ncgroup_driver = "cgroupv3"\n')
    result = subprocess.run(
        [sys.executable, "-m", "cri_py.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "runtime.cgroup_driver" in lines[0]


def test_metrics_endpoint_shows_the_request_histogram(server):
    runtime = server.runtime()
    runtime.Version(cri.VersionRequest())
    with pytest.raises(grpc.RpcError):
        runtime.ContainerStatus(cri.ContainerStatusRequest(container_id="absent"))

    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    body = wait_for(scrape, what="metrics endpoint")
    assert 'cri_py_grpc_request_duration_seconds_count{code="OK",method="RuntimeService/Version"} 1.0' in body
    assert (
        'cri_py_grpc_request_duration_seconds_count{code="NOT_FOUND",method="RuntimeService/ContainerStatus"} 1.0'
        in body
    )
    assert "process_resident_memory_bytes" in body


def test_metrics_can_be_disabled(server_factory):
    server = server_factory(metrics=False)
    assert '[metrics]\naddress = ""' in server.config_path.read_text()
    server.runtime().Version(cri.VersionRequest())
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=2)
