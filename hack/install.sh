#!/usr/bin/env bash
# Set up a machine to run cri-py and its tests; safe to run again.
#   - Debian packages: runc, CNI plugins, and what the tests use (busybox-static and
#     Debian's docker-registry for the self-built test images, gcc for the pause program)
#   - a virtualenv in .venv with cri-py installed editable, with its test extras
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

packages=(
  runc containernetworking-plugins iproute2 iptables
  busybox-static docker-registry apache2-utils
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

echo "install.sh: done; start the server with: .venv/bin/cri-py serve"
