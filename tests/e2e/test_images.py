"""ImageService end to end: pulls from real and fake registries, the store on disk, import."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri

from tests.e2e.conftest import REPO_ROOT, free_port, wait_for
from tests.e2e.fakeregistry import FakeRegistry, images_dir


def pull(server, image: str, auth: cri.AuthConfig | None = None, timeout: float = 120) -> str:
    request = cri.PullImageRequest(image=cri.ImageSpec(image=image))
    if auth is not None:
        request.auth.CopyFrom(auth)
    return server.images().PullImage(request, timeout=timeout).image_ref


def status(server, image: str, verbose: bool = False) -> cri.ImageStatusResponse:
    return server.images().ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=image), verbose=verbose))


def layout(name: str) -> Path:
    return images_dir() / name


def manifest_digest(name: str) -> str:
    return json.loads((layout(name) / "index.json").read_text())["manifests"][0]["digest"]


def blob(name: str, digest: str) -> bytes:
    return (layout(name) / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def manifest_of(name: str) -> dict:
    return json.loads(blob(name, manifest_digest(name)))


def stored(server) -> tuple[set[str], set[str]]:
    """Blob and snapshot names on disk under the server's root."""
    root = server.base / "root"
    blobs = set(os.listdir(root / "content/blobs/sha256")) if (root / "content/blobs/sha256").exists() else set()
    snaps = set(os.listdir(root / "snapshots")) if (root / "snapshots").exists() else set()
    return blobs, snaps


def snapshot_dir(server, chain_id: str) -> Path:
    return server.base / "root" / "snapshots" / chain_id.split(":", 1)[1]


def test_pull_by_tag_through_a_mirror(image_server):
    image_id = pull(image_server, "busybox")
    config_digest = manifest_of("busybox")["config"]["digest"]
    assert image_id == config_digest  # the image ID is the config digest, as containerd's
    image = status(image_server, "busybox").image
    assert image.id == image_id
    assert list(image.repo_tags) == ["docker.io/library/busybox:latest"]
    assert list(image.repo_digests) == [f"docker.io/library/busybox@{manifest_digest('busybox')}"]
    assert image.size > 500_000
    assert not image.pinned
    # the same image by id and by the other spellings
    assert status(image_server, image_id).image.id == image_id
    assert status(image_server, image_id.split(":")[1]).image.id == image_id
    assert status(image_server, "docker.io/library/busybox:latest").image.id == image_id
    listed = image_server.images().ListImages(cri.ListImagesRequest()).images
    assert [i.id for i in listed] == [image_id]
    # the layer is unpacked into its snapshot
    info = json.loads(status(image_server, "busybox", verbose=True).info["info"])
    snap = snapshot_dir(image_server, info["layers"][0]["chain_id"])
    assert (snap / "bin" / "busybox").is_file()
    assert os.readlink(snap / "bin" / "sh") == "busybox"
    assert info["imageSpec"]["config"]["Cmd"] == ["sh"]


def test_sandbox_image_is_pinned_and_reports_its_uid(image_server):
    pull(image_server, "registry.k8s.io/pause:3.10")
    image = status(image_server, "registry.k8s.io/pause:3.10").image
    assert image.pinned
    assert image.uid.value == 65535 and image.username == ""


def test_pull_by_digest(image_server):
    digest = manifest_digest("busybox")
    image_id = pull(image_server, f"docker.io/library/busybox@{digest}")
    image = status(image_server, f"busybox@{digest}").image
    assert image.id == image_id
    assert list(image.repo_digests) == [f"docker.io/library/busybox@{digest}"]
    assert list(image.repo_tags) == []


