"""Reference parsing must name images exactly as Docker and containerd do."""

from __future__ import annotations

import pytest

from cri_py.errors import InvalidArgument
from cri_py.image.reference import Reference, is_image_id, parse_reference

HEX = "a" * 64
D = f"sha256:{HEX}"
HEX2 = "0123456789abcdef" * 4


LIB = "docker.io/library"


@pytest.mark.parametrize(
    ("given", "full", "docker_ref"),
    [
        # docker_ref None: the same as the full form.
        ("busybox", f"{LIB}/busybox:latest", None),
        ("busybox:1.36", f"{LIB}/busybox:1.36", None),
        ("user/img", "docker.io/user/img:latest", None),
        ("user/img:v1", "docker.io/user/img:v1", None),
        ("docker.io/busybox", f"{LIB}/busybox:latest", None),
        ("index.docker.io/busybox", f"{LIB}/busybox:latest", None),
        ("index.docker.io/user/img:t", "docker.io/user/img:t", None),
        (f"{LIB}/busybox:latest", f"{LIB}/busybox:latest", None),
        ("localhost/x", "localhost/x:latest", None),
        ("localhost:5000/x", "localhost:5000/x:latest", None),
        ("localhost:5000/x:v2", "localhost:5000/x:v2", None),
        ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000/a/b/c:t", None),
        ("[::1]:5000/x", "[::1]:5000/x:latest", None),
        ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9", None),
        ("quay.io/a/b", "quay.io/a/b:latest", None),
        ("myhost:5000/x", "myhost:5000/x:latest", None),
        ("Registry/x", "Registry/x:latest", None),  # an uppercase first part is a domain
        ("ghcr.io/o/r/deep/er", "ghcr.io/o/r/deep/er:latest", None),
        ("a-b.c/d__e/f.g-h", "a-b.c/d__e/f.g-h:latest", None),
        ("x/a---b", "docker.io/x/a---b:latest", None),
        ("busybox:Latest_1.0-rc", f"{LIB}/busybox:Latest_1.0-rc", None),
        ("busybox:" + "t" * 128, f"{LIB}/busybox:" + "t" * 128, None),
        ("localhost:5000", f"{LIB}/localhost:5000", None),
        (f"busybox@{D}", f"{LIB}/busybox@{D}", None),
        (f"busybox:1.36@{D}", f"{LIB}/busybox:1.36@{D}", f"{LIB}/busybox@{D}"),
        (f"localhost:5000/x:t@{D}", f"localhost:5000/x:t@{D}", f"localhost:5000/x@{D}"),
        (f"x@sha512:{'b' * 128}", f"{LIB}/x@sha512:{'b' * 128}", None),
        (f"x@sha384:{'c' * 96}", f"{LIB}/x@sha384:{'c' * 96}", None),
        # Docker's quirk: "sha256:<hex>" alone is repository library/sha256 with a hex tag.
        (D, f"{LIB}/sha256:{HEX}", None),
    ],
)
def test_valid_references(given: str, full: str, docker_ref: str | None) -> None:
    ref = parse_reference(given)
    assert str(ref) == full
    assert ref.docker_ref == (docker_ref or full)
    # Normalizing is idempotent.
    assert str(parse_reference(full)) == full


