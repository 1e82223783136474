"""A pod network of a test's own: bridge, subnet, host-local store and fault-injecting plugins.

Every test that runs pods gets its own bridge name and /24 (pod addresses live only in
the network namespaces the test makes), its own IPAM directory so allocations can be
counted, and removes its bridge at the end: the bridge plugin never deletes one.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

SYSTEM_CNI_DIRS = ["/usr/lib/cni", "/opt/cni/bin"]
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
PORTMAP_TOP_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ")


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; a failure shows its stderr in the assertion."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def link_names() -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in run("ip", "-o", "link", "show").stdout.splitlines()}


def iptables_lines() -> list[str]:
    """Rules and user chains, without comments, counters or table framing."""
    skip = ("#", ":", "*", "COMMIT")
    return [line for line in run("iptables-save").stdout.splitlines() if line and not line.startswith(skip)]


def nft_tables() -> set[str]:
    """nft's tables (none when the nft tool is not installed: then there is nothing to undo)."""
    if shutil.which("nft") is None:
        return set()
    return set(run("nft", "list", "tables", check=False).stdout.splitlines())


def nat_rules() -> list[str]:
    return run("iptables", "-t", "nat", "-S").stdout.splitlines()


class HostNetState:
    """What CNI plugins change on the host beyond their own DEL, snapshotted to undo it.

    The bridge plugin turns on ip_forward for isGateway; portmap's DEL leaves its shared
    top-level chains and iptables-nft its empty nat tables. A test puts them back.
    """

    def __init__(self) -> None:
        self.links = link_names()
        self.rules = iptables_lines()
        self.forward = Path(IP_FORWARD).read_text()
        self.tables = nft_tables()

    def restore(self) -> None:
        Path(IP_FORWARD).write_text(self.forward)
        if not any("CNI-HOSTPORT" in r for r in self.rules):
            self._remove_portmap_top_chains()
        self._drop_new_empty_nft_tables()

    @staticmethod
    def _remove_portmap_top_chains() -> None:
        for rule in nat_rules():
            if rule.startswith("-A ") and not rule.split()[1].startswith("CNI-") and "CNI-HOSTPORT" in rule:
                run("iptables", "-t", "nat", "-D", *shlex.split(rule)[1:], check=False)
        for chain in PORTMAP_TOP_CHAINS:
            run("iptables", "-t", "nat", "-F", chain, check=False)
            run("iptables", "-t", "nat", "-X", chain, check=False)

    def _drop_new_empty_nft_tables(self) -> None:
        for line in nft_tables() - self.tables:
            family, name = line.split()[1:3]
            listing = json.loads(run("nft", "-j", "list", "table", family, name).stdout)["nftables"]
            if any("rule" in item or ("chain" in item and "hook" not in item["chain"]) for item in listing):
                continue  # someone has rules in it now: not ours to drop
            run("nft", "delete", "table", family, name, check=False)


def _plugin(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


class PodNetwork:
    """The CNI setup of one test."""

    def __init__(self, base: Path, index: int) -> None:
        self.host = HostNetState()
        self.base = base
        self.index = index
        self.bridge = f"cripy{index}"
        self.name = f"e2e-net-{index}"
        self.subnet = ipaddress.ip_network(f"10.231.{index}.0/24")
        self.ipam_dir = base / "ipam"
        self.bin_dir = base / "bin"
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        self.runc_root = base / "runc"

    @property
    def bin_dirs(self) -> list[str]:
        """Our fake plugins first, then the system's."""
        return [str(self.bin_dir), *SYSTEM_CNI_DIRS]

    def server_config(self) -> str:
        """Config lines: a private runc root, so no test sees another's containers."""
        return f'\n[runtime.handlers.runc]\nroot = "{self.runc_root}"\n'

    def attach(self, server) -> None:  # noqa: ANN001 - tests.e2e.conftest.ServerProcess
        """Point a not-yet-started server at this network."""
        server.cni_bin_dirs = self.bin_dirs
    def write_conflist(self, conf_dir: Path, fail_after_bridge: bool = False, slow_seconds: float = 0) -> None:
        bridge_type = "bridge"
        if slow_seconds:
            bridge_type = "cripy-slow-bridge"
            _plugin(self.bin_dir / bridge_type, f"sleep {slow_seconds}\nexec {SYSTEM_CNI_DIRS[0]}/bridge\n")
        plugins: list[dict] = [
            {
                "type": bridge_type,
                "bridge": self.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(self.subnet)}]],
                    "dataDir": str(self.ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ]
        if fail_after_bridge:
            _plugin(
                self.bin_dir / "cripy-fail",
                'cat >/dev/null\nif [ "$CNI_COMMAND" = ADD ]; then\n'
                '  echo \'{"cniVersion":"1.0.0","code":999,"msg":"injected failure"}\'\n  exit 1\nfi\n'
                'if [ "$CNI_COMMAND" = VERSION ]; then echo \'{"cniVersion":"1.0.0","supportedVersions":["1.0.0"]}\'; fi\n'
                "exit 0\n",
            )
            plugins.append({"type": "cripy-fail"})
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "10-e2e.conflist").write_text(
            json.dumps({"cniVersion": "1.0.0", "name": self.name, "plugins": plugins})
        )

    def contains(self, ip: str) -> bool:
        return bool(ip) and ipaddress.ip_address(ip) in self.subnet

    def allocated(self) -> list[str]:
        """IPs host-local holds right now in this network."""
        directory = self.ipam_dir / self.name
        if not directory.exists():
            return []
        out = []
        for name in os.listdir(directory):
            try:
                ipaddress.ip_address(name)
            except ValueError:
                continue
            out.append(name)
        return sorted(out)

    def cleanup(self) -> None:
        """Delete the bridge the plugin made (veths went with their namespaces)."""
        run("ip", "link", "del", self.bridge, check=False)
        self.host.restore()
