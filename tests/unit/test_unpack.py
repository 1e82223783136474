"""Layer unpacking: faithful metadata, overlay whiteouts, and no escape from the snapshot."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from cri_py.errors import InvalidArgument
from cri_py.image import unpack as unpack_mod
from cri_py.image.unpack import (
    OVERLAY_OPAQUE_XATTR,
    LayerError,
    UnpackStats,
    compute_chain_id,
    is_layer_media_type,
    open_decompressed,
    unpack_layer,
)

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown, mknod, trusted xattrs)")
MTIME = 1_600_000_000
XATTR = "SCHILY.xattr."


def member(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    *,
    mode: int | None = None,
    uid: int = 0,
    gid: int = 0,
    mtime: float = MTIME,
    linkname: str = "",
    major: int = 0,
    minor: int = 0,
    pax: dict[str, str] | None = None,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.uid, info.gid, info.mtime = uid, gid, mtime
    info.linkname = linkname
    info.devmajor, info.devminor = major, minor
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if pax:
        info.pax_headers = dict(pax)
    return info, data


def d(name: str, **kw: Any) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.DIRTYPE, **kw)


def f(name: str, data: bytes = b"", **kw: Any) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.REGTYPE, data, **kw)


def sym(name: str, target: str, **kw: Any) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.SYMTYPE, linkname=target, **kw)


def hard(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.LNKTYPE, linkname=target)


def build(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def unpack(dest: Path, *members: tuple[tarfile.TarInfo, bytes]) -> UnpackStats:
    return unpack_layer(io.BytesIO(build(*members)), str(dest))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the snapshot that no layer may touch."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_bytes(b"original")
    return path


def snapshot(path: Path) -> dict[str, tuple[int, bytes | None]]:
    """Names, modes and contents under `path`, to prove nothing changed."""
    out: dict[str, tuple[int, bytes | None]] = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[str(p.relative_to(path))] = (st.st_mode, data)
    return out


def xattrs_supported(path: Path, name: str) -> bool:
    probe = path / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, name, b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


# --- regular content and metadata ---------------------------------------------------------


def test_files_dirs_and_modes(root: Path) -> None:
    stats = unpack(
        root,
        d("a", mode=0o750),
        f("a/file", b"hello", mode=0o640),
        f("a/suid", b"x", mode=0o4755),
        f("a/sgid", b"y", mode=0o2711),
        d("tmp", mode=0o1777),
        f("top", b"12345678"),
    )
    assert stats == UnpackStats(entries=6, file_bytes=5 + 1 + 1 + 8)
    assert (root / "a/file").read_bytes() == b"hello"
    assert stat.S_IMODE((root / "a").stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "a/file").stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "a/suid").stat().st_mode) == 0o4755
    assert stat.S_IMODE((root / "a/sgid").stat().st_mode) == 0o2711
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777


@needs_root
def test_owners_and_setuid_survive_chown(root: Path) -> None:
    unpack(
        root,
        d("home", uid=1000, gid=1001, mode=0o700),
        f("home/suid", b"x", uid=1234, gid=4321, mode=0o6755),
        sym("home/link", "suid", uid=77, gid=88),
        f("root-owned", b"", uid=0, gid=0),
    )
    st = (root / "home").stat()
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    st = (root / "home/suid").stat()
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert stat.S_IMODE(st.st_mode) == 0o6755  # chmod came after chown
    st = (root / "home/link").lstat()
    assert (st.st_uid, st.st_gid) == (77, 88)


def test_large_file_is_streamed_whole(root: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 123)
    stats = unpack(root, f("big", data))
    assert (root / "big").read_bytes() == data
    assert stats.file_bytes == len(data)


def test_missing_parents_are_created_0755(root: Path) -> None:
    old = os.umask(0o077)
    try:
        unpack(root, f("x/y/z", b"deep"))
    finally:
        os.umask(old)
    assert (root / "x/y/z").read_bytes() == b"deep"
    assert stat.S_IMODE((root / "x").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "x/y").stat().st_mode) == 0o755


def test_mtimes_including_directories_and_symlinks(root: Path) -> None:
    unpack(
        root,
        d("dir", mtime=1_000_000_000),
        d("dir/sub", mtime=1_100_000_000),
        f("dir/sub/file", b"x", mtime=1_200_000_000),
        f("dir/file", b"x", mtime=1_300_000_000),
        sym("dir/link", "file", mtime=1_400_000_000),
        f("precise", b"", pax={"mtime": "1500000000.123456789"}),
    )
    assert (root / "dir").stat().st_mtime_ns == 1_000_000_000 * 10**9
    assert (root / "dir/sub").stat().st_mtime_ns == 1_100_000_000 * 10**9
    assert (root / "dir/sub/file").stat().st_mtime_ns == 1_200_000_000 * 10**9
    assert (root / "dir/file").stat().st_mtime_ns == 1_300_000_000 * 10**9
    assert (root / "dir/link").lstat().st_mtime_ns == 1_400_000_000 * 10**9
    assert (root / "precise").stat().st_mtime_ns == 1_500_000_000_123_456_789


def test_symlinks_keep_their_target_verbatim(root: Path) -> None:
    unpack(root, sym("abs", "/etc/passwd"), sym("rel", "../../../x"), f("plain", b"p"))
    assert os.readlink(root / "abs") == "/etc/passwd"
    assert os.readlink(root / "rel") == "../../../x"


def test_hard_links_share_the_inode(root: Path) -> None:
    stats = unpack(
        root,
        d("bin"),
        f("bin/busybox", b"elf"),
        hard("bin/sh", "bin/busybox"),
        hard("ls", "/bin/busybox"),  # leading slash is root-relative too
        sym("bin/link", "busybox"),
        hard("bin/link2", "bin/link"),  # a hard link to a symlink links the symlink
    )
    ino = (root / "bin/busybox").stat().st_ino
    assert (root / "bin/sh").stat().st_ino == ino
    assert (root / "ls").stat().st_ino == ino
    assert (root / "bin/busybox").stat().st_nlink == 3
    assert (root / "bin/link2").lstat().st_ino == (root / "bin/link").lstat().st_ino
    assert stats.file_bytes == 3


def test_hard_link_to_missing_target_fails(root: Path) -> None:
    with pytest.raises(LayerError, match="'nothere'"):
        unpack(root, hard("h", "nothere"))
    with pytest.raises(LayerError, match="not found"):
        unpack(root, hard("h2", "no/such/dir"))


def test_hard_link_to_directory_fails(root: Path) -> None:
    with pytest.raises(LayerError, match="cannot hard link"):
        unpack(root, d("dir"), hard("h", "dir"))


@needs_root
def test_devices_and_fifo(root: Path) -> None:
    unpack(
        root,
        d("dev"),
        member("dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3, uid=5, gid=6),
        member("dev/loop0", tarfile.BLKTYPE, mode=0o660, major=7, minor=0),
        member("dev/fifo", tarfile.FIFOTYPE, mode=0o620),
    )
    st = (root / "dev/null").lstat()
    assert stat.S_ISCHR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert (st.st_uid, st.st_gid) == (5, 6)
    st = (root / "dev/loop0").lstat()
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (7, 0)
    st = (root / "dev/fifo").lstat()
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620


def test_user_xattrs_from_pax(root: Path) -> None:
    if not xattrs_supported(root, "user.probe"):
        pytest.skip("filesystem does not support user xattrs")
    binary = b"\x01\xff\x00bin".decode("utf-8", "surrogateescape")
    unpack(
        root,
        d("dir", pax={"SCHILY.xattr.user.dirattr": "on-dir"}),
        f("dir/file", b"x", pax={"SCHILY.xattr.user.text": "héllo", XATTR + "user.bin": binary}),
    )
    assert os.getxattr(root / "dir", "user.dirattr") == b"on-dir"
    assert os.getxattr(root / "dir/file", "user.text") == "héllo".encode()
    assert os.getxattr(root / "dir/file", "user.bin") == b"\x01\xff\x00bin"


@needs_root
def test_security_capability_survives_chown(root: Path) -> None:
    if not xattrs_supported(root, "trusted.probe"):
        pytest.skip("filesystem does not support trusted xattrs")
    # A valid VFS_CAP_REVISION_2 blob granting cap_net_bind_service (bit 10), effective.
    cap = bytes([0, 0, 0, 2, 0, 4, 0, 0, 0, 4, 0, 0] + [0] * 8)
    value = cap.decode("utf-8", "surrogateescape")
    unpack(root, f("ping", b"x", uid=1000, pax={"SCHILY.xattr.security.capability": value}))
    assert os.getxattr(root / "ping", "security.capability") == cap


def test_xattr_failures_are_fatal_except_trusted_and_security(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "setxattr", refuse)
    unpack(
        root,
        f("a", pax={"SCHILY.xattr.trusted.x": "1", "SCHILY.xattr.security.selinux": "ctx"}),
    )
    assert (root / "a").exists()
    with pytest.raises(PermissionError) as info:
        unpack(root, f("b", pax={"SCHILY.xattr.user.x": "1"}))
    assert any("'b'" in note for note in info.value.__notes__)


# --- whiteouts -------------------------------------------------------------------------------


def _is_whiteout(path: Path) -> bool:
    st = path.lstat()
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


@needs_root
def test_whiteout_becomes_overlay_char_device(root: Path) -> None:
    stats = unpack(
        root,
        d("etc"),
        f("etc/.wh.motd"),
        f("etc/gone", b"in this layer"),
        f("etc/.wh.gone"),
        d("etc/subdir"),
        f("etc/subdir/x", b"x"),
        f("etc/.wh.subdir"),
        f("newdir/.wh.deleted"),  # parent created on the way
    )
    for name in ("etc/motd", "etc/gone", "etc/subdir", "newdir/deleted"):
        assert _is_whiteout(root / name), name
    names = {p.name for p in root.rglob("*")}
    assert not any(n.startswith(".wh.") for n in names)
    assert stats.entries == 8


@needs_root
def test_whiteout_of_a_symlink_removes_the_link_not_its_target(root: Path, outside: Path) -> None:
    before = snapshot(outside)
    unpack(root, sym("evil", str(outside / "secret")), f(".wh.evil"))
    assert _is_whiteout(root / "evil")
    assert snapshot(outside) == before


@needs_root
def test_opaque_directory(root: Path) -> None:
    if not xattrs_supported(root, "trusted.probe"):
        pytest.skip("filesystem does not support trusted xattrs")
    unpack(
        root,
        d("var"),
        f("var/kept", b"k"),
        f("var/.wh..wh..opq"),
        f("fresh/.wh..wh..opq"),  # a missing directory is created, then marked
    )
    assert os.getxattr(root / "var", OVERLAY_OPAQUE_XATTR) == b"y"
    assert os.getxattr(root / "fresh", OVERLAY_OPAQUE_XATTR) == b"y"
    assert (root / "var/kept").read_bytes() == b"k"
    assert not (root / "var/.wh..wh..opq").exists()
    assert not (root / "fresh/.wh..wh..opq").exists()


def test_invalid_whiteout_names(root: Path) -> None:
    with pytest.raises(LayerError, match="invalid whiteout"):
        unpack(root, f(".wh."))


def test_aufs_metadata_is_skipped(root: Path) -> None:
    stats = unpack(root, d(".wh..wh.plnk"), f(".wh..wh.plnk/123.456", b"x"), f(".wh..wh.aufs"))
    assert list(root.iterdir()) == []
    assert stats.entries == 3


# --- replacing earlier entries ---------------------------------------------------------------


def test_file_replaces_directory_and_back(root: Path) -> None:
    unpack(root, d("x"), f("x/child", b"c"), f("x", b"now a file"), d("y"), f("y/z"), sym("y", "x"))
    assert (root / "x").read_bytes() == b"now a file"
    assert os.readlink(root / "y") == "x"


def test_directory_over_directory_merges(root: Path) -> None:
    unpack(root, d("m", mode=0o700), f("m/a", b"a"), d("m", mode=0o755, mtime=1_234_567_890))
    assert (root / "m/a").read_bytes() == b"a"
    st = (root / "m").stat()
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_mtime_ns == 1_234_567_890 * 10**9


def test_directory_replaces_file(root: Path) -> None:
    unpack(root, f("p", b"file"), d("p"), f("p/in", b"in"))
    assert (root / "p/in").read_bytes() == b"in"


def test_file_over_symlink_does_not_write_through_it(root: Path, outside: Path) -> None:
    before = snapshot(outside)
    unpack(root, sym("target", str(outside / "secret")), f("target", b"replaced"))
    assert (root / "target").read_bytes() == b"replaced"
    assert not (root / "target").is_symlink()
    assert snapshot(outside) == before


def test_rewriting_a_file_does_not_change_its_hard_links(root: Path) -> None:
    unpack(root, f("a", b"old"), hard("b", "a"), f("a", b"new"))
    assert (root / "a").read_bytes() == b"new"
    assert (root / "b").read_bytes() == b"old"


# --- escapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/../../x", "./../x", "a/b/../../../x", ".."])
def test_dotdot_escape_is_rejected(root: Path, outside: Path, name: str) -> None:
    before = snapshot(root.parent)
    with pytest.raises(LayerError, match="escapes the layer root") as info:
        unpack(root, f(name, b"pwned"))
    assert repr(name) in str(info.value)
    assert snapshot(root.parent) == before


def test_dotdot_inside_the_root_is_resolved(root: Path) -> None:
    unpack(root, d("a"), f("a/../b", b"b"), f("./c/./d", b"d"))
    assert (root / "b").read_bytes() == b"b"
    assert (root / "c/d").read_bytes() == b"d"


def test_absolute_paths_are_relative_to_the_root(root: Path) -> None:
    unpack(root, d("/abs"), f("/abs/file", b"abs"), f("//double/slash", b"ds"))
    assert (root / "abs/file").read_bytes() == b"abs"
    assert (root / "double/slash").read_bytes() == b"ds"


@pytest.mark.parametrize("link_target", ["ABS", "../outside", "sub/../../outside"])
@pytest.mark.parametrize(
    "second",
    [
        lambda: f("evil/secret", b"pwned"),
        lambda: f("evil/new", b"pwned"),
        lambda: d("evil/newdir"),
        lambda: sym("evil/secret", "/x"),
        lambda: f("evil/.wh.secret"),
        lambda: f("evil/.wh..wh..opq"),
        lambda: f("evil/deeper/file", b"pwned"),
    ],
)
def test_symlinked_parent_is_never_followed(
    root: Path, outside: Path, link_target: str, second: Any
) -> None:
    target = str(outside) if link_target == "ABS" else link_target
    before = snapshot(outside)
    with pytest.raises(LayerError, match="symbolic link") as info:
        unpack(root, sym("evil", target), second())
    assert "'evil'" in str(info.value)
    assert snapshot(outside) == before


def test_symlink_to_inside_is_not_followed_either(root: Path) -> None:
    # Even a harmless-looking in-root link is refused as a parent: in a
    # lowerdir-per-layer snapshot a layer never legitimately writes through one.
    with pytest.raises(LayerError, match="symbolic link"):
        unpack(root, d("real"), sym("lnk", "real"), f("lnk/x", b"x"))
    assert not (root / "real/x").exists()


def test_file_as_parent_is_rejected(root: Path) -> None:
    with pytest.raises(LayerError, match="not a directory"):
        unpack(root, f("file", b"x"), f("file/child", b"y"))


@pytest.mark.parametrize("link", ["../outside/secret", "a/../../outside/secret"])
def test_hard_link_escape_is_rejected(root: Path, outside: Path, link: str) -> None:
    with pytest.raises(LayerError, match=r"hard link target .* escapes"):
        unpack(root, d("a"), hard("h", link))
    assert (outside / "secret").stat().st_nlink == 1


def test_hard_link_through_symlinked_parent_is_rejected(root: Path, outside: Path) -> None:
    with pytest.raises(LayerError, match="symbolic link"):
        unpack(root, sym("evil", str(outside)), hard("h", "evil/secret"))
    assert (outside / "secret").stat().st_nlink == 1
    assert not (root / "h").exists()


def test_root_entry_is_ignored(root: Path) -> None:
    os.chmod(root, 0o711)
    stats = unpack(root, d("./", mode=0o777), d("/", mode=0o777), f("a", b"a"))
    assert stat.S_IMODE(root.stat().st_mode) == 0o711
    assert stats.entries == 3


def test_unsupported_entry_type(root: Path) -> None:
    with pytest.raises(LayerError, match="unsupported tar entry type"):
        unpack(root, member("weird", b"Z"))


# --- streams and compression -----------------------------------------------------------------


def test_empty_stream_is_an_empty_layer(root: Path) -> None:
    assert unpack_layer(io.BytesIO(b""), str(root)) == UnpackStats(0, 0)
    assert unpack(root) == UnpackStats(0, 0)


@pytest.mark.parametrize(
    "data",
    [b"garbage" * 200, build(f("a", b"x" * 5000))[:1200]],
    ids=["garbage", "truncated"],
)
def test_corrupt_tar_is_a_layer_error(root: Path, data: bytes) -> None:
    with pytest.raises(LayerError, match="not a valid tar"):
        unpack_layer(io.BytesIO(data), str(root))


def test_layer_error_is_invalid_argument() -> None:
    assert issubclass(LayerError, InvalidArgument)


LAYER = [d("etc"), f("etc/hostname", b"cri-py\n"), f("etc/big", os.urandom(300_000))]
OCI = "application/vnd.oci.image.layer"
DOCKER = "application/vnd.docker.image.rootfs"


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def zstd_frames(data: bytes) -> bytes:
    """Several frames, as chunked zstd layers are written."""
    return b"".join(zstd(data[i : i + 4096]) for i in range(0, len(data), 4096))


def gzip_members(data: bytes) -> bytes:
    """Several gzip members, as parallel gzip tools write."""
    return gzip.compress(data[:5000]) + gzip.compress(data[5000:])


def raw(data: bytes) -> bytes:
    return data


@pytest.mark.parametrize(
    ("media_type", "compress"),
    [
        (f"{OCI}.v1.tar", raw),
        (f"{OCI}.v1.tar+gzip", gzip.compress),
        (f"{OCI}.v1.tar+zstd", zstd),
        (f"{OCI}.nondistributable.v1.tar", raw),
        (f"{OCI}.nondistributable.v1.tar+gzip", gzip.compress),
        (f"{OCI}.nondistributable.v1.tar+zstd", zstd),
        (f"{DOCKER}.diff.tar.gzip", gzip.compress),
        (f"{DOCKER}.foreign.diff.tar.gzip", gzip.compress),
        (f"{DOCKER}.diff.tar", raw),
        (f"{OCI}.v1.tar+zstd", zstd_frames),
        (f"{OCI}.v1.tar+gzip", gzip_members),
    ],
)
def test_decompressed_streams_unpack(root: Path, media_type: str, compress: Any) -> None:
    tar_bytes = build(*LAYER)
    blob = io.BytesIO(compress(tar_bytes))
    stream = open_decompressed(blob, media_type)
    stats = unpack_layer(stream, str(root))
    assert (root / "etc/hostname").read_bytes() == b"cri-py\n"
    assert (root / "etc/big").read_bytes() == LAYER[2][1]
    assert stats == UnpackStats(entries=3, file_bytes=7 + 300_000)
    assert is_layer_media_type(media_type)
    assert not blob.closed


def test_decompressed_stream_content_matches(root: Path) -> None:
    raw = os.urandom(100_000)
    for media_type, blob in [
        ("application/vnd.oci.image.layer.v1.tar+gzip", gzip.compress(raw)),
        ("application/vnd.oci.image.layer.v1.tar+zstd", zstandard.ZstdCompressor().compress(raw)),
    ]:
        assert open_decompressed(io.BytesIO(blob), media_type).read() == raw


def test_corrupt_compressed_stream_is_a_layer_error(root: Path) -> None:
    for media_type in (
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
    ):
        stream = open_decompressed(io.BytesIO(b"not compressed at all" * 50), media_type)
        with pytest.raises(LayerError):
            unpack_layer(stream, str(root))
    truncated = gzip.compress(build(*LAYER))[:-2000]
    stream = open_decompressed(io.BytesIO(truncated), "application/vnd.oci.image.layer.v1.tar+gzip")
    with pytest.raises(LayerError):
        unpack_layer(stream, str(root))


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.oci.image.layer.v1.tar+bzip2",
        "application/octet-stream",
        "",
    ],
)
def test_unknown_media_type(media_type: str) -> None:
    assert not is_layer_media_type(media_type)
    with pytest.raises(LayerError, match="unsupported layer media type"):
        open_decompressed(io.BytesIO(b""), media_type)


# --- chain ids -------------------------------------------------------------------------------


def test_chain_id() -> None:
    diff_ids = [f"sha256:{hashlib.sha256(bytes([i])).hexdigest()}" for i in range(3)]
    c1 = "sha256:" + hashlib.sha256(f"{diff_ids[0]} {diff_ids[1]}".encode()).hexdigest()
    c2 = "sha256:" + hashlib.sha256(f"{c1} {diff_ids[2]}".encode()).hexdigest()
    assert compute_chain_id(diff_ids) == [diff_ids[0], c1, c2]
    assert compute_chain_id([]) == []
    assert compute_chain_id(diff_ids[:1]) == diff_ids[:1]


def test_chain_id_known_value() -> None:
    # Two well-known digests: the empty blob and the empty (1024 zero bytes) tar.
    empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    empty_tar = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
    assert hashlib.sha256(b"").hexdigest() == empty.split(":")[1]
    assert hashlib.sha256(b"\0" * 1024).hexdigest() == empty_tar.split(":")[1]
    expected = hashlib.sha256(f"{empty} {empty_tar}".encode()).hexdigest()
    assert compute_chain_id([empty, empty_tar]) == [empty, f"sha256:{expected}"]


@pytest.mark.parametrize("bad", ["", "sha256", "sha256:", "nohex", "SHA256:abc", "sha256:a b"])
def test_chain_id_rejects_malformed_diff_ids(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        compute_chain_id(["sha256:" + "a" * 64, bad])


def test_module_has_no_grpc_dependency_of_its_own() -> None:
    source = Path(unpack_mod.__file__).read_text()
    assert "import grpc" not in source
