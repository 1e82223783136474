"""CNI exec protocol against fake plugin scripts: no root, no real networking.

Each fake plugin is a small shell script that appends "<name> <command>" to a call
log, saves its stdin and env, and prints canned output with a canned exit code, so
the tests see exactly what a real plugin would receive.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from cri_py import errors
from cri_py.network.cni import (
    Cni,
    CniError,
    CniRequest,
    CniResult,
    format_cni_args,
    parse_plugin_error,
    plugin_config,
    pod_ips,
)
from cri_py.network.conf import NetworkConfig

CID = "c0ffee" * 10 + "abcd"

RESULT_040 = {
    "cniVersion": "0.4.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
        {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:02"},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/run/netns/x"},
    ],
    "ips": [
        {"version": "6", "address": "fd00::5/64", "interface": 2},
        {"version": "4", "address": "10.88.0.5/16", "gateway": "10.88.0.1", "interface": 2},
        {"version": "4", "address": "10.88.0.1/16", "interface": 0},
    ],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}

RESULT_100 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "br0", "mac": "aa:bb:cc:dd:ee:01"},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/run/netns/x"},
        {"name": "net1", "mac": "aa:bb:cc:dd:ee:04", "sandbox": "/run/netns/x"},
    ],
    "ips": [
        {"address": "10.1.2.3/24", "gateway": "10.1.2.1", "interface": 1},
        {"address": "2001:db8::3/64", "interface": 1},
        {"address": "10.9.9.9/24", "interface": 2},
    ],
}

SCRIPT = """#!/bin/sh
d='{rec}'
n='{name}'
echo "$n $CNI_COMMAND" >> "$d/calls"
cat > "$d/$n.$CNI_COMMAND.stdin"
env > "$d/$n.$CNI_COMMAND.env"
[ -f "$d/$n.$CNI_COMMAND.sleep" ] && {{ sleep "$(cat "$d/$n.$CNI_COMMAND.sleep")" & echo $! > "$d/$n.child"; wait; }}
[ -f "$d/$n.$CNI_COMMAND.out" ] && cat "$d/$n.$CNI_COMMAND.out"
[ -f "$d/$n.$CNI_COMMAND.err" ] && cat "$d/$n.$CNI_COMMAND.err" >&2
[ -f "$d/$n.$CNI_COMMAND.rc" ] && exit "$(cat "$d/$n.$CNI_COMMAND.rc")"
exit 0
"""


class Fakes:
    """A bin dir of fake plugins and what they recorded."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.rec = root / "rec"
        self.cache = root / "cache"
        self.bin.mkdir()
        self.rec.mkdir()

    def plugin(self, name: str, add: dict[str, Any] | None = None, **files: str) -> None:
        """Install plugin `name`; `add` is its ADD result; files like DEL_rc='1' are canned outputs."""
        path = self.bin / name
        path.write_text(SCRIPT.format(rec=self.rec, name=name))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        result = add if add is not None else {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]}
        (self.rec / f"{name}.ADD.out").write_text(json.dumps(result))
        for key, value in files.items():
            command, kind = key.split("_")
            (self.rec / f"{name}.{command}.{kind}").write_text(value)

    def calls(self) -> list[str]:
        path = self.rec / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def stdin(self, name: str, command: str) -> dict[str, Any]:
        return json.loads((self.rec / f"{name}.{command}.stdin").read_text())

    def env(self, name: str, command: str) -> dict[str, str]:
        lines = (self.rec / f"{name}.{command}.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def cni(self, timeout: float = 10) -> Cni:
        return Cni([str(self.bin), "/nonexistent-bin"], str(self.cache), timeout=timeout)


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    return Fakes(tmp_path)


def network(*plugins: dict[str, Any], name: str = "testnet", version: str = "1.0.0") -> NetworkConfig:
    raw = {"cniVersion": version, "name": name, "plugins": list(plugins)}
    return NetworkConfig(name=name, cni_version=version, plugins=raw["plugins"], source="test", raw=raw)


def request(netns: str = "", **kw: Any) -> CniRequest:
    return CniRequest(container_id=CID, netns=netns, **kw)


# ---- pure functions -------------------------------------------------------------


def test_cni_args_formatting():
    assert format_cni_args({}) == ""
    args = {
        "K8S_POD_NAMESPACE": "default",
        "K8S_POD_NAME": "web-0",
        "K8S_POD_INFRA_CONTAINER_ID": CID,
        "K8S_POD_UID": "u-1",
    }
    assert format_cni_args(args) == (
        f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID={CID};K8S_POD_UID=u-1"
    )
    assert format_cni_args({"IgnoreUnknown": "0", "A": "b"}) == "IgnoreUnknown=0;A=b"
    with pytest.raises(errors.InvalidArgument):
        format_cni_args({"A": "x;B=y"})
    with pytest.raises(errors.InvalidArgument):
        format_cni_args({"A=B": "x"})
    with pytest.raises(errors.InvalidArgument):
        format_cni_args({"A": "x=y"})


def test_runtime_config_only_for_declared_capabilities():
    caps = {
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}],
        "dns": {"servers": ["10.96.0.10"]},
        "bandwidth": {"ingressRate": 1000},
    }
    portmap = {"type": "portmap", "capabilities": {"portMappings": True, "dns": False}, "snat": True}
    conf = plugin_config("net", "1.0.0", portmap, {"cniVersion": "1.0.0"}, caps)
    assert conf["runtimeConfig"] == {"portMappings": caps["portMappings"]}
    assert conf["name"] == "net" and conf["cniVersion"] == "1.0.0" and conf["snat"] is True
    assert conf["prevResult"] == {"cniVersion": "1.0.0"}
    assert "runtimeConfig" not in portmap and "name" not in portmap  # the network config is not mutated

    bridge = {"type": "bridge", "name": "ignored", "cniVersion": "0.1.0"}
    conf = plugin_config("net", "1.0.0", bridge, None, caps)
    assert "runtimeConfig" not in conf and "prevResult" not in conf
    assert conf["name"] == "net" and conf["cniVersion"] == "1.0.0"

    # declared but not supplied: no empty runtimeConfig
    conf = plugin_config("net", "1.0.0", {"type": "bandwidth", "capabilities": {"bandwidth": True}}, None, {})
    assert "runtimeConfig" not in conf


