#!/usr/bin/env bash
# One entry point for CI and the e2e tests: build the test images, make sure the
# local registry runs on 127.0.0.1, push the images to it.  Safe to run again:
# the build is skipped when its outputs are newer than its inputs, the registry
# start is a no-op when it already runs, and blobs already pushed are skipped.
#
# usage: hack/test-images.sh [--big] [--rebuild]
#   --big       also build and push test/big:latest (~100 MB, pull benchmark)
#   --rebuild   build even if build/images looks up to date
# env: CRI_PY_REGISTRY_PORT (default 5000), CRI_PY_REGISTRY_DIR, PYTHON (default python3)
#
# Pull as: 127.0.0.1:5000/pause:3.10 (registry.k8s.io/pause:3.10 via a mirror),
# 127.0.0.1:5000/library/busybox:latest (docker.io/library/busybox:latest via a
# mirror), 127.0.0.1:5000/test/{busybox-zstd,busybox-docker,multiarch,layers,big}:latest.
set -euo pipefail

cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
port="${CRI_PY_REGISTRY_PORT:-5000}"
out=build/images

big=""
rebuild=""
for arg in "$@"; do
    case "$arg" in
        --big) big=--big ;;
        --rebuild) rebuild=1 ;;
        -h|--help) sed -n '7,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "test-images.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

# Up to date: images.json exists, nothing under hack/ that feeds the build is
# newer, and the big image was built if it is wanted now.
up_to_date() {
    [ -f "$out/images.json" ] || return 1
    [ -z "$(find hack/build_images.py hack/images /bin/busybox -newer "$out/images.json" 2>/dev/null)" ] || return 1
    [ -z "$big" ] || grep -q '"test/big"' "$out/images.json"
}

if [ -z "$rebuild" ] && up_to_date; then
    echo "images in $out are up to date"
else
    "$python" hack/build_images.py --out "$out" $big
fi

hack/registry.sh start --port "$port"
"$python" hack/push_images.py --registry "127.0.0.1:$port" --images "$out/images.json"
