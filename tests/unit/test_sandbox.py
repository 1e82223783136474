"""Sandbox logic without root: config translation, files, the pause spec, validation."""

import pytest
from cri_api.v1 import api_pb2 as cri

from cri_py.errors import InvalidArgument
from cri_py.sandbox import cri as sandbox_cri
from cri_py.sandbox.files import resolv_conf
from cri_py.sandbox.manager import _parse_quantity, validate
from cri_py.sandbox.model import NODE, DnsConfig, PortMapping, Sandbox, SandboxConfig
from cri_py.sandbox.spec import pause_spec


def _config(**kw) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="web", namespace="ns", uid="u1", attempt=2), **kw)


def test_translation_of_a_full_config():
    config = _config(
        hostname="web-0",
        log_directory="/var/log/pods/ns_web_u1",
        dns_config=cri.DNSConfig(servers=["10.0.0.10"], searches=["ns.svc"], options=["ndots:5"]),
        port_mappings=[cri.PortMapping(protocol=cri.UDP, container_port=53, host_port=5353, host_ip="127.0.0.1")],
        labels={"a": "b"},
        annotations={"c": "d"},
    )
    config.linux.cgroup_parent = "/kubepods/pod-u1"
    config.linux.sysctls["net.core.somaxconn"] = "1024"
    sc = config.linux.security_context
    sc.namespace_options.network = cri.NODE
    sc.namespace_options.pid = cri.CONTAINER
    sc.run_as_user.value = 1000
    sc.seccomp.profile_type = cri.SecurityProfile.RuntimeDefault
    cfg = sandbox_cri.sandbox_config(config)
    assert cfg.full_name == "web_ns_u1_2"
    assert cfg.dns == DnsConfig(["10.0.0.10"], ["ns.svc"], ["ndots:5"])
    assert cfg.port_mappings == [PortMapping("udp", 53, 5353, "127.0.0.1")]
    assert cfg.host_network and cfg.pid_mode == "container" and cfg.ipc_mode == "pod"
    assert cfg.run_as_user == 1000 and cfg.run_as_group is None
    assert cfg.seccomp.kind == "runtime_default"
    assert cfg.sysctls == {"net.core.somaxconn": "1024"}
    # and back: status carries the namespace options
    status = sandbox_cri.sandbox_status(Sandbox(id="x" * 64, config=cfg, state="READY"))
    assert status.linux.namespaces.options.network == cri.NODE
    assert status.state == cri.SANDBOX_READY


def test_record_round_trip():
    cfg = SandboxConfig("n", "ns", "u", dns=DnsConfig(["1.1.1.1"]), port_mappings=[PortMapping("tcp", 80, 8080)])
    sandbox = Sandbox(id="i", config=cfg, ip="10.0.0.2")
    assert Sandbox.from_dict(sandbox.to_dict()) == sandbox


@pytest.mark.parametrize("missing", ["name", "namespace", "uid"])
def test_validation_names_the_missing_field(missing):
    values = {"name": "n", "namespace": "ns", "uid": "u"}
    values[missing] = ""
    with pytest.raises(InvalidArgument, match=f"metadata.{missing}"):
        validate(SandboxConfig(**values))


def test_resolv_conf_from_dns_config_or_host(tmp_path):
    host = tmp_path / "resolv.conf"
    host.write_text("nameserver 192.0.2.1\n")
    assert resolv_conf(None, str(host)) == "nameserver 192.0.2.1\n"
    assert resolv_conf(DnsConfig(), str(host)) == "nameserver 192.0.2.1\n"
    text = resolv_conf(DnsConfig(["10.0.0.10", "10.0.0.11"], ["a", "b"], ["ndots:5", "edns0"]), str(host))
    assert text == "nameserver 10.0.0.10\nnameserver 10.0.0.11\nsearch a b\noptions ndots:5 edns0\n"
    with pytest.raises(InvalidArgument):
        resolv_conf(DnsConfig(searches=[f"d{i}" for i in range(33)]))


def _spec(**kw):
    cfg = SandboxConfig("web", "ns", "u1", hostname="web-0", cgroup_parent="/kubepods/podu1", **kw)
    sandbox = Sandbox(id="abc", config=cfg, netns_path="/run/cri-py/netns/abc", shm_path="/run/cri-py/sandboxes/abc/shm")
    return pause_spec(sandbox, "/rootfs", ["/pause"], [], "65535:65535", "cgroupfs")


def test_pause_spec_namespaces_user_and_cgroup():
    spec = _spec()
    kinds = {ns["type"]: ns.get("path") for ns in spec["linux"]["namespaces"]}
    assert kinds == {"mount": None, "pid": None, "ipc": None, "uts": None, "network": "/run/cri-py/netns/abc"}
    assert spec["process"]["user"] == {"uid": 65535, "gid": 65535}
    assert spec["linux"]["cgroupsPath"] == "/kubepods/podu1/abc"
    assert spec["hostname"] == "web-0"
    assert {"destination": "/dev/shm", "type": "bind", "source": "/run/cri-py/sandboxes/abc/shm",
            "options": ["rbind", "rprivate", "rw"]} in spec["mounts"]
    assert "/proc/kcore" in spec["linux"]["maskedPaths"]
    assert spec["process"]["oomScoreAdj"] >= -998
    assert "seccomp" not in spec["linux"]


def test_pause_spec_host_namespaces_and_security():
    spec = _spec(network_mode=NODE, pid_mode=NODE, ipc_mode=NODE, run_as_user=1000, run_as_group=2000,
                 readonly_rootfs=True)
    assert [ns["type"] for ns in spec["linux"]["namespaces"]] == ["mount"]
    assert "hostname" not in spec
    assert spec["process"]["user"] == {"uid": 1000, "gid": 2000}
    assert spec["root"]["readonly"] is True


def test_pause_spec_runtime_default_seccomp_denies_escapes():
    from cri_py.sandbox.model import SecurityProfile

    spec = _spec(seccomp=SecurityProfile("runtime_default"))
    denied = spec["linux"]["seccomp"]["syscalls"][0]["names"]
    assert {"mount", "kexec_load", "init_module", "ptrace", "unshare"} <= set(denied)
    assert spec["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ALLOW"


def test_systemd_cgroups_path():
    from cri_py.runtime.spec import cgroups_path

    assert cgroups_path("systemd", "kubepods-besteffort-podu1.slice", "abc") == "kubepods-besteffort-podu1.slice:cri-py:abc"
    assert cgroups_path("cgroupfs", "", "abc") == "/cri-py/abc"


@pytest.mark.parametrize("value, bits", [("10M", 10_000_000), ("1Gi", 2**30), ("500k", 500_000), ("123", 123)])
def test_bandwidth_quantities(value, bits):
    assert _parse_quantity(value) == bits


def test_group_without_user_is_refused():
    with pytest.raises(InvalidArgument, match="run_as_group"):
        validate(SandboxConfig("n", "ns", "u", run_as_group=5))
