#!/usr/bin/env python3
"""Build cri-py's test images as OCI image layouts, reproducibly.

The e2e tests pull images from a registry on 127.0.0.1 (see hack/registry.sh and
hack/push_images.py) and the machine running them has no internet, so the images
are built here from what Debian ships: busybox-static and our own pause program
(hack/images/pause.c, compiled with gcc).

Every byte is deterministic (fixed mtimes, sorted tar entries, uid/gid 0 unless
an entry says otherwise, gzip without name/mtime, fixed JSON key order), so the
digests are stable across runs and machines with the same toolchain, and tests
may pin them.

Output (default build/images/):
    <layout>/oci-layout, <layout>/index.json, <layout>/blobs/sha256/<hex>
    images.json   {"images": [{"layout", "repository", "tag", "mediaType",
                                "digest", "reference"}, ...]}
                  read by hack/push_images.py; layout is relative to images.json.

Stdlib only, so it runs with any python3 >= 3.9.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAUSE_SRC = HERE / "images" / "pause.c"
BUSYBOX = Path("/bin/busybox")  # from Debian's busybox-static

# 2024-01-01T00:00:00Z: a fixed time for tar mtimes and config "created".
EPOCH = 1704067200
CREATED = "2024-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

OCI_LAYOUT_VERSION = '{"imageLayoutVersion":"1.0.0"}'
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# Compression suffix for each layer media type family.
OCI_LAYER_TYPES = {
    None: MT_OCI_LAYER,
    "gzip": MT_OCI_LAYER + "+gzip",
    "zstd": MT_OCI_LAYER + "+zstd",
}

# platform.machine() -> GOARCH, the names OCI platforms use.
GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def host_arch() -> str:
    """The host's architecture in OCI (GOARCH) spelling, for image configs."""
    machine = platform.machine()
    try:
        return GOARCH[machine]
    except KeyError:
        sys.exit(f"build_images: unsupported architecture {machine!r}")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj) -> bytes:
    """Compact JSON in the key order given: the bytes (and digest) never drift."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------------- tar


@dataclasses.dataclass
class Entry:
    """One tar member; a small value type so layers are plain sorted lists."""

    name: str  # relative, no leading "/" or "./"
    kind: str = "file"  # file | dir | symlink | hardlink
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""  # symlink/hardlink target

    def tarinfo(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.mtime = EPOCH
        info.mode = self.mode
        info.uid, info.gid = self.uid, self.gid
        info.uname = info.gname = ""
        if self.kind == "dir":
            info.type = tarfile.DIRTYPE
        elif self.kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, self.target
        elif self.kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, self.target
        else:
            info.size = len(self.data)
        return info


def d(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(name, "dir", mode=mode, uid=uid, gid=gid)


def f(name: str, data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    if isinstance(data, str):
        data = data.encode()
    return Entry(name, "file", data, mode, uid, gid)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, "symlink", mode=0o777, target=target)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, "hardlink", target=target)


def make_tar(entries: list[Entry]) -> bytes:
    """An uncompressed tar of entries sorted by name (parents sort first).

    PAX format so long names and large ids would still be exact; with our
    short names no extended headers are written.
    """
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tar entry names")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(entries, key=lambda e: e.name):
            info = entry.tarinfo()
            tar.addfile(info, io.BytesIO(entry.data) if info.isreg() else None)
    return buf.getvalue()


# ------------------------------------------------------------------- compression


def compress(raw: bytes, method: str | None) -> bytes:
    if method is None:
        return raw
    if method == "gzip":
        # No file name and mtime 0 in the header: the output depends on the input only.
        out = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz:
            gz.write(raw)
        return out.getvalue()
    if method == "zstd":
        return zstd_compress(raw)
    raise ValueError(f"unknown compression {method!r}")


def zstd_compress(raw: bytes) -> bytes:
    """zstd via the CLI first, the zstandard module only as a fallback.

    The CLI wins so the digest does not depend on which interpreter (system
    python3 or a venv that happens to have zstandard) runs this script. One
    thread and a fixed level keep the frame byte-identical across runs.
    """
    zstd = shutil.which("zstd")
    if zstd:
        proc = subprocess.run(
            [zstd, "-q", "-c", "-3", "-T1", "--no-progress"],
            input=raw, stdout=subprocess.PIPE, check=True,
        )
        return proc.stdout
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        sys.exit("build_images: need the zstd command (apt-get install zstd) or the zstandard module")
    return zstandard.ZstdCompressor(level=3, threads=0).compress(raw)


# ------------------------------------------------------------------------ layout


@dataclasses.dataclass
class Layer:
    """A layer as stored (blob) plus the digest of its uncompressed tar (diff_id)."""

    blob: bytes
    media_type: str
    diff_id: str
    comment: str


def make_layer(entries: list[Entry], compression: str | None, comment: str,
               docker: bool = False) -> Layer:
    raw = make_tar(entries)
    if docker:
        if compression != "gzip":
            raise ValueError("docker schema2 layers here are gzip only")
        media_type = MT_DOCKER_LAYER_GZIP
    else:
        media_type = OCI_LAYER_TYPES[compression]
    return Layer(compress(raw, compression), media_type, sha256(raw), comment)


class Layout:
    """An OCI image layout being written: blobs are content-addressed files."""

    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text(OCI_LAYOUT_VERSION)

    def put(self, data: bytes, media_type: str, **extra) -> dict:
        """Store a blob and return its descriptor (mediaType, digest, size, extra...)."""
        digest = sha256(data)
        path = self.blobs / digest.split(":", 1)[1]
        if not path.exists():
            path.write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def put_image(self, layers: list[Layer], config: dict, arch: str, variant: str | None = None,
                  docker: bool = False, **descriptor_extra) -> dict:
        """Write config, layers and manifest; return the manifest's descriptor."""
        image_config = {
            "created": CREATED,
            "architecture": arch,
            **({"variant": variant} if variant else {}),
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [
                {"created": CREATED, "created_by": "hack/build_images.py: " + layer.comment}
                for layer in layers
            ],
        }
        config_desc = self.put(canonical_json(image_config),
                               MT_DOCKER_CONFIG if docker else MT_OCI_CONFIG)
        manifest_type = MT_DOCKER_MANIFEST if docker else MT_OCI_MANIFEST
        manifest = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config_desc,
            "layers": [self.put(layer.blob, layer.media_type) for layer in layers],
        }
        return self.put(canonical_json(manifest), manifest_type, **descriptor_extra)

    def put_index(self, manifests: list[dict]) -> dict:
        index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests}
        return self.put(canonical_json(index), MT_OCI_INDEX)

    def finish(self, top: dict, tag: str) -> dict:
        """Write index.json pointing at top, annotated with its tag."""
        entry = {**top, "annotations": {"org.opencontainers.image.ref.name": tag}}
        index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": [entry]}
        (self.root / "index.json").write_bytes(canonical_json(index))
        return top


