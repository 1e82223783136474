"""OCI and Docker manifest, index and config documents, and platform selection.

Registries answer with four manifest formats (OCI index and manifest, Docker list and
schema2) that say the same things with different media types; this module reads all
of them into one shape so the puller never branches on the format.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from typing import Any

from cri_py.errors import InvalidArgument, NotFound

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)

CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
         "armv6l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64", "i686": "386"}


class ManifestError(InvalidArgument):
    """A registry document we cannot use; the message names the digest."""


@dataclass(frozen=True)
class Platform:
    """An os/architecture/variant triple as OCI writes it."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def host_platform() -> Platform:
    """The platform images are selected for: this machine's."""
    machine = platform.machine()
    arch = _ARCH.get(machine, machine)
    variant = {"arm64": "v8", "arm": "v7" if machine == "armv7l" else "v6"}.get(arch, "")
    return Platform("linux", arch, variant)


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a blob."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None

    @classmethod
    def parse(cls, data: Any, where: str) -> "Descriptor":
        """Validate one descriptor of a manifest or index."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: descriptor is not an object")
        digest = data.get("digest")
        size = data.get("size")
        if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
            raise ManifestError(f"{where}: bad or unsupported digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: bad size {size!r}")
        plat = data.get("platform")
        parsed = None
        if isinstance(plat, dict):
            parsed = Platform(str(plat.get("os", "")), str(plat.get("architecture", "")), str(plat.get("variant", "")))
        return cls(str(data.get("mediaType", "")), digest, size, parsed)


@dataclass(frozen=True)
class ImageManifest:
    """A single-platform manifest: its config and layers, base layer first."""

    config: Descriptor
    layers: tuple[Descriptor, ...]


def _load_json(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"{where}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: not a JSON object")
    return doc


def media_type_of(data: bytes, declared: str) -> str:
    """The document's media type: the header when specific, else the body's mediaType."""
    if declared in ACCEPT:
        return declared
    body = _load_json(data, "manifest").get("mediaType", "")
    if body in ACCEPT:
        return body
    doc = _load_json(data, "manifest")
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc:
        return OCI_MANIFEST
    raise ManifestError(f"unsupported manifest media type {declared or body!r}")


def parse_manifest(data: bytes, where: str) -> ImageManifest:
    """Read a single-platform manifest (OCI or Docker schema2)."""
    doc = _load_json(data, where)
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ManifestError(f"{where}: manifest has no layers list")
    config = Descriptor.parse(doc.get("config"), f"{where} config")
    return ImageManifest(config, tuple(Descriptor.parse(layer, f"{where} layer {i}") for i, layer in enumerate(layers)))


def select_platform(data: bytes, where: str, want: Platform | None = None) -> Descriptor:
    """Pick the manifest for `want` (default the host) from an index or manifest list."""
    want = want or host_platform()
    doc = _load_json(data, where)
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise ManifestError(f"{where}: index has no manifests list")
    candidates = [Descriptor.parse(m, f"{where} manifest {i}") for i, m in enumerate(manifests)]
    best: tuple[int, Descriptor] | None = None
    for desc in candidates:
        score = _platform_score(desc.platform, want)
        if score is not None and (best is None or score > best[0]):
            best = (score, desc)
    if best is None:
        offered = ", ".join(str(d.platform) for d in candidates if d.platform) or "none"
        raise NotFound(f"{where}: no manifest for platform {want} (offered: {offered})")
    return best[1]


def _platform_score(have: Platform | None, want: Platform) -> int | None:
    """None when `have` cannot run here; higher is a closer match."""
    if have is None or have.os != want.os or have.architecture != want.architecture:
        return None
    if have.variant == want.variant:
        return 2
    if not have.variant:
        return 1  # an unversioned arm64 image runs on v8
    return None


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config the runtime uses, plus the whole document."""

    diff_ids: tuple[str, ...]
    user: str
    raw: dict[str, Any]

    @property
    def runtime_config(self) -> dict[str, Any]:
        """The `config` section: Entrypoint, Cmd, Env, WorkingDir, StopSignal…"""
        value = self.raw.get("config")
        return value if isinstance(value, dict) else {}


def parse_config(data: bytes, where: str) -> ImageConfig:
    """Read an image config and its rootfs diff ids."""
    doc = _load_json(data, where)
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) and d.startswith("sha256:") for d in diff_ids):
        raise ManifestError(f"{where}: config has no valid rootfs.diff_ids")
    runtime = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    user = runtime.get("User") or ""
    return ImageConfig(tuple(diff_ids), str(user), doc)