def test_pod_ips_from_040_result_prefers_container_interface_and_ipv4_first():
    assert pod_ips(RESULT_040) == ["10.88.0.5", "fd00::5"]


def test_pod_ips_from_100_result():
    assert pod_ips(RESULT_100) == ["10.1.2.3", "2001:db8::3"]
    assert pod_ips(RESULT_100, ifname="net1") == ["10.9.9.9"]


def test_pod_ips_without_interface_index_and_old_versions():
    assert pod_ips({"cniVersion": "1.0.0", "ips": [{"address": "fd00::1/64"}, {"address": "10.0.0.9/8"}]}) == [
        "10.0.0.9",
        "fd00::1",
    ]
    assert pod_ips({"cniVersion": "0.2.0", "ip4": {"ip": "10.2.0.4/16"}, "ip6": {"ip": "fd01::4/64"}}) == [
        "10.2.0.4",
        "fd01::4",
    ]
    assert pod_ips({"cniVersion": "1.0.0"}) == []


def test_result_json_round_trip():
    result = CniResult.from_raw(RESULT_100)
    again = CniResult.from_json(result.to_json())
    assert again == result
    assert CniResult.from_json(json.loads(result.to_json())) == result


def test_error_json_parsing():
    stdout = json.dumps({"cniVersion": "1.0.0", "code": 7, "msg": "failed to allocate", "details": "range full"})
    err = parse_plugin_error("host-local", "ADD", 1, stdout.encode(), b"some log line\n")
    assert isinstance(err, errors.Internal)
    assert (err.plugin, err.command, err.cni_code, err.msg, err.details) == (
        "host-local",
        "ADD",
        7,
        "failed to allocate",
        "range full",
    )
    assert err.stderr == "some log line"
    for part in ("host-local", "ADD", "code 7", "failed to allocate", "range full", "some log line"):
        assert part in str(err)

    err = parse_plugin_error("bridge", "DEL", 2, b"panic: boom", b"")
    assert err.cni_code is None and "panic: boom" in str(err)
    err = parse_plugin_error("bridge", "DEL", 3, b"", b"")
    assert "exit status 3" in str(err)


# ---- exec through fake plugins ----------------------------------------------------


async def test_add_chains_results_and_sets_env(fakes: Fakes, tmp_path: Path):
    first = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/x"}],
        "ips": [{"address": "10.0.0.2/24", "interface": 0}],
    }
    second = dict(first, dns={"nameservers": ["10.0.0.1"]})
    fakes.plugin("first", add=first)
    fakes.plugin("second", add=second)
    net = network({"type": "first"}, {"type": "second", "capabilities": {"portMappings": True}})
    pm = [{"hostPort": 80, "containerPort": 8080, "protocol": "tcp"}]
    req = request(
        netns="/var/run/netns/x",
        args={"K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": "pod"},
        capability_args={"portMappings": pm, "dns": {"servers": ["1.1.1.1"]}},
    )
    result = await fakes.cni().add(net, req)

    assert fakes.calls() == ["first ADD", "second ADD"]
    assert result.raw == second and result.ips == ["10.0.0.2"]
    one, two = fakes.stdin("first", "ADD"), fakes.stdin("second", "ADD")
    assert "prevResult" not in one and "runtimeConfig" not in one
    assert two["prevResult"] == first and two["runtimeConfig"] == {"portMappings": pm}
    assert one["name"] == two["name"] == "testnet" and two["cniVersion"] == "1.0.0"
    env = fakes.env("second", "ADD")
    assert env["CNI_COMMAND"] == "ADD" and env["CNI_CONTAINERID"] == CID
    assert env["CNI_NETNS"] == "/var/run/netns/x" and env["CNI_IFNAME"] == "eth0"
    assert env["CNI_ARGS"] == "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod"
    assert env["CNI_PATH"] == f"{fakes.bin}:/nonexistent-bin"
    assert env.get("PATH")  # plugins need PATH to find iptables

    cache = json.loads((fakes.cache / f"testnet-{CID}-eth0.json").read_text())
    assert cache["config"] == net.raw and cache["result"] == second and cache["request"]["netns"] == "/var/run/netns/x"


