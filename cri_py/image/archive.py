"""Image archives for air-gapped nodes: OCI image layout tarballs and `docker save` output.

Both are read straight from the tar file (random access, no extraction to disk) into
the content store, verified like a pull; unpacking then follows the pull's path from
local blobs. A `docker save` archive has no manifest, so one is written for it, as
containerd's importer does, and its layers are stored uncompressed as they come.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from typing import Any

from cri_py.errors import InvalidArgument
from cri_py.image.content import ContentStore
from cri_py.image.manifest import (
    DOCKER_MANIFEST,
    INDEX_TYPES,
    Descriptor,
    media_type_of,
    parse_config,
    parse_manifest,
    select_platform,
)
from cri_py.image.pull import Layer, ResolvedImage
from cri_py.image.reference import Reference, parse_reference
from cri_py.image.unpack import compute_chain_id, is_layer_media_type

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
CHUNK = 1 << 20


class ArchiveError(InvalidArgument):
    """The archive is not an OCI layout or docker-save tarball we can read."""


@dataclass
class ArchiveImage:
    """One image found in an archive, with the names it carries."""

    names: list[Reference]
    resolved: ResolvedImage


def _find(tar: tarfile.TarFile, name: str) -> tarfile.TarInfo:
    """An entry by name, whether the archive wrote it as `x` or `./x`."""
    for candidate in (name, name.lstrip("./"), "./" + name.lstrip("./")):
        try:
            return tar.getmember(candidate)
        except KeyError:
            continue
    raise ArchiveError(f"archive has no {name}")


def _open_member(tar: tarfile.TarFile, name: str) -> tuple[tarfile.TarInfo, Any]:
    member = _find(tar, name)
    fh = tar.extractfile(member)
    if fh is None:
        raise ArchiveError(f"archive entry {name} is not a file")
    return member, fh


def _member_bytes(tar: tarfile.TarFile, name: str) -> bytes:
    return _open_member(tar, name)[1].read()


def _store_member(tar: tarfile.TarFile, name: str, content: ContentStore, digest: str | None = None) -> tuple[str, int]:
    """Copy one entry into the content store; with no digest given, it is computed."""
    member, fh = _open_member(tar, name)
    if digest is None:
        hasher = hashlib.sha256()
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
        digest = "sha256:" + hasher.hexdigest()
        fh = tar.extractfile(member)
        assert fh is not None
    if not content.has(digest):
        writer = content.writer(digest, member.size)
        try:
            while chunk := fh.read(CHUNK):
                writer.write(chunk)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    return digest, member.size


def _names_from(annotations: dict[str, Any], override: str | None) -> list[Reference]:
    """The reference an archive entry is to be tagged with."""
    if override:
        return [parse_reference(override)]
    for key in NAME_ANNOTATIONS:
        value = annotations.get(key)
        if isinstance(value, str) and ("/" in value or ":" in value and not value.replace(".", "").isalnum()):
            try:
                return [parse_reference(value)]
            except InvalidArgument:
                continue
    return []


def _resolve_stored(content: ContentStore, top_digest: str, manifest_digest: str, manifest_bytes: bytes, blobs: list[str]) -> ResolvedImage:
    """Build a ResolvedImage from a manifest whose config and layers are stored."""
    manifest = parse_manifest(manifest_bytes, f"manifest {manifest_digest}")
    config = parse_config(content.read(manifest.config.digest), f"config {manifest.config.digest}")
    layer_descs = [d for d in manifest.layers if is_layer_media_type(d.media_type)]
    if len(layer_descs) != len(config.diff_ids):
        raise ArchiveError(f"manifest {manifest_digest}: {len(layer_descs)} layers but {len(config.diff_ids)} diff ids")
    chain = compute_chain_id(list(config.diff_ids))
    layers = [Layer(d, diff, c) for d, diff, c in zip(layer_descs, config.diff_ids, chain)]
    blobs = blobs + [manifest.config.digest] + [d.digest for d in layer_descs]
    return ResolvedImage(top_digest, DOCKER_MANIFEST, manifest.config.digest, config, layers, blobs)


def _read_oci_layout(tar: tarfile.TarFile, content: ContentStore, name: str | None) -> list[ArchiveImage]:
    index = json.loads(_member_bytes(tar, "index.json"))
    blob_names = {m.name.lstrip("./"): m.name for m in tar.getmembers() if m.isfile()}

    # store every blob the archive has, verified against its file name
    for short, member in blob_names.items():
        if short.startswith("blobs/sha256/"):
            _store_member(tar, member, content, "sha256:" + short.rsplit("/", 1)[1])

    def load(digest: str) -> bytes:
        if not content.has(digest):
            raise ArchiveError(f"archive has no blob {digest}")
        return content.read(digest)
    images = []
    for entry in index.get("manifests", []):
        desc = Descriptor.parse(entry, "index.json")
        data = load(desc.digest)
        media_type = media_type_of(data, desc.media_type)
        blobs = [desc.digest]
        manifest_digest, manifest_bytes = desc.digest, data
        if media_type in INDEX_TYPES:
            chosen = select_platform(data, f"index {desc.digest}")
            manifest_digest, manifest_bytes = chosen.digest, load(chosen.digest)
            blobs.append(chosen.digest)
        resolved = _resolve_stored(content, desc.digest, manifest_digest, manifest_bytes, blobs)
        images.append(ArchiveImage(_names_from(entry.get("annotations") or {}, name), resolved))
    return images


def _read_docker_save(tar: tarfile.TarFile, content: ContentStore, name: str | None) -> list[ArchiveImage]:
    entries = json.loads(_member_bytes(tar, "manifest.json"))
    images = []
    for entry in entries:
        config_digest, config_size = _store_member(tar, entry["Config"], content)
        layer_descs = []
        for layer_name in entry["Layers"]:
            digest, size = _store_member(tar, layer_name, content)
            layer_descs.append({"mediaType": DOCKER_LAYER_TAR, "digest": digest, "size": size})
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest, "size": config_size},
                "layers": layer_descs,
            },
            separators=(",", ":"),
        ).encode()
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        content.put(manifest_digest, manifest)
        resolved = _resolve_stored(content, manifest_digest, manifest_digest, manifest, [manifest_digest])
        names = [parse_reference(name)] if name else [parse_reference(t) for t in entry.get("RepoTags") or []]
        images.append(ArchiveImage(names, resolved))
    return images


def read_archive(path: str, content: ContentStore, name: str | None = None) -> list[ArchiveImage]:
    """Load every image of an archive into the content store (blocking; run in a thread)."""
    try:
        tar = tarfile.open(path, "r:*")
    except (OSError, tarfile.TarError) as exc:
        raise ArchiveError(f"{path}: not a readable tar archive: {exc}") from None
    with tar:
        names = {n.lstrip("./") for n in tar.getnames()}
        try:
            if "index.json" in names and "oci-layout" in names:
                images = _read_oci_layout(tar, content, name)
            elif "manifest.json" in names:
                images = _read_docker_save(tar, content, name)
            else:
                raise ArchiveError(f"{path}: neither an OCI image layout nor a docker save archive")
        except (KeyError, TypeError, ValueError) as exc:
            raise ArchiveError(f"{path}: malformed archive: {exc}") from None
    if name and len(images) != 1:
        raise ArchiveError(f"{path}: --name needs an archive with exactly one image, it has {len(images)}")
    return images