@pytest.mark.parametrize(
    ("given", "domain", "path", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("user/img:v1", "docker.io", "user/img", "v1", None),
        ("localhost:5000/a/b", "localhost:5000", "a/b", "latest", None),
        (f"busybox@{D}", "docker.io", "library/busybox", None, D),
        (f"q.io/x:t@{D}", "q.io", "x", "t", D),
    ],
)
def test_fields(given: str, domain: str, path: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(given)
    assert ref == Reference(domain, path, tag, digest)
    assert ref.name == f"{domain}/{path}"
    assert ref.repository_for_registry == path
    assert ref.object == (digest or tag)


@pytest.mark.parametrize(
    ("given", "familiar"),
    [
        ("busybox", "busybox:latest"),
        ("docker.io/library/busybox:1", "busybox:1"),
        ("user/img", "user/img:latest"),
        ("docker.io/library/a/b", "library/a/b:latest"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
        (f"busybox:1@{D}", f"busybox:1@{D}"),
        (f"busybox@{D}", f"busybox@{D}"),
    ],
)
def test_familiar(given: str, familiar: str) -> None:
    assert parse_reference(given).familiar() == familiar


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("", "empty"),
        (HEX, "image id"),
        (HEX2, "image id"),
        ("Busybox", "lowercase"),
        ("user/Img", "lowercase"),
        ("docker.io/User/img", "lowercase"),
        ("localhost:5000/Img", "lowercase"),
        ("busy box", "invalid"),
        (" busybox", "invalid"),
        ("busybox ", "invalid"),
        ("busybox:", "tag is empty"),
        ("busybox:-bad", "invalid tag"),
        ("busybox:.bad", "invalid tag"),
        ("busybox:bad!", "invalid tag"),
        ("busybox:" + "t" * 129, "invalid tag"),
        ("busybox:a:b", "invalid"),
        ("busybox@", "invalid digest"),
        ("busybox@sha256", "invalid digest"),
        ("busybox@sha256:", "lowercase hexadecimal"),
        ("busybox@sha256:abc", "lowercase hexadecimal"),
        (f"busybox@sha256:{'A' * 64}", "lowercase hexadecimal"),
        (f"busybox@sha256:{'a' * 65}", "lowercase hexadecimal"),
        (f"busybox@sha256:{'g' * 64}", "lowercase hexadecimal"),
        (f"busybox@SHA256:{HEX}", "invalid digest"),
        (f"busybox@md5:{'a' * 32}", "unsupported digest algorithm"),
        (f"busybox@{D}@{D}", "lowercase hexadecimal"),
        ("/busybox", "invalid repository"),
        ("busybox/", "invalid repository"),
        ("a//b", "invalid repository"),
        ("a/b/", "invalid repository"),
        ("-a/b", "invalid repository"),
        ("a/b-", "invalid repository"),
        ("a/_b", "invalid repository"),
        ("a/b___c", "invalid repository"),
        ("a/b..c", "invalid repository"),
        (":tag", "invalid repository"),
        (f"@{D}", "invalid repository"),
        ("localhost:5000/", "invalid repository"),
        ("-bad.io/x", "invalid registry domain"),
        ("bad-.io/x", "invalid registry domain"),
        ("a_b.com/x", "invalid registry domain"),
        ("host:port/x", "invalid registry domain"),
        ("host:5000:1/x", "invalid registry domain"),
        ("a/" + "b" * 255, "longer than 255"),
        ("x.io/" + "b" * 251, "longer than 255"),
        ("busybox\n", "invalid"),
        ("bu\u00dfybox", "invalid"),
    ],
)
def test_invalid_references(given: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_reference(given)
    assert message in str(info.value)
    if given:
        assert repr(given) in str(info.value) or message == "image id"


def test_name_length_limit_counts_the_normalized_name() -> None:
    # docker.io/ (10) + path: 245 characters of path is exactly 255 in all.
    parse_reference("docker.io/a/" + "b" * 243)
    with pytest.raises(InvalidArgument):
        parse_reference("docker.io/a/" + "b" * 244)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (HEX, D),
        (D, D),
        (HEX2, f"sha256:{HEX2}"),
        ("A" * 64, None),
        ("a" * 63, None),
        ("a" * 65, None),
        (f"sha512:{HEX}", None),
        (f"sha256:{HEX}x", None),
        ("busybox", None),
        ("", None),
    ],
)
def test_is_image_id(given: str, expected: str | None) -> None:
    assert is_image_id(given) == expected


def test_reference_is_frozen_and_hashable() -> None:
    ref = parse_reference("busybox")
    assert {ref: 1}[parse_reference("docker.io/library/busybox:latest")] == 1
    with pytest.raises(AttributeError):
        ref.tag = "x"  # type: ignore[misc]