async def test_delete_reverse_order_with_cached_result_then_idempotent(fakes: Fakes):
    fakes.plugin("a", add=RESULT_100)
    fakes.plugin("b", add=RESULT_100)
    fakes.plugin("c", add=RESULT_100)
    net = network({"type": "a"}, {"type": "b"}, {"type": "c", "capabilities": {"portMappings": True}})
    pm = [{"hostPort": 1, "containerPort": 2, "protocol": "tcp"}]
    await fakes.cni().add(net, request(netns="/gone/netns", capability_args={"portMappings": pm}))

    # a restarted daemon: new Cni, no network config at hand, request carries no capability args
    cni = fakes.cni()
    assert cni.cached(CID).ips == ["10.1.2.3", "2001:db8::3"]
    await cni.delete(None, request(netns="/gone/netns", capability_args={"portMappings": []}))
    assert fakes.calls()[3:] == ["c DEL", "b DEL", "a DEL"]
    for name in "abc":
        conf = fakes.stdin(name, "DEL")
        assert conf["prevResult"] == RESULT_100
        assert fakes.env(name, "DEL")["CNI_NETNS"] == ""  # the netns is gone: "" as the spec allows
    assert fakes.stdin("c", "DEL")["runtimeConfig"] == {"portMappings": pm}  # from the cache
    assert cni.cached(CID) is None
    assert list(fakes.cache.iterdir()) == []

    await cni.delete(None, request())  # no cache, no network: nothing to do
    assert len(fakes.calls()) == 6


async def test_delete_uses_cached_config_even_if_network_changed(fakes: Fakes):
    fakes.plugin("old")
    fakes.plugin("new")
    await fakes.cni().add(network({"type": "old"}, name="net-a"), request())
    await fakes.cni().delete(network({"type": "new"}, name="net-b"), request())
    assert fakes.calls() == ["old ADD", "old DEL"]
    assert fakes.stdin("old", "DEL")["name"] == "net-a"


async def test_delete_without_cache_uses_given_network(fakes: Fakes):
    fakes.plugin("a")
    fakes.plugin("b")
    await fakes.cni().delete(network({"type": "a"}, {"type": "b"}), request())
    assert fakes.calls() == ["b DEL", "a DEL"]
    assert "prevResult" not in fakes.stdin("a", "DEL")


async def test_delete_prev_result_only_from_040(fakes: Fakes):
    fakes.plugin("a", add={"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.0.0.3/24"}]})
    net = network({"type": "a"}, version="0.3.1")
    await fakes.cni().add(net, request())
    await fakes.cni().delete(net, request())
    assert "prevResult" not in fakes.stdin("a", "DEL")


async def test_failed_delete_keeps_cache_and_runs_every_plugin(fakes: Fakes):
    fakes.plugin("a")
    fakes.plugin("b", DEL_rc="1", DEL_out=json.dumps({"code": 11, "msg": "try again"}))
    net = network({"type": "a"}, {"type": "b"})
    cni = fakes.cni()
    await cni.add(net, request())
    with pytest.raises(CniError) as info:
        await cni.delete(net, request())
    assert info.value.plugin == "b" and info.value.cni_code == 11
    assert fakes.calls()[2:] == ["b DEL", "a DEL"]
    assert cni.cached(CID) is not None  # the kubelet's retry tears down with the same config
    (fakes.rec / "b.DEL.rc").unlink()
    await cni.delete(net, request())
    assert cni.cached(CID) is None


async def test_add_failure_halfway_deletes_whole_chain(fakes: Fakes):
    fakes.plugin("ipam")
    fakes.plugin(
        "bad", ADD_rc="1", ADD_out=json.dumps({"cniVersion": "1.0.0", "code": 999, "msg": "no way"}), ADD_err="oops"
    )
    fakes.plugin("never")
    net = network({"type": "ipam"}, {"type": "bad"}, {"type": "never"})
    cni = fakes.cni()
    with pytest.raises(CniError) as info:
        await cni.add(net, request(netns="/some/ns"))
    err = info.value
    assert (err.plugin, err.command, err.cni_code, err.msg, err.stderr) == ("bad", "ADD", 999, "no way", "oops")
    assert fakes.calls() == ["ipam ADD", "bad ADD", "never DEL", "bad DEL", "ipam DEL"]
    assert cni.cached(CID) is None
    assert not fakes.cache.exists() or list(fakes.cache.iterdir()) == []


