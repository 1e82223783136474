"""Image references, parsed and normalized the way Docker and containerd do.

The kubelet sends whatever the pod spec says (`busybox`, `nginx:1.25`,
`registry.k8s.io/pause:3.9@sha256:...`); images must be stored and found again
under the same normalized names containerd would use, or `crictl images`, image
GC and `imagePullPolicy: IfNotPresent` disagree with every other runtime.

This follows docker/distribution's `reference` grammar and its
`ParseNormalizedNamed` + `TagNameOnly` behaviour, with one deliberate
difference: a first component that is taken as a domain (it has a `.` or `:`,
is `localhost`, or has uppercase letters) must then be a valid domain. The Go
code silently re-reads such an input as a path with no domain (`a_b.com/x`),
which can never be pulled; here it is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cri_py.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
_LEGACY_DEFAULT_DOMAIN = "index.docker.io"
_OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

# The pieces of the distribution grammar. Go's \w is ASCII-only, hence re.ASCII.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN_RE = re.compile(rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?", re.ASCII)
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*", re.ASCII)
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_ALGORITHM_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*", re.ASCII)
_IMAGE_ID_RE = re.compile(r"(?:sha256:)?([a-f0-9]{64})", re.ASCII)

# The algorithms go-digest can verify, and the hex length each one needs.
_DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}


@dataclass(frozen=True)
class Reference:
    """A normalized image reference; build it with `parse_reference`.

    `tag` and `digest` may both be set (`name:tag@sha256:...`): the full form
    keeps both, `docker_ref` gives the form images are stored under.
    """

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The repository name with its domain, e.g. `docker.io/library/busybox`."""
        return f"{self.domain}/{self.path}"

    @property
    def repository_for_registry(self) -> str:
        """The repository in registry URLs (`/v2/<repository>/manifests/...`)."""
        return self.path

    @property
    def docker_ref(self) -> str:
        """The form containerd names images by (`ParseDockerRef`).

        A digest pins the content, so when there is one the tag is dropped:
        `name:tag@digest` and `name@digest` are the same image.
        """
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag or DEFAULT_TAG}"

    @property
    def object(self) -> str:
        """What to ask the registry's manifests endpoint for: digest, else tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        return self.name + _suffix(self.tag, self.digest)

    def familiar(self) -> str:
        """The short form users type and `docker images` shows (`busybox:latest`)."""
        name = self.name
        if self.domain == DEFAULT_DOMAIN:
            name = self.path
            rest = name.removeprefix(_OFFICIAL_REPO_PREFIX)
            if rest != name and "/" not in rest:
                name = rest
        return name + _suffix(self.tag, self.digest)


def _suffix(tag: str | None, digest: str | None) -> str:
    return (f":{tag}" if tag is not None else "") + (f"@{digest}" if digest is not None else "")


def is_image_id(s: str) -> str | None:
    """The normalized `sha256:<hex>` if `s` names an image by id, else None.

    CRI clients pass ids where references are expected (`crictl rmi <id>`);
    callers check this first because a bare id would otherwise parse as the
    repository `library/sha256` or be rejected as a reference.
    """
    match = _IMAGE_ID_RE.fullmatch(s)
    return f"sha256:{match.group(1)}" if match else None


def parse_reference(s: str) -> Reference:
    """Parse and normalize `s`; a name with neither tag nor digest gets `:latest`.

    Raises InvalidArgument naming `s` when it is not a valid reference.
    """
    if not s:
        raise InvalidArgument("invalid image reference: reference is empty")
    if re.fullmatch(r"[a-f0-9]{64}", s):
        raise InvalidArgument(
            f"invalid image reference {s!r}: a 64-character hexadecimal string is an image id, "
            "not a repository name"
        )
    rest, digest = _split_digest(s)
    rest, tag = _split_tag(s, rest)
    domain, path = _split_domain(rest)
    _check_domain(s, domain)
    _check_path(s, path)
    if len(domain) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidArgument(
            f"invalid image reference {s!r}: repository name is longer than "
            f"{NAME_TOTAL_LENGTH_MAX} characters"
        )
    if tag is not None:
        _check_tag(s, tag)
    if digest is not None:
        _check_digest(s, digest)
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain=domain, path=path, tag=tag, digest=digest)


def _split_digest(s: str) -> tuple[str, str | None]:
    """Cut at the first `@`: neither names nor tags may contain one."""
    name, sep, digest = s.partition("@")
    return (name, digest) if sep else (s, None)


def _split_tag(s: str, rest: str) -> tuple[str, str | None]:
    """Cut the tag at the last `:` after the last `/`, so `host:5000/x` keeps its port."""
    colon = rest.rfind(":")
    if colon == -1 or "/" in rest[colon:]:
        return rest, None
    tag = rest[colon + 1 :]
    if not tag:
        raise InvalidArgument(f"invalid image reference {s!r}: tag is empty")
    return rest[:colon], tag


def _split_domain(name: str) -> tuple[str, str]:
    """Decide whether the first component is a registry host, as `splitDockerDomain` does."""
    first, sep, remainder = name.partition("/")
    if not sep:
        return DEFAULT_DOMAIN, _OFFICIAL_REPO_PREFIX + name
    if first == _LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    elif first == "localhost" or "." in first or ":" in first or first.lower() != first:
        domain = first
    else:
        domain, remainder = DEFAULT_DOMAIN, name
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = _OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def _check_domain(s: str, domain: str) -> None:
    if not _DOMAIN_RE.fullmatch(domain):
        raise InvalidArgument(f"invalid image reference {s!r}: invalid registry domain {domain!r}")


def _check_path(s: str, path: str) -> None:
    if path.lower() != path:
        raise InvalidArgument(
            f"invalid image reference {s!r}: repository name {path!r} must be lowercase"
        )
    if not _PATH_RE.fullmatch(path):
        raise InvalidArgument(f"invalid image reference {s!r}: invalid repository name {path!r}")


def _check_tag(s: str, tag: str) -> None:
    if not _TAG_RE.fullmatch(tag):
        raise InvalidArgument(f"invalid image reference {s!r}: invalid tag {tag!r}")


def _check_digest(s: str, digest: str) -> None:
    """Accept only digests go-digest could verify: known algorithm, exact lowercase hex."""
    algorithm, sep, encoded = digest.partition(":")
    if not sep or not _DIGEST_ALGORITHM_RE.fullmatch(algorithm):
        raise InvalidArgument(f"invalid image reference {s!r}: invalid digest {digest!r}")
    length = _DIGEST_HEX_LENGTHS.get(algorithm)
    if length is None:
        raise InvalidArgument(
            f"invalid image reference {s!r}: unsupported digest algorithm {algorithm!r}"
        )
    if len(encoded) != length or not re.fullmatch(r"[a-f0-9]+", encoded):
        raise InvalidArgument(
            f"invalid image reference {s!r}: digest {digest!r} must have {length} "
            "lowercase hexadecimal characters"
        )
