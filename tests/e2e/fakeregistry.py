"""A tiny read-only OCI registry on 127.0.0.1 for tests that need to misbehave on purpose.

It serves OCI image layouts (the ones hack/build_images.py writes) and counts every
request, so a test can prove that five concurrent pulls fetched a layer once, and it
can serve corrupted bytes for a blob, which a real registry never would.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeRegistry:
    """Serves `repos` (repository -> layout dir) at http://127.0.0.1:<port>."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: Counter[str] = Counter()
        self.corrupt: dict[str, bytes] = {}  # blob digest -> bytes served instead
        self.extra_blobs: dict[str, bytes] = {}  # digest -> bytes, for any repository
        self.extra_manifests: dict[tuple[str, str], tuple[str, bytes]] = {}  # (repo, tag|digest) -> (type, data)
        self.held: set[str] = set()  # blob digests whose responses wait for `release`
        self.release = threading.Event()
        self._lock = threading.Lock()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                registry._handle(self, head=False)

            def do_HEAD(self) -> None:  # noqa: N802
                registry._handle(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeRegistry":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def count(self, fragment: str) -> int:
        """How many requests had `fragment` in their path."""
        with self._lock:
            return sum(n for path, n in self.requests.items() if fragment in path)

    # --- serving -----------------------------------------------------------------

    def _blob(self, repo: str, digest: str) -> bytes | None:
        if digest in self.corrupt:
            return self.corrupt[digest]
        if digest in self.extra_blobs:
            return self.extra_blobs[digest]
        layout = self.repos.get(repo)
        if layout is None:
            return None
        path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
        return path.read_bytes() if path.exists() else None

    def _manifest(self, repo: str, obj: str) -> tuple[str, bytes] | None:
        if (repo, obj) in self.extra_manifests:
            return self.extra_manifests[(repo, obj)]
        layout = self.repos.get(repo)
        if layout is None:
            return None
        index = json.loads((layout / "index.json").read_text())
        for desc in index["manifests"]:
            if obj in (desc["digest"], desc.get("annotations", {}).get("org.opencontainers.image.ref.name")):
                data = self._blob(repo, desc["digest"])
                return desc["mediaType"], data or b""
        if obj.startswith("sha256:"):
            data = self._blob(repo, obj)
            if data is not None:
                return json.loads(data).get("mediaType", "application/vnd.oci.image.manifest.v1+json"), data
        return None

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            self.requests[f"{h.command} {path}"] += 1
        if path in ("/v2", "/v2/"):
            return self._send(h, 200, "application/json", b"{}", head)
        if not path.startswith("/v2/"):
            return self._send(h, 404, "text/plain", b"not found", head)
        rest = path[len("/v2/") :]
        for kind in ("/manifests/", "/blobs/"):
            if kind in rest:
                repo, obj = rest.rsplit(kind, 1)
                break
        else:
            return self._send(h, 404, "text/plain", b"not found", head)
        if kind == "/manifests/":
            found = self._manifest(repo, obj)
            if found is None:
                return self._send(h, 404, "application/json", b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}', head)
            return self._send(h, 200, found[0], found[1], head)
        data = self._blob(repo, obj)
        if data is None:
            return self._send(h, 404, "application/json", b'{"errors":[{"code":"BLOB_UNKNOWN"}]}', head)
        if obj in self.held:
            self.release.wait(30)
        return self._send(h, 200, "application/octet-stream", data, head)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, ctype: str, body: bytes, head: bool) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Docker-Distribution-API-Version", "registry/2.0")
        h.end_headers()
        if not head:
            try:
                h.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass


def images_dir() -> Path:
    """Where hack/build_images.py put the layouts (built by hack/test-images.sh)."""
    root = Path(__file__).resolve().parents[2]
    path = Path(os.environ.get("CRI_PY_IMAGES_DIR", root / "build" / "images"))
    if not (path / "images.json").exists():
        raise RuntimeError(f"{path} has no images: run hack/test-images.sh first")
    return path
