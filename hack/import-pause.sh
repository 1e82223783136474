#!/usr/bin/env bash
# Make the default sandbox image (registry.k8s.io/pause:3.10) available offline: build
# the repo's own static pause image, pack it as an OCI image layout archive, and import
# it with `cri-py images import` (into the running daemon, or straight into the store
# when none runs). Extra arguments go to cri-py (e.g. --config /etc/cri-py/config.toml).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if [ ! -f build/images/pause/index.json ]; then
  "${PYTHON:-python3}" hack/build_images.py --out build/images
fi
archive="build/pause-oci.tar"
tar -C build/images/pause -cf "$archive" oci-layout index.json blobs
.venv/bin/cri-py images import "$archive" --name registry.k8s.io/pause:3.10 "$@"