def test_absent_image_status_is_empty_and_bad_references_are_invalid(image_server):
    response = status(image_server, "docker.io/library/nothing:here")
    assert not response.HasField("image")
    # all refused before any lookup: no request leaves the machine
    for bad in ("library/UPPERcase", "busybox:", "a b", "busybox@sha256:1234", "busybox::x"):
        with pytest.raises(grpc.RpcError) as err:
            pull(image_server, bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    with pytest.raises(grpc.RpcError) as err:
        pull(image_server, "docker.io/library/nothing:here")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "127.0.0.1:5000" in err.value.details()


def test_mirrors_are_tried_in_order(server_factory, local_registry):
    dead = f"http://127.0.0.1:{free_port()}"
    server = server_factory(
        f'[registry.mirrors."docker.io"]\nendpoints = ["{dead}", "http://{local_registry}"]\nupstream = false\n'
    )
    assert pull(server, "busybox") == manifest_of("busybox")["config"]["digest"]


def test_multi_platform_index_selects_the_host_platform(image_server, local_registry):
    pull(image_server, f"{local_registry}/test/multiarch:latest")
    info = json.loads(status(image_server, f"{local_registry}/test/multiarch", verbose=True).info["info"])
    assert info["imageSpec"]["architecture"] == "amd64"
    arch_layer = snapshot_dir(image_server, info["layers"][-1]["chain_id"]) / "arch"
    assert arch_layer.read_text().strip() == "amd64"
    # the repo digest is the index's, so the same name pulls the same thing everywhere
    index_digest = manifest_digest("multiarch")
    assert status(image_server, f"{local_registry}/test/multiarch").image.repo_digests[0].endswith(index_digest)


@pytest.mark.parametrize("name", ["busybox-zstd", "busybox-docker"])
def test_zstd_and_docker_schema2_images(image_server, local_registry, name):
    image_id = pull(image_server, f"{local_registry}/test/{name}:latest")
    info = json.loads(status(image_server, image_id, verbose=True).info["info"])
    assert (snapshot_dir(image_server, info["layers"][0]["chain_id"]) / "bin" / "busybox").is_file()


def test_whiteouts_and_hard_links_land_in_snapshots(image_server, local_registry):
    image_id = pull(image_server, f"{local_registry}/test/layers:latest")
    layers = json.loads(status(image_server, image_id, verbose=True).info["info"])["layers"]
    assert [layer["media_type"].rsplit(".", 1)[-1] for layer in layers] == ["tar+gzip", "tar", "tar+gzip"]
    first, second = snapshot_dir(image_server, layers[1]["chain_id"]), snapshot_dir(image_server, layers[2]["chain_id"])
    a, b = os.lstat(first / "links/a.txt"), os.lstat(first / "links/b.txt")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert os.readlink(first / "links/s") == "a.txt"
    gone = os.lstat(second / "data/gone.txt")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert not (second / "data/.wh.gone.txt").exists()
    assert os.getxattr(second / "opq", "trusted.overlay.opaque") == b"y"
    assert not (second / "opq/.wh..wh..opq").exists()
    assert (second / "opq/new.txt").exists()


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _publish(registry: FakeRegistry, repo: str, layer_tar: bytes, diff_id: str | None = None) -> str:
    """Serve a one-layer image made of `layer_tar` (gzip) from the fake registry."""
    layer = gzip.compress(layer_tar, mtime=0)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id or _sha(layer_tar)]}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _sha(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _sha(layer), "size": len(layer)}],
        }
    ).encode()
    registry.extra_blobs[_sha(config)] = config
    registry.extra_blobs[_sha(layer)] = layer
    registry.extra_manifests[(repo, "latest")] = ("application/vnd.oci.image.manifest.v1+json", manifest)
    return _sha(layer)


def test_layer_escaping_its_snapshot_is_rejected_and_nothing_stored(image_server, tmp_path):
    with FakeRegistry({}) as registry:
        _publish(registry, "test/evil", _tar([("ok.txt", b"fine"), ("../../evil.txt", b"escaped")]))
        before = stored(image_server)
        with pytest.raises(grpc.RpcError) as err:
            pull(image_server, f"127.0.0.1:{registry.port}/test/evil:latest")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "evil.txt" in err.value.details()
    assert stored(image_server) == before
    root = image_server.base / "root"
    assert not (root / "evil.txt").exists() and not (root.parent / "evil.txt").exists()
    assert not list((root / "content/ingest").iterdir())


