#!/usr/bin/env bash
# Run the whole test suite: build the test images, serve them from a local registry on
# 127.0.0.1:5000, run unit and end-to-end tests, and stop the registry if we started it.
# Extra arguments go to pytest (e.g. hack/test.sh tests/unit -k config).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

started_registry=0
if ! hack/registry.sh status >/dev/null 2>&1; then
  started_registry=1
fi
cleanup() {
  if [ "$started_registry" = 1 ]; then
    hack/registry.sh stop || true
  fi
}
trap cleanup EXIT

hack/test-images.sh
.venv/bin/python -m pytest -p no:cacheprovider "${@:-tests}"