# ------------------------------------------------------------------------ inputs


def build_pause(workdir: Path) -> bytes:
    """Compile hack/images/pause.c statically and strip it."""
    out = workdir / "pause"
    subprocess.run(["gcc", "-static", "-Os", "-Wall", "-Wextra", "-Werror",
                    "-o", str(out), str(PAUSE_SRC)], check=True)
    subprocess.run(["strip", str(out)], check=True)
    data = out.read_bytes()
    require_static(data, "pause")
    return data


def require_static(elf: bytes, what: str) -> None:
    """Fail unless elf is an ELF64 little-endian file with no PT_INTERP header.

    A dynamically linked binary would make the image fail at runtime with a
    misleading "no such file or directory" (the missing loader), so refuse it here.
    """
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        sys.exit(f"build_images: {what} is not a little-endian ELF64 binary")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", elf, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            sys.exit(f"build_images: {what} is dynamically linked; need a static binary")


def busybox_entries() -> list[Entry]:
    """A minimal but realistic root filesystem around the static busybox.

    The users and groups exist so tests can cover RunAsUser/RunAsGroup by name
    and id, supplemental groups from /etc/group (tester is in group extra),
    and /var/www gives `httpd` something to serve.
    """
    data = BUSYBOX.read_bytes()
    require_static(data, str(BUSYBOX))
    applets = subprocess.run([str(BUSYBOX), "--list"], stdout=subprocess.PIPE, check=True,
                             text=True).stdout.split()
    entries = [
        d("bin"), d("dev"), d("etc"), d("home"), d("proc"), d("sys"), d("usr"), d("var"),
        d("root", 0o700),
        d("tmp", 0o1777),
        d("home/tester", 0o755, uid=1234, gid=1234),
        d("var/www"),
        f("bin/busybox", data, 0o755),
        f("etc/passwd",
          "root:x:0:0:root:/root:/bin/sh\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
          "tester:x:1234:1234:tester:/home/tester:/bin/sh\n"),
        f("etc/group",
          "root:x:0:\n"
          "nogroup:x:65534:\n"
          "tester:x:1234:\n"
          "extra:x:4321:tester\n"),
        f("etc/hostname", ""),
        f("var/www/index.html", "hello from cri-py\n"),
    ]
    entries += [symlink(f"bin/{name}", "busybox") for name in sorted(set(applets))
                if name != "busybox" and "/" not in name]
    return entries


BUSYBOX_CONFIG = {"Env": [PATH_ENV], "Cmd": ["sh"], "WorkingDir": "/"}