def test_digest_mismatch_is_rejected_with_nothing_stored(image_server):
    with FakeRegistry({}) as registry:
        layer_tar = _tar([("f.txt", b"x" * 10000)])
        layer_digest = _publish(registry, "test/corrupt", layer_tar)
        # same tar, other gzip header: unpacks fine, but is not the promised blob
        registry.corrupt[layer_digest] = gzip.compress(layer_tar, mtime=12345)
        with pytest.raises(grpc.RpcError) as err:
            pull(image_server, f"127.0.0.1:{registry.port}/test/corrupt:latest")
        assert f"blob {layer_digest}: got sha256:" in err.value.details()
        assert stored(image_server) == (set(), set())
        # flipped bytes: caught while unpacking, the layer named
        good = registry.extra_blobs[layer_digest]
        registry.corrupt[layer_digest] = good[:-1] + bytes([good[-1] ^ 0xFF])
        with pytest.raises(grpc.RpcError) as err:
            pull(image_server, f"127.0.0.1:{registry.port}/test/corrupt:latest")
        assert layer_digest in err.value.details()
        assert stored(image_server) == (set(), set())
        # a diff id that does not match the uncompressed layer is refused too
        _publish(registry, "test/baddiff", _tar([("g.txt", b"y")]), diff_id=_sha(b"something else"))
        with pytest.raises(grpc.RpcError) as err:
            pull(image_server, f"127.0.0.1:{registry.port}/test/baddiff:latest")
        assert "diff" in err.value.details() or "uncompressed" in err.value.details()
        assert stored(image_server) == (set(), set())
    assert not status(image_server, f"127.0.0.1:{registry.port}/test/corrupt:latest").HasField("image")


def test_concurrent_pulls_of_one_image_download_each_layer_once(image_server):
    layer_digest = manifest_of("busybox")["layers"][0]["digest"]
    with FakeRegistry({"library/busybox": layout("busybox")}) as registry:
        registry.held.add(layer_digest)
        name = f"127.0.0.1:{registry.port}/library/busybox:latest"
        results: list[object] = []

        def one() -> None:
            try:
                results.append(pull(image_server, name))
            except grpc.RpcError as exc:
                results.append(exc)

        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
        config = manifest_of("busybox")["config"]["digest"]
        # every pull has resolved the image while the one layer download is held open
        wait_for(lambda: registry.count("/manifests/latest") >= 5 and registry.count(f"/blobs/{layer_digest}") >= 1,
                 what="five pulls to resolve the image")
        registry.release.set()
        for t in threads:
            t.join(60)
        assert results == [config] * 5
        assert registry.count(f"GET /v2/library/busybox/blobs/{layer_digest}") == 1


def test_remove_then_pull_again(image_server):
    image_id = pull(image_server, "busybox")
    image_server.images().RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image="busybox")))
    assert not status(image_server, "busybox").HasField("image")
    assert stored(image_server) == (set(), set())
    # removing what is not there succeeds, by name and by id
    image_server.images().RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image="busybox")))
    image_server.images().RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image_id)))
    assert pull(image_server, "busybox") == image_id
    assert status(image_server, "busybox").image.id == image_id


def test_remove_keeps_what_another_image_shares(image_server, local_registry):
    pull(image_server, "busybox")
    pull(image_server, f"{local_registry}/test/layers:latest")
    image_server.images().RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=f"{local_registry}/test/layers")))
    info = json.loads(status(image_server, "busybox", verbose=True).info["info"])
    assert (snapshot_dir(image_server, info["layers"][0]["chain_id"]) / "bin/busybox").exists()
    assert len(stored(image_server)[1]) == 1


def test_list_images_filter_and_fs_info(image_server):
    busybox = pull(image_server, "busybox")
    pull(image_server, "registry.k8s.io/pause:3.10")
    only = image_server.images().ListImages(
        cri.ListImagesRequest(filter=cri.ImageFilter(image=cri.ImageSpec(image="busybox")))
    ).images
    assert [i.id for i in only] == [busybox]
    fs = image_server.images().ImageFsInfo(cri.ImageFsInfoRequest()).image_filesystems[0]
    assert fs.used_bytes.value > 1_000_000 and fs.inodes_used.value > 100
    assert os.path.ismount(fs.fs_id.mountpoint)


