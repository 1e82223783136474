"""The node's pod CIDRs, which the kubelet hands over with UpdateRuntimeConfig.

On clusters where the control plane allocates node CIDRs (kubeadm with
--allocate-node-cidrs, kubenet-style networking), the kubelet learns the node's pod
CIDR(s) from its Node object and passes them to the runtime. With
`cni.conf_template` set, cri-py renders that template into
`<conf_dir>/10-cri-py.conflist` with the CIDRs filled in, so the bridge network
gets the addresses the cluster routes to this node; NetworkReady follows from the
new file. Without a template the CIDRs are only recorded (and shown in verbose
Status), as the kubelet needs no more.

Template placeholders (the template must be JSON once they are replaced):
- `${POD_CIDR}`: the first CIDR, e.g. `10.244.3.0/24`;
- `${POD_CIDR_RANGES}`: host-local `ranges` for every CIDR, `[[{"subnet": "..."}], ...]`;
- `${ROUTES}`: a default route per address family present, `[{"dst": "0.0.0.0/0"}, ...]`.
"""

from __future__ import annotations

import ipaddress
import json
import os

from cri_py.atomicfile import atomic_write
from cri_py.errors import FailedPrecondition, InvalidArgument

CONFLIST_NAME = "10-cri-py.conflist"  # the name hack/install.sh gives the default network
STATE_FILE = "pod-cidrs.json"  # under <root>/network: what the kubelet said last


def parse_cidrs(value: str) -> list[str]:
    """The CIDRs of a pod_cidr field ("" or comma-separated, dual-stack), normalized."""
    cidrs = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            cidrs.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError as exc:
            raise InvalidArgument(f"pod CIDR {part!r}: {exc}") from None
    return cidrs


def render(template: str, cidrs: list[str]) -> str:
    """The template with the placeholders replaced by JSON for `cidrs`."""
    families = {ipaddress.ip_network(c).version for c in cidrs}
    routes = [{"dst": "0.0.0.0/0"}] * (4 in families) + [{"dst": "::/0"}] * (6 in families)
    return (
        template.replace("${POD_CIDR_RANGES}", json.dumps([[{"subnet": c}] for c in cidrs]))
        .replace("${POD_CIDR}", cidrs[0])
        .replace("${ROUTES}", json.dumps(routes))
    )


class PodCidrs:
    """The recorded pod CIDRs and the network config rendered from them."""

    def __init__(self, root: str, conf_dir: str, template_path: str) -> None:
        self.state_path = os.path.join(root, "network", STATE_FILE)
        self.conf_dir = conf_dir
        self.template_path = template_path
        self.cidrs: list[str] = self._load()

    def _load(self) -> list[str]:
        """What was recorded before a restart (the kubelet only calls on a change)."""
        try:
            with open(self.state_path, "rb") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return []
        return [str(c) for c in data] if isinstance(data, list) else []

    def update(self, value: str) -> None:
        """Take the kubelet's pod_cidr: validate, render the network, then record it.

        An empty value changes nothing (the kubelet sends one before the node has a
        CIDR). Nothing is written unless everything is valid.
        """
        cidrs = parse_cidrs(value)
        if not cidrs:
            return
        if self.template_path:
            self._write_conflist(cidrs)
        os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
        atomic_write(self.state_path, json.dumps(cidrs).encode(), 0o644)
        self.cidrs = cidrs

    def _write_conflist(self, cidrs: list[str]) -> None:
        try:
            with open(self.template_path, encoding="utf-8") as fh:
                template = fh.read()
        except OSError as exc:
            raise FailedPrecondition(f"cni.conf_template {self.template_path}: {exc}") from None
        text = render(template, cidrs)
        try:
            json.loads(text)
        except ValueError as exc:
            raise FailedPrecondition(
                f"cni.conf_template {self.template_path} is not JSON with the pod CIDRs filled in: {exc}"
            ) from None
        os.makedirs(self.conf_dir, exist_ok=True)
        atomic_write(os.path.join(self.conf_dir, CONFLIST_NAME), text.encode(), 0o644)