async def test_add_rollback_failure_is_reported_as_note(fakes: Fakes):
    fakes.plugin("a", DEL_rc="1", DEL_out='{"code": 5, "msg": "cannot release"}')
    fakes.plugin("b", ADD_rc="1", ADD_out='{"code": 6, "msg": "cannot add"}')
    with pytest.raises(CniError) as info:
        await fakes.cni().add(network({"type": "a"}, {"type": "b"}), request())
    assert info.value.msg == "cannot add"
    assert any("cannot release" in note for note in info.value.__notes__)


async def test_plugin_timeout_kills_plugin_and_its_children(fakes: Fakes):
    fakes.plugin("slow", ADD_sleep="30")
    start = time.monotonic()
    with pytest.raises(CniError, match="timed out"):
        await fakes.cni(timeout=0.5).add(network({"type": "slow"}), request())
    assert time.monotonic() - start < 10
    child = int((fakes.rec / "slow.child").read_text())
    deadline = time.monotonic() + 5
    while _alive(child):
        assert time.monotonic() < deadline, f"plugin child {child} survived the timeout"
        time.sleep(0.05)
    assert fakes.calls() == ["slow ADD", "slow DEL"]  # rolled back


def _alive(pid: int) -> bool:
    """A pid exists and is not a zombie waiting for init to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_missing_plugin_binary(fakes: Fakes):
    with pytest.raises(CniError, match="not found"):
        await fakes.cni().add(network({"type": "absent"}), request())


async def test_invalid_add_output(fakes: Fakes):
    fakes.plugin("garbage", add=None)
    (fakes.rec / "garbage.ADD.out").write_text("not json")
    with pytest.raises(CniError, match="invalid result"):
        await fakes.cni().add(network({"type": "garbage"}), request())


async def test_check_uses_cached_result(fakes: Fakes):
    fakes.plugin("a", add=RESULT_100)
    fakes.plugin("b", add=RESULT_100)
    net = network({"type": "a"}, {"type": "b"})
    cni = fakes.cni()
    with pytest.raises(errors.FailedPrecondition):
        await cni.check(net, request())
    await cni.add(net, request())
    await cni.check(None, request())
    assert fakes.calls()[2:] == ["a CHECK", "b CHECK"]
    assert fakes.stdin("a", "CHECK")["prevResult"] == RESULT_100
    assert fakes.stdin("b", "CHECK")["prevResult"] == RESULT_100

    disabled = network({"type": "a"}, {"type": "b"})
    disabled.raw["disableCheck"] = True
    await cni.check(disabled, request())
    assert len(fakes.calls()) == 4


async def test_names_that_could_escape_the_cache_dir_are_refused(fakes: Fakes):
    fakes.plugin("a")
    with pytest.raises(errors.InvalidArgument):
        await fakes.cni().add(network({"type": "a"}, name="../evil"), request())
    with pytest.raises(errors.InvalidArgument):
        await fakes.cni().add(network({"type": "a"}), CniRequest(container_id="x/y", netns=""))
    with pytest.raises(errors.InvalidArgument):
        await fakes.cni().add(network({"type": "a"}), request(args={"K": "a;b"}))
    with pytest.raises(errors.InvalidArgument):
        await fakes.cni().add(network({"type": "a"}, version="1.x"), request())
    assert fakes.calls() == []


async def test_cache_lookup_ignores_lookalike_names(fakes: Fakes):
    fakes.plugin("a")
    cni = fakes.cni()
    await cni.add(network({"type": "a"}, name="n-1"), CniRequest(container_id="abc", netns=""))
    assert cni.cached("1-abc") is None  # n-1-abc-eth0.json ends in -1-abc-eth0.json: the entry decides
    assert cni.cached("abc") is not None
    assert os.path.exists(fakes.cache / "n-1-abc-eth0.json")


async def test_cancelled_add_still_rolls_back(fakes: Fakes):
    fakes.plugin("a")
    fakes.plugin("b", ADD_sleep="30")
    task = asyncio.ensure_future(fakes.cni().add(network({"type": "a"}, {"type": "b"}), request()))
    deadline = time.monotonic() + 10
    while not (fakes.rec / "b.child").exists():  # b is running (and stuck)
        assert time.monotonic() < deadline and not task.done()
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fakes.calls() == ["a ADD", "b ADD", "b DEL", "a DEL"]
    assert fakes.cni().cached(CID) is None
