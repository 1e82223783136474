#!/usr/bin/env bash
# Set up a machine to run cri-py and its tests; safe to run again.
#   - Debian packages: runc, CNI plugins, and what the tests use (busybox-static and
#     Debian's docker-registry for the self-built test images, gcc for the pause program)
#   - a virtualenv in .venv with cri-py installed editable, with its test extras
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

packages=(
  runc containernetworking-plugins iproute2 iptables nftables util-linux
  busybox-static docker-registry apache2-utils prometheus
  gcc libc6-dev zstd curl ca-certificates
  python3 python3-venv python3-dev
)

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (it installs Debian packages)" >&2
  exit 1
fi

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: $python is older than 3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'

# A default pod network so the quick start runs pods out of the box: only when the
# CNI config dir has no config at all (an existing network add-on is never touched).
conf_dir=/etc/cni/net.d
if [ -z "$(ls -A "$conf_dir" 2>/dev/null | grep -E '\.(conf|conflist|json)$' || true)" ]; then
  mkdir -p "$conf_dir"
  cat >"$conf_dir/10-cri-py.conflist" <<'CONF'
{
  "cniVersion": "1.0.0",
  "name": "cri-py",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cripy0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.88.0.0/16"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}
CONF
  echo "install.sh: wrote the default pod network $conf_dir/10-cri-py.conflist (bridge cripy0, 10.88.0.0/16)"
fi

# The sandbox image, offline: the repo's own static pause, imported into the default
# store (or the running daemon), unless the store has it already.
if ! .venv/bin/cri-py images ls 2>/dev/null | grep -q '^registry.k8s.io/pause:3.10 '; then
  hack/import-pause.sh
fi

echo "install.sh: done; start the server with: .venv/bin/cri-py serve"