def big_layers(count: int = 4, files: int = 5000, avg_size: int = 20_000) -> list[Layer]:
    """~100 MB of incompressible, reproducible files for the pull benchmark.

    Content comes from SHAKE-256 seeded with the file's index: random-looking
    (so gzip cannot shrink it), identical on every run, and made in one C call
    per file.
    """
    layers = []
    per_layer = files // count
    for n in range(count):
        entries = [d("big"), d(f"big/{n}")]
        for sub in range(per_layer // 100):
            entries.append(d(f"big/{n}/{sub:02d}"))
        for i in range(per_layer):
            index = n * per_layer + i
            size = avg_size // 2 + (index * 7919) % avg_size
            content = hashlib.shake_256(f"cri-py big {index}".encode()).digest(size)
            entries.append(f(f"big/{n}/{i // 100:02d}/{i:04d}.bin", content))
        layers.append(make_layer(entries, "gzip", f"big layer {n}"))
    return layers


# -------------------------------------------------------------------------- images


@dataclasses.dataclass
class Built:
    layout: str
    repository: str
    tag: str
    top: dict

    def record(self) -> dict:
        return {"layout": self.layout, "repository": self.repository, "tag": self.tag,
                "mediaType": self.top["mediaType"], "digest": self.top["digest"],
                "reference": f"{self.repository}:{self.tag}@{self.top['digest']}"}


def build_all(out: Path, big: bool) -> list[Built]:
    arch = host_arch()
    results: list[Built] = []

    def image(layout_name: str, repository: str, tag: str, make) -> None:
        """Build one layout in a temp dir beside its final place, then swap it in,
        so an interrupted run never leaves a half-written layout behind."""
        final = out / layout_name
        tmp = out / f".{layout_name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        layout = Layout(tmp)
        top = layout.finish(make(layout), tag)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        results.append(Built(layout_name, repository, tag, top))
        print(f"built {repository + ':' + tag:<28} {top['mediaType']:<54} {top['digest']}")

    with tempfile.TemporaryDirectory(prefix="cri-py-pause-") as work:
        pause_bin = build_pause(Path(work))
    pause_layer = make_layer([f("pause", pause_bin, 0o755)], "gzip", "COPY pause /pause")
    image("pause", "pause", "3.10", lambda lo: lo.put_image(
        [pause_layer],
        {"User": "65535:65535", "Env": [PATH_ENV], "Entrypoint": ["/pause"], "WorkingDir": "/"},
        arch))

    bb_entries = busybox_entries()
    bb_layer = make_layer(bb_entries, "gzip", "busybox-static rootfs")
    image("busybox", "library/busybox", "latest",
          lambda lo: lo.put_image([bb_layer], BUSYBOX_CONFIG, arch))

    image("busybox-zstd", "test/busybox-zstd", "latest", lambda lo: lo.put_image(
        [make_layer(bb_entries, "zstd", "busybox-static rootfs (zstd)")], BUSYBOX_CONFIG, arch))

    image("busybox-docker", "test/busybox-docker", "latest", lambda lo: lo.put_image(
        [make_layer(bb_entries, "gzip", "busybox-static rootfs", docker=True)],
        BUSYBOX_CONFIG, arch, docker=True))

    def multiarch(lo: Layout) -> dict:
        # The busybox binary is the host's in both; /arch tells which one was picked.
        children = []
        for plat_arch, variant in (("amd64", None), ("arm64", "v8")):
            arch_layer = make_layer([f("arch", plat_arch + "\n")], "gzip", f"/arch = {plat_arch}")
            platform_ = {"architecture": plat_arch, "os": "linux",
                         **({"variant": variant} if variant else {})}
            children.append(lo.put_image([bb_layer, arch_layer], BUSYBOX_CONFIG, plat_arch,
                                         variant, platform=platform_))
        return lo.put_index(children)

    image("multiarch", "test/multiarch", "latest", multiarch)

    def layers(lo: Layout) -> dict:
        # Layer 1 (plain tar) makes files, links and a dir; layer 2 (gzip) deletes
        # one file with a whiteout and replaces /opq's contents with an opaque marker.
        base = make_layer([
            d("data"), f("data/keep.txt", "keep\n"), f("data/gone.txt", "gone\n"),
            d("opq"), f("opq/old.txt", "old\n"),
            d("links"), f("links/a.txt", "a\n"), hardlink("links/b.txt", "links/a.txt"),
            symlink("links/s", "a.txt"),
        ], None, "layer 1: files, hard link, symlink")
        top = make_layer([
            d("data"), f("data/.wh.gone.txt", "", 0o600),
            d("opq"), f("opq/.wh..wh..opq", "", 0o600), f("opq/new.txt", "new\n"),
        ], "gzip", "layer 2: whiteout and opaque dir")
        return lo.put_image([bb_layer, base, top], BUSYBOX_CONFIG, arch)

    image("layers", "test/layers", "latest", layers)

    if big:
        image("big", "test/big", "latest",
              lambda lo: lo.put_image([bb_layer, *big_layers()], BUSYBOX_CONFIG, arch))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/images"),
                        help="output directory (default: build/images)")
    parser.add_argument("--big", action="store_true",
                        help="also build test/big:latest (~100 MB) for the pull benchmark")
    args = parser.parse_args(argv)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    built = build_all(out, args.big)
    manifest = {"images": [b.record() for b in built]}
    tmp = out / "images.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "images.json")
    print(f"wrote {out / 'images.json'} ({len(built)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
