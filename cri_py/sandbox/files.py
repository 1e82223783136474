"""The files a pod's containers share: hostname, hosts, resolv.conf.

They live in the sandbox's own directory and are bind-mounted into every container,
so a container restart sees the same ones.
"""

from __future__ import annotations

import os
import socket

from cri_py.errors import InvalidArgument
from cri_py.sandbox.model import DnsConfig

HOST_RESOLV_CONF = "/etc/resolv.conf"
MAX_SEARCHES = 32  # glibc takes at most this many; the kubelet caps it the same way

HOSTS_TEMPLATE = """127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
fe00::0\tip6-mcastprefix
fe00::1\tip6-allnodes
fe00::2\tip6-allrouters
"""


def resolv_conf(dns: DnsConfig | None, host_file: str = HOST_RESOLV_CONF) -> str:
    """resolv.conf for the pod: from its DNSConfig, or the host's when it has none."""
    if dns is None or not (dns.servers or dns.searches or dns.options):
        try:
            with open(host_file, encoding="utf-8") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""
    if len(dns.searches) > MAX_SEARCHES:
        raise InvalidArgument(f"dns config has {len(dns.searches)} search domains; at most {MAX_SEARCHES}")
    lines = [f"nameserver {server}" for server in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n"


def pod_hostname(requested: str, host_network: bool) -> str:
    """The pod's hostname: the node's for host-network pods, else the requested one."""
    if host_network or not requested:
        return socket.gethostname()
    return requested


def write_sandbox_files(directory: str, hostname: str, dns: DnsConfig | None) -> None:
    """Write hostname, hosts and resolv.conf into the sandbox directory."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    files = {
        "hostname": hostname + "\n",
        "hosts": HOSTS_TEMPLATE,
        "resolv.conf": resolv_conf(dns),
    }
    for name, text in files.items():
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(path, 0o644)