def test_pull_with_basic_auth(image_server, tmp_path):
    port = free_port()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(
        subprocess.run(["htpasswd", "-Bbn", "tester", "s3cret"], capture_output=True, text=True, check=True).stdout
    )
    registry = [str(REPO_ROOT / "hack/registry.sh"), "--port", str(port), "--dir", str(tmp_path / "reg")]
    subprocess.run(registry + ["start", "--htpasswd", str(htpasswd)], check=True, capture_output=True)
    try:
        subprocess.run(
            [sys.executable, str(REPO_ROOT / "hack/push_images.py"), "--registry", f"127.0.0.1:{port}",
             "--images", str(images_dir() / "images.json"), "--user", "tester", "--password", "s3cret", "pause"],
            check=True, capture_output=True,
        )
        name = f"127.0.0.1:{port}/pause:3.10"
        with pytest.raises(grpc.RpcError) as err:
            pull(image_server, name)
        assert err.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        assert f"127.0.0.1:{port}" in err.value.details()
        with pytest.raises(grpc.RpcError):
            pull(image_server, name, cri.AuthConfig(username="tester", password="wrong"))
        image_id = pull(image_server, name, cri.AuthConfig(username="tester", password="s3cret"))
        assert image_id == manifest_of("pause")["config"]["digest"]
        import base64

        pull(image_server, name, cri.AuthConfig(auth=base64.b64encode(b"tester:s3cret").decode()))
    finally:
        subprocess.run(registry + ["stop"], check=False, capture_output=True)


def _oci_archive(name: str, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tar:
        for entry in sorted(os.listdir(layout(name))):
            tar.add(layout(name) / entry, arcname=entry)
    return dest


def _docker_save_archive(name: str, dest: Path, tag: str) -> Path:
    manifest = manifest_of(name)
    config = blob(name, manifest["config"]["digest"])
    layers = [gzip.decompress(blob(name, layer["digest"])) for layer in manifest["layers"]]
    with tarfile.open(dest, "w") as tar:
        def add(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("config.json", config)
        for i, data in enumerate(layers):
            add(f"layer{i}/layer.tar", data)
        add("manifest.json", json.dumps(
            [{"Config": "config.json", "RepoTags": [tag], "Layers": [f"layer{i}/layer.tar" for i in range(len(layers))]}]
        ).encode())
    return dest


def _cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cri_py.cli", *args, "--config", str(server.config_path)],
                          capture_output=True, text=True, timeout=120)


def test_import_oci_layout_into_a_running_daemon(image_server, tmp_path):
    archive = _oci_archive("pause", tmp_path / "pause.tar")
    result = _cli(image_server, "images", "import", str(archive), "--name", "registry.k8s.io/pause:3.10")
    assert result.returncode == 0, result.stderr
    image = status(image_server, "registry.k8s.io/pause:3.10").image
    assert image.id == manifest_of("pause")["config"]["digest"]
    assert image.pinned
    info = json.loads(status(image_server, image.id, verbose=True).info["info"])
    assert (snapshot_dir(image_server, info["layers"][0]["chain_id"]) / "pause").is_file()
    listing = _cli(image_server, "images", "ls")
    assert "registry.k8s.io/pause:3.10" in listing.stdout


def test_import_docker_save_offline_then_serve(server_factory, tmp_path):
    server = server_factory(start=False)
    server.write_config()
    archive = _docker_save_archive("busybox", tmp_path / "busybox.tar", "example.com/saved/busybox:v1")
    result = _cli(server, "images", "import", str(archive))
    assert result.returncode == 0, result.stderr
    assert "example.com/saved/busybox:v1" in _cli(server, "images", "ls").stdout
    server.start()
    image = status(server, "example.com/saved/busybox:v1").image
    assert image.id == manifest_of("busybox")["config"]["digest"]
    info = json.loads(status(server, image.id, verbose=True).info["info"])
    assert (snapshot_dir(server, info["layers"][0]["chain_id"]) / "bin/busybox").is_file()


def test_import_of_a_non_archive_fails_cleanly(image_server, tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all")
    result = _cli(image_server, "images", "import", str(junk))
    assert result.returncode == 1
    assert "junk.tar" in result.stderr


def test_cancelled_pull_leaves_nothing_behind(image_server):
    layer_digest = manifest_of("busybox")["layers"][0]["digest"]
    with FakeRegistry({"library/busybox": layout("busybox")}) as registry:
        registry.held.add(layer_digest)
        with pytest.raises(grpc.RpcError) as err:
            pull(image_server, f"127.0.0.1:{registry.port}/library/busybox:latest", timeout=2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        registry.release.set()  # the download resumes, sees the cancel, and throws its work away
        root = image_server.base / "root"
        wait_for(lambda: stored(image_server) == (set(), set()) and not list((root / "content/ingest").iterdir()),
                 what="the cancelled pull's blobs, temp snapshot and ingest file to go")
    assert not status(image_server, f"127.0.0.1:{registry.port}/library/busybox:latest").HasField("image")
