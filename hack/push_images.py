#!/usr/bin/env python3
"""Push the OCI layouts made by hack/build_images.py to a registry.

Speaks the OCI distribution API directly (stdlib urllib only, so it runs with any
python3 and needs neither skopeo nor docker): for each blob HEAD, and if missing
POST an upload session and PUT the blob in one request; then PUT the manifests,
children of an index by digest before the index itself goes up under its tag
(registries refuse an index whose manifests they do not have yet).

    hack/push_images.py [--registry 127.0.0.1:5000] [--user U --password P]
                        [--images build/images/images.json] [NAME ...]

NAME filters images.json entries by layout dir, repository or repository:tag.
Re-running is cheap: blobs the registry has are skipped.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


class PushError(Exception):
    pass


class Registry:
    """Minimal client for one registry: blob existence, monolithic upload, manifest PUT."""

    def __init__(self, registry: str, user: str | None = None, password: str | None = None):
        # Plain http unless told otherwise: the test registry listens on 127.0.0.1.
        self.base = registry if "://" in registry else f"http://{registry}"
        self.base = self.base.rstrip("/")
        self.headers = {"User-Agent": "cri-py-push-images/1"}
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        # No proxies: an http_proxy in the environment must not capture local traffic.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method: str, url: str, data=None, headers: dict | None = None,
                ok: tuple[int, ...] = (200,)) -> tuple[int, dict, bytes]:
        """One HTTP request; any status outside ok raises a PushError that names
        the registry, method, URL, status and response body."""
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={**self.headers, **(headers or {})})
        try:
            with self.opener.open(req, timeout=300) as resp:
                status, hdrs, body = resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            status, hdrs, body = err.code, dict(err.headers), err.read()
        except urllib.error.URLError as err:
            raise PushError(f"registry {self.base}: {method} {url}: {err.reason}") from None
        if status not in ok:
            text = body.decode(errors="replace").strip()[:2000]
            if status == 401 and not text:
                text = "(no body; credentials missing or wrong: see --user/--password)"
            raise PushError(f"registry {self.base}: {method} {url}: HTTP {status}: {text}")
        return status, hdrs, body

    def has_blob(self, repo: str, digest: str) -> bool:
        status, _, _ = self.request("HEAD", f"{self.base}/v2/{repo}/blobs/{digest}", ok=(200, 404))
        return status == 200

    def upload_blob(self, repo: str, digest: str, path: Path) -> None:
        _, hdrs, _ = self.request("POST", f"{self.base}/v2/{repo}/blobs/uploads/", data=b"",
                                  ok=(202,))
        location = hdrs.get("Location")
        if not location:
            raise PushError(f"registry {self.base}: POST upload for {repo} returned no Location")
        # Location may be relative or absolute and may carry its own query (upload state).
        url = urllib.parse.urljoin(self.base + "/", location)
        url += ("&" if urllib.parse.urlsplit(url).query else "?") + urllib.parse.urlencode(
            {"digest": digest})
        size = path.stat().st_size
        with path.open("rb") as body:
            self.request("PUT", url, data=body, ok=(201,), headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(size)})

    def put_manifest(self, repo: str, reference: str, media_type: str, data: bytes,
                     digest: str) -> None:
        _, hdrs, _ = self.request("PUT", f"{self.base}/v2/{repo}/manifests/{reference}",
                                  data=data, ok=(201,), headers={"Content-Type": media_type})
        got = hdrs.get("Docker-Content-Digest")
        if got and got != digest:
            raise PushError(f"registry {self.base}: {repo}:{reference} stored as {got}, "
                            f"expected {digest}")


class Pusher:
    """Walks one layout from a descriptor down, pushing leaves before what refers to them."""

    def __init__(self, registry: Registry, layout: Path, repo: str):
        self.registry, self.layout, self.repo = registry, layout, repo
        self.blobs_pushed = self.blobs_skipped = 0

    def blob_path(self, digest: str) -> Path:
        algo, hexdigest = digest.split(":", 1)
        return self.layout / "blobs" / algo / hexdigest

    def push_blob(self, digest: str) -> None:
        if self.registry.has_blob(self.repo, digest):
            self.blobs_skipped += 1
            return
        self.registry.upload_blob(self.repo, digest, self.blob_path(digest))
        self.blobs_pushed += 1

    def push(self, desc: dict, reference: str) -> None:
        """Push the manifest or index desc points at, everything it needs first."""
        data = self.blob_path(desc["digest"]).read_bytes()
        doc = json.loads(data)
        if desc["mediaType"] in INDEX_TYPES:
            for child in doc["manifests"]:
                self.push(child, child["digest"])
        else:
            self.push_blob(doc["config"]["digest"])
            for layer in doc["layers"]:
                self.push_blob(layer["digest"])
        self.registry.put_manifest(self.repo, reference, desc["mediaType"], data, desc["digest"])


def load_entries(images_json: Path, names: list[str]) -> list[dict]:
    entries = json.loads(images_json.read_text())["images"]
    if not names:
        return entries
    wanted = set(names)
    chosen = [e for e in entries
              if wanted & {e["layout"], e["repository"], f"{e['repository']}:{e['tag']}"}]
    matched = {n for e in chosen for n in (e["layout"], e["repository"],
                                           f"{e['repository']}:{e['tag']}")}
    if wanted - matched:
        sys.exit(f"push_images: not in {images_json}: {', '.join(sorted(wanted - matched))}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", default="127.0.0.1:5000",
                        help="host:port or URL of the registry (default: 127.0.0.1:5000)")
    parser.add_argument("--user", help="basic auth user")
    parser.add_argument("--password", help="basic auth password")
    parser.add_argument("--images", type=Path, default=Path("build/images/images.json"),
                        help="images.json written by build_images.py")
    parser.add_argument("names", nargs="*", help="layout dirs or repositories to push (default: all)")
    args = parser.parse_args(argv)

    registry = Registry(args.registry, args.user, args.password)
    try:
        for entry in load_entries(args.images, args.names):
            layout = args.images.parent / entry["layout"]
            top = json.loads((layout / "index.json").read_text())["manifests"][0]
            pusher = Pusher(registry, layout, entry["repository"])
            pusher.push(top, entry["tag"])
            print(f"pushed {registry.base.split('://', 1)[1]}/{entry['repository']}:{entry['tag']} "
                  f"{top['digest']} ({top['mediaType']}; blobs: {pusher.blobs_pushed} uploaded, "
                  f"{pusher.blobs_skipped} present)")
    except PushError as err:
        print(f"push_images: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
