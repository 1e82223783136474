"""A synchronous, thread-safe client for the OCI distribution API (image pulls).

The image service calls it from worker threads: one thread resolves a manifest,
then several threads stream the layers of the same pull through one shared
`RegistryClient` (httpx's connection pool and this module's token cache are both
thread-safe). Nothing here knows about the CRI beyond the `Credentials` a
`PullImage` request carries, and nothing buffers a blob: `open_blob` hands the
caller a stream so a layer goes from the socket to the content store in chunks.

What it covers, and why each piece is here:

- Endpoints: the mirrors configured for a registry host are tried in order, then
  the host itself, the way containerd's CRI plugin does. A mirror that fails in any
  way (404, unreachable, 5xx after retries, refused auth, bad content) only makes
  us try the next endpoint; the error raised when all fail names every endpoint
  and what it answered, because "pull failed" with no detail costs operators hours.
- Auth: Docker's token protocol (Bearer challenges, OAuth2 refresh tokens), Basic
  challenges, and pre-issued registry tokens; tokens are cached per endpoint and
  scope until they expire, so the layers of one pull share one token fetch.
- Retries: connection failures, 5xx and 429 are retried with exponential backoff
  (honouring Retry-After) before a response is handed out; a stream that breaks
  midway is reported, not retried, since only the caller knows how far it got.
- Integrity: a manifest fetched by digest must hash to that digest; one fetched by
  tag must match the registry's Docker-Content-Digest header when it sends one.
  Blobs are verified by the caller while it writes them.

Every error message names the endpoint (its base URL) and the HTTP status or the
transport failure, and none contains a secret.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import functools
import hashlib
import ipaddress
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType

import grpc
import httpx

from cri_py import __version__, errors
from cri_py.config import RegistryConfig
from cri_py.image.reference import Reference, parse_reference

log = logging.getLogger(__name__)

MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_MEDIA_TYPES = (
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST,
)
_ACCEPT_MANIFESTS = ", ".join(MANIFEST_MEDIA_TYPES)

# Content types some registries and proxies put on manifests; they say nothing.
_GENERIC_CONTENT_TYPES = frozenset(
    {"", "application/json", "text/plain", "application/octet-stream", "binary/octet-stream"}
)

DOCKER_HUB = "docker.io"
DOCKER_HUB_UPSTREAM = "https://registry-1.docker.io"
# Names people give Docker Hub in credentials (`docker login` writes the first).
_DOCKER_HUB_ALIASES = frozenset(
    {"index.docker.io", "registry-1.docker.io", "docker.io", "registry.hub.docker.com"}
)

# A manifest is small JSON; refusing huge bodies keeps a broken or hostile
# registry from filling the daemon's memory (containerd applies the same bound).
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
# How much of an error response is read to find the registry's error code.
_MAX_ERROR_BODY = 64 * 1024
MAX_BACKOFF = 5.0
DEFAULT_TOKEN_TTL = 60.0
OAUTH_CLIENT_ID = "cri-py"

_HASHES = {"sha256", "sha384", "sha512"}
_RETRY_STATUSES = frozenset({429}) | frozenset(range(500, 600)) - {501, 505}


# --- errors -------------------------------------------------------------------------


class RegistryError(errors.Unavailable):
    """A registry could not be reached or answered with an error; a retry may help."""


class DigestMismatchError(RegistryError):
    """A registry served content that does not hash to the digest it was asked for."""


class ImageNotFound(errors.NotFound):
    """The manifest (or blob) does not exist on the registry: a 404."""


class AuthenticationError(errors.CriError):
    """The registry refused our credentials, or wants credentials we do not have.

    PERMISSION_DENIED rather than UNAVAILABLE: retrying with the same credentials
    will not help, and the kubelet shows the code to the user.
    """

    code = grpc.StatusCode.PERMISSION_DENIED


_ENDPOINT_ERRORS = (RegistryError, ImageNotFound, AuthenticationError)


# --- credentials --------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """The CRI `AuthConfig` of a pull, as plain data; secrets stay out of repr().

    `auth` (base64 "user:pass", docker's config.json form) is decoded into
    `username` and `password` when those are not given explicitly.
    """

    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    server_address: str = ""
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.auth and not self.username and not self.password:
            username, password = _decode_auth(self.auth)
            object.__setattr__(self, "username", username)
            object.__setattr__(self, "password", password)

    @classmethod
    def from_fields(
        cls,
        username: str | None = "",
        password: str | None = "",
        auth: str | None = "",
        server_address: str | None = "",
        identity_token: str | None = "",
        registry_token: str | None = "",
    ) -> Credentials:
        """Build from AuthConfig fields (protobuf gives "" for unset, callers may give None)."""
        return cls(
            username=username or "",
            password=password or "",
            auth=auth or "",
            server_address=server_address or "",
            identity_token=identity_token or "",
            registry_token=registry_token or "",
        )

    @property
    def is_empty(self) -> bool:
        """True when the request carried no usable credential at all."""
        return not (self.username or self.password or self.identity_token or self.registry_token)

    @property
    def has_basic(self) -> bool:
        """True when there is a username/password pair to offer."""
        return bool(self.username or self.password)

    def applies_to(self, endpoint: Endpoint) -> bool:
        """Whether these credentials may be sent to `endpoint`.

        The kubelet picks an AuthConfig for the image's registry, so the upstream
        endpoint always gets it. A mirror is another party: it gets the credentials
        only when `server_address` is empty (the caller did not say whom they are
        for, as with `crictl pull --creds`; containerd sends them to mirrors then
        too) or names that mirror's own host. So a docker.io login is never leaked
        to a mirror that was configured for docker.io images.
        """
        if not endpoint.is_mirror or not self.server_address:
            return True
        wanted = _normalize_host(self.server_address)
        return wanted == _normalize_host(endpoint.netloc)


def _decode_auth(auth: str) -> tuple[str, str]:
    """Split docker's base64 "user:pass"; the error never echoes the secret."""
    try:
        decoded = base64.b64decode(auth.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise errors.InvalidArgument(
            "invalid auth in AuthConfig: not base64 of user:password"
        ) from None
    username, sep, password = decoded.partition(":")
    if not sep:
        raise errors.InvalidArgument("invalid auth in AuthConfig: decoded value has no ':'")
    return username, password


def _normalize_host(address: str) -> str:
    """`https://index.docker.io/v1/` and `docker.io` both become `docker.io`; others host[:port]."""
    address = address.strip().lower()
    if "://" in address:
        address = address.split("://", 1)[1]
    host = address.split("/", 1)[0]
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


# --- endpoints ----------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One place to pull a registry host's images from: a mirror or the host itself.

    `url` is the base URL as configured, without a trailing slash; it may carry a
    path prefix (`http://mirror:5000/prefix`), and API calls go to `<url>/v2/...`
    (or `<url>/...` when the configured path already ends in `/v2`). `host` is the
    registry whose images it serves (the reference's domain, e.g. `docker.io`).
    """

    url: str
    host: str
    is_mirror: bool = False

    @property
    def api_root(self) -> str:
        """The URL `/v2/` requests hang off."""
        return self.url if self.url.endswith("/v2") else self.url + "/v2"

    @property
    def netloc(self) -> str:
        """host[:port] of the endpoint itself (not of the registry it serves)."""
        return httpx.URL(self.url).netloc.decode("ascii").lower()

    def url_for(self, repository: str, kind: str, obj: str) -> str:
        """`<api_root>/<repository>/<kind>/<obj>`, e.g. kind = "manifests" or "blobs"."""
        return f"{self.api_root}/{repository}/{kind}/{obj}"


def endpoints_for(host: str, config: RegistryConfig) -> list[Endpoint]:
    """The endpoints to try for `host`, in order: its mirrors as configured, then itself.

    The host itself is https unless listed in `config.insecure` or on loopback
    (as Docker treats 127.0.0.0/8 and localhost: a registry on this node); Docker
    Hub's API lives at registry-1.docker.io, not at docker.io. A mirror's scheme is
    used as written. A mirror with `upstream = false` keeps the host itself off the
    list, for nodes that must never reach the internet.
    """
    scheme = "http" if host in config.insecure or _is_loopback(host) else "https"
    upstream = f"{scheme}://{host}"
    if host == DOCKER_HUB:
        upstream = DOCKER_HUB_UPSTREAM.replace("https", scheme, 1)
    result: list[Endpoint] = []
    mirror = config.mirrors.get(host)
    for raw in mirror.endpoints if mirror else []:
        url = raw.rstrip("/")
        if "://" not in url:
            url = "https://" + url
        if url != upstream and all(e.url != url for e in result):
            result.append(Endpoint(url=url, host=host, is_mirror=True))
    if mirror is None or mirror.upstream:
        result.append(Endpoint(url=upstream, host=host, is_mirror=False))
    return result


def _is_loopback(host: str) -> bool:
    """`localhost[:port]`, `127.x.y.z[:port]` or `[::1][:port]`."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost" or name == "::1":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# --- results ------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """A manifest or index exactly as served, with the digest it was verified against.

    `endpoint` and `repository` say where it came from: the children of an index
    and the blobs of a manifest are fetched from the same place.
    """

    data: bytes = field(repr=False)
    media_type: str
    digest: str
    endpoint: Endpoint
    repository: str


class BlobStream:
    """An open blob download; iterate it once, inside `RegistryClient.open_blob`'s `with`.

    Bytes are yielded as the server sent them (no content-decoding), because the
    digest covers the stored bytes and a storage backend that labels a gzip layer
    `Content-Encoding: gzip` must not get it decompressed under our feet.
    """

    def __init__(self, response: httpx.Response, endpoint: Endpoint, digest: str) -> None:
        self._response = response
        self.endpoint = endpoint
        self.digest = digest
        self.url = str(response.url)
        self.content_length = _content_length(response)

    def iter_chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """Yield the body in chunks of about `size` bytes; a broken stream raises RegistryError."""
        received = 0
        try:
            for chunk in self._response.iter_raw(size):
                received += len(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            raise RegistryError(
                f"{self.endpoint.url}: blob {self.digest}: download broke after "
                f"{received} bytes: {_describe(exc)}"
            ) from exc

    def __iter__(self) -> Iterator[bytes]:
        return self.iter_chunks()


def _content_length(response: httpx.Response) -> int | None:
    """The Content-Length header as an int, None when absent or malformed."""
    value = response.headers.get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# --- auth challenges ----------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: a lower-cased scheme and its parameters."""

    scheme: str
    params: dict[str, str]


_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUOTED_RE = re.compile(r'"((?:[^"\\]|\\.)*)"')
_BARE_VALUE_RE = re.compile(r"[^,\s]*")
_SKIP_RE = re.compile(r"[\s,]*")
_SPACE_RE = re.compile(r"\s*")


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Parse `WWW-Authenticate` header values (RFC 7235) into challenges.

    Handles several challenges in one header, quoted values containing commas and
    escaped quotes, and spaces around `=`, which is what registries in the wild send.
    Parameter names are lower-cased; anything unparseable is skipped, not fatal.
    """
    challenges: list[Challenge] = []
    for text in values:
        current: Challenge | None = None
        pos = 0
        while pos < len(text):
            pos = _skip(_SKIP_RE, text, pos)
            token = _TOKEN_RE.match(text, pos)
            if token is None:
                pos += 1
                continue
            after = _skip(_SPACE_RE, text, token.end())
            if current is not None and text.startswith("=", after):
                value, pos = _parse_value(text, _skip(_SPACE_RE, text, after + 1))
                current.params[token.group().lower()] = value
            else:
                current = Challenge(scheme=token.group().lower(), params={})
                challenges.append(current)
                pos = token.end()
    return challenges


def _skip(pattern: re.Pattern[str], text: str, pos: int) -> int:
    """The end of `pattern` (one that matches the empty string) at `pos`."""
    match = pattern.match(text, pos)
    return match.end() if match else pos


def _parse_value(text: str, pos: int) -> tuple[str, int]:
    """A quoted-string (unescaped) or a bare token starting at `pos`; returns (value, end)."""
    quoted = _QUOTED_RE.match(text, pos)
    if quoted is not None:
        return re.sub(r"\\(.)", r"\1", quoted.group(1)), quoted.end()
    bare = _BARE_VALUE_RE.match(text, pos)
    assert bare is not None  # the pattern matches the empty string
    return bare.group().strip('"'), bare.end()


def _pick_challenge(challenges: list[Challenge]) -> Challenge | None:
    """Prefer Bearer (with a realm) over Basic; ignore schemes we do not speak."""
    for challenge in challenges:
        if challenge.scheme == "bearer" and challenge.params.get("realm"):
            return challenge
    for challenge in challenges:
        if challenge.scheme == "basic":
            return challenge
    return None


@dataclass
class _Token:
    value: str
    expires: float


# --- the client ---------------------------------------------------------------------


class RegistryClient:
    """Fetches manifests and streams blobs from the registries of image references.

    One instance serves any number of threads and pulls; make one per set of
    credentials (the CRI gives credentials per PullImage request), and close it
    when done. `retries` counts retries after the first attempt, so a request is
    tried at most `retries + 1` times. `transport` exists for tests
    (`httpx.MockTransport`); with it, proxy settings from the environment are
    ignored so that no request can leave the mock.
    """

    def __init__(
        self,
        config: RegistryConfig,
        credentials: Credentials | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.2,
        user_agent: str = f"cri-py/{__version__}",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._config = config
        self._credentials = credentials if credentials and not credentials.is_empty else None
        self._retries = max(0, retries)
        self._backoff = max(0.0, backoff)
        self._sleep: Callable[[float], None] = time.sleep  # tests replace it
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout),
            follow_redirects=True,
            headers={"User-Agent": user_agent},
            transport=transport,
            trust_env=transport is None,
            mounts=None if transport is not None else _direct_loopback_mounts(),
        )
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._token_locks: dict[tuple[str, str], threading.Lock] = {}

    # -- lifecycle

    def close(self) -> None:
        """Close pooled connections; open blob streams must be finished first."""
        self._client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- public API

    def endpoints(self, host: str) -> list[Endpoint]:
        """The endpoints tried for `host`, in order (see `endpoints_for`)."""
        return endpoints_for(host, self._config)

    def get_manifest(self, ref: Reference | str) -> Manifest:
        """Fetch the manifest or index `ref` names (by digest when it has one, else by tag).

        Endpoints are tried in order until one serves a verified manifest. When all
        fail the error's class follows the last one, the registry itself (404 →
        ImageNotFound, auth → AuthenticationError, else RegistryError), and its
        message lists every endpoint with what it answered.
        """
        if isinstance(ref, str):
            ref = parse_reference(ref)
        failures: list[errors.CriError] = []
        for endpoint in self.endpoints(ref.domain):
            try:
                return self._fetch_manifest(endpoint, ref.path, ref.object, ref.digest)
            except _ENDPOINT_ERRORS as exc:
                if endpoint.is_mirror:
                    log.warning("mirror failed, trying the next endpoint: %s", exc)
                failures.append(exc)
        raise _combine(str(ref), failures)

    def get_manifest_by_digest(self, endpoint: Endpoint, repository: str, digest: str) -> Manifest:
        """Fetch one manifest by digest from `endpoint` (the children of an index), verified."""
        _check_digest_syntax(digest)
        return self._fetch_manifest(endpoint, repository, digest, digest)

    @contextlib.contextmanager
    def open_blob(self, endpoint: Endpoint, repository: str, digest: str) -> Iterator[BlobStream]:
        """Open a streaming download of a blob; the caller hashes what it reads.

        Redirects (to object storage, usually) are followed; our Authorization
        header is not forwarded to another host (httpx drops it across origins).
        """
        _check_digest_syntax(digest)
        what = f"blob {repository}@{digest}"
        response = self._send(
            endpoint,
            repository,
            endpoint.url_for(repository, "blobs", digest),
            what,
            {"Accept-Encoding": "identity"},
        )
        try:
            _raise_for_status(response, endpoint, what)
            yield BlobStream(response, endpoint, digest)
        finally:
            response.close()

    # -- manifests

    def _fetch_manifest(
        self, endpoint: Endpoint, repository: str, obj: str, expected: str | None
    ) -> Manifest:
        """GET one manifest from one endpoint and verify it; raises one of _ENDPOINT_ERRORS."""
        what = f"manifest {repository}{'@' if expected else ':'}{obj}"
        url = endpoint.url_for(repository, "manifests", obj)
        response = self._send(endpoint, repository, url, what, {"Accept": _ACCEPT_MANIFESTS})
        with contextlib.closing(response):
            _raise_for_status(response, endpoint, what)
            data = _read_limited(response, MAX_MANIFEST_SIZE, endpoint, what)
            header_digest = response.headers.get("docker-content-digest", "").strip()
            content_type = response.headers.get("content-type", "")
        digest = _verify_manifest(data, expected, header_digest, endpoint, what)
        return Manifest(
            data=data,
            media_type=_media_type(content_type, data),
            digest=digest,
            endpoint=endpoint,
            repository=repository,
        )

    # -- requests, auth and retries

    def _send(
        self,
        endpoint: Endpoint,
        repository: str,
        url: str,
        what: str,
        headers: dict[str, str],
    ) -> httpx.Response:
        """GET `url` with auth and retries; returns an open streamed response.

        A 401 runs the challenge flow once (fetching a fresh token or adding Basic
        credentials) and repeats the request; a 401/403 after that is an
        AuthenticationError. Any other status is for the caller to judge.
        """
        auth = self._authorization(endpoint, repository, None, stale=None)
        response = self._send_with_retries(
            endpoint, what, self._builder(endpoint, url, headers, auth)
        )
        if response.status_code == 401:
            challenges = parse_challenges(response.headers.get_list("www-authenticate"))
            first_status = _status_text(response)
            response.close()
            new_auth = self._answer_challenge(
                endpoint, repository, what, _pick_challenge(challenges), auth, first_status
            )
            response = self._send_with_retries(
                endpoint, what, self._builder(endpoint, url, headers, new_auth)
            )
            auth = new_auth
        if response.status_code in (401, 403):
            message = _status_text(response) + _error_detail(response)
            response.close()
            who = "credentials were refused" if auth else "anonymous access was refused"
            raise AuthenticationError(f"{endpoint.url}: {what}: {message}: {who}")
        return response

    def _answer_challenge(
        self,
        endpoint: Endpoint,
        repository: str,
        what: str,
        challenge: Challenge | None,
        sent: str | None,
        status: str,
    ) -> str:
        """The Authorization that answers a 401, or an AuthenticationError saying why none does."""
        creds = self._credentials_for(endpoint)
        prefix = f"{endpoint.url}: {what}: {status}"
        if creds is not None and creds.registry_token:
            raise AuthenticationError(f"{prefix}: the registry token was refused")
        if challenge is None:
            raise AuthenticationError(f"{prefix} without a Basic or Bearer challenge we can answer")
        with self._lock:
            self._challenges[endpoint.url] = challenge
        auth = self._authorization(endpoint, repository, challenge, stale=sent)
        if auth is None:
            raise AuthenticationError(f"authentication required by {prefix}")
        if auth == sent:  # the same Basic credentials again would be refused again
            raise AuthenticationError(f"{prefix}: credentials were refused")
        return auth

    def _credentials_for(self, endpoint: Endpoint) -> Credentials | None:
        """Our credentials if they may go to this endpoint (see Credentials.applies_to)."""
        creds = self._credentials
        return creds if creds is not None and creds.applies_to(endpoint) else None

    def _authorization(
        self,
        endpoint: Endpoint,
        repository: str,
        challenge: Challenge | None,
        stale: str | None,
    ) -> str | None:
        """The Authorization header for a request, or None to go anonymous.

        Without a fresh `challenge`, the one this endpoint sent last is reused, so
        later requests (other layers, other repositories) authenticate up front
        instead of paying a 401 round trip each. `stale` is a header the registry
        just refused: a cached token equal to it is fetched anew.
        """
        creds = self._credentials_for(endpoint)
        if creds is not None and creds.registry_token:
            return f"Bearer {creds.registry_token}"
        fresh = challenge is not None
        if challenge is None:
            with self._lock:
                challenge = self._challenges.get(endpoint.url)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            if creds is None or not creds.has_basic:
                return None
            return _basic_header(creds.username, creds.password)
        default_scope = f"repository:{repository}:pull"
        scope = (challenge.params.get("scope") or default_scope) if fresh else default_scope
        stale_token = stale[len("Bearer ") :] if stale and stale.startswith("Bearer ") else None
        return "Bearer " + self._bearer_token(endpoint, challenge, scope, creds, stale_token)

    def _bearer_token(
        self,
        endpoint: Endpoint,
        challenge: Challenge,
        scope: str,
        creds: Credentials | None,
        stale: str | None,
    ) -> str:
        """A token for (endpoint, scope) from the cache, or fetched once for all waiting threads."""
        key = (endpoint.url, scope)
        with self._lock:
            key_lock = self._token_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                cached = self._tokens.get(key)
            if cached is not None and cached.expires > time.monotonic() and cached.value != stale:
                return cached.value
            value, ttl = self._fetch_token(endpoint, challenge, scope, creds)
            now = time.monotonic()
            with self._lock:
                self._tokens = {k: t for k, t in self._tokens.items() if t.expires > now}
                # renew a little early so a token does not expire between check and use
                self._tokens[key] = _Token(value, now + ttl * 0.9)
            return value

    def _fetch_token(
        self,
        endpoint: Endpoint,
        challenge: Challenge,
        scope: str,
        creds: Credentials | None,
    ) -> tuple[str, float]:
        """Ask the challenge's realm for a token; returns (token, lifetime in seconds).

        With an identity token this is the OAuth2 refresh-token grant (POST); a
        realm that does not offer it (404/405) gets the classic GET. Credentials go
        to the realm only over https, or when the registry itself is plain http
        (then they cross the network in clear text anyway).
        """
        realm = challenge.params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise AuthenticationError(
                f"{endpoint.url}: bearer challenge with an unusable realm {realm!r}"
            )
        in_clear = realm.startswith("http://") and endpoint.url.startswith("https://")
        if creds is not None and in_clear:
            log.warning("no credentials for %s sent to http token realm %s", endpoint.url, realm)
            creds = None
        service = challenge.params.get("service", "")
        what = f"token from {realm}"
        response: httpx.Response | None = None
        if creds is not None and creds.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "service": service,
                "scope": scope,
                "client_id": OAUTH_CLIENT_ID,
            }
            post = functools.partial(self._client.build_request, "POST", realm, data=form)
            response = self._send_with_retries(endpoint, what, post)
            if response.status_code in (404, 405):
                response.close()
                response = None
        if response is None:
            params = {k: v for k, v in (("service", service), ("scope", scope)) if v}
            headers: dict[str, str] = {}
            if creds is not None and creds.has_basic:
                headers["Authorization"] = _basic_header(creds.username, creds.password)
            get = functools.partial(
                self._client.build_request, "GET", realm, params=params, headers=headers
            )
            response = self._send_with_retries(endpoint, what, get)
        with contextlib.closing(response):
            return _parse_token_response(response, endpoint, what, creds is not None)

    def _builder(
        self, endpoint: Endpoint, url: str, headers: dict[str, str], auth: str | None
    ) -> Callable[[], httpx.Request]:
        """A fresh request per attempt (a Request must not be sent twice)."""
        all_headers = dict(headers)
        if auth:
            all_headers["Authorization"] = auth
        # Tell a mirror which registry the image is from, as containerd does: one
        # pull-through cache can then serve several upstream registries.
        params = {"ns": endpoint.host} if endpoint.is_mirror else None
        return functools.partial(
            self._client.build_request, "GET", url, headers=all_headers, params=params
        )

    def _send_with_retries(
        self, endpoint: Endpoint, what: str, build: Callable[[], httpx.Request]
    ) -> httpx.Response:
        """Send, retrying transport errors, 5xx and 429 with backoff; returns an open response.

        After the last attempt the failure is a RegistryError naming the endpoint
        and the status or transport error.
        """
        attempts = self._retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self._client.send(build(), stream=True)
            except httpx.UnsupportedProtocol as exc:
                raise RegistryError(f"{endpoint.url}: {what}: {_describe(exc)}") from exc
            except httpx.TransportError as exc:
                if last:
                    raise RegistryError(
                        f"{endpoint.url}: {what}: {_describe(exc)} (after {attempts} attempts)"
                    ) from exc
                log.debug("%s: %s: %s; retrying", endpoint.url, what, _describe(exc))
                self._sleep(self._delay(attempt, None))
                continue
            except httpx.HTTPError as exc:  # too many redirects, bad URL in a redirect
                raise RegistryError(f"{endpoint.url}: {what}: {_describe(exc)}") from exc
            if response.status_code not in _RETRY_STATUSES:
                return response
            status = _status_text(response)
            if last:
                detail = _error_detail(response)
                response.close()
                raise RegistryError(
                    f"{endpoint.url}: {what}: {status}{detail} (after {attempts} attempts)"
                )
            retry_after = _retry_after(response.headers.get("retry-after"))
            response.close()
            log.debug("%s: %s: %s; retrying", endpoint.url, what, status)
            self._sleep(self._delay(attempt, retry_after))
        raise AssertionError("unreachable")  # pragma: no cover

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """The pause before retry `attempt + 1`: Retry-After if sent, else exponential; capped."""
        if retry_after is not None:
            return min(MAX_BACKOFF, retry_after)
        return min(MAX_BACKOFF, self._backoff * (2**attempt))


# --- helpers ------------------------------------------------------------------------


_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def _direct_loopback_mounts() -> dict[str, httpx.BaseTransport]:
    """Direct transports for loopback hosts, whatever HTTP(S)_PROXY says.

    The environment's proxy is honoured for real registries (as containerd does),
    but, like Go's ProxyFromEnvironment, never for loopback: a proxy meant for the
    internet must not capture a node-local mirror or test registry.
    """
    return {f"all://{host}": httpx.HTTPTransport() for host in _LOOPBACK_HOSTS}


def _basic_header(username: str, password: str) -> str:
    raw = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _describe(exc: BaseException) -> str:
    """`ConnectError: [Errno 111] Connection refused`; the class says what kind of failure."""
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"


def _status_text(response: httpx.Response) -> str:
    """`404 Not Found`."""
    return f"{response.status_code} {response.reason_phrase}".rstrip()


def _error_detail(response: httpx.Response) -> str:
    """` (MANIFEST_UNKNOWN: manifest unknown)` from a distribution error body, or ""."""
    try:
        body = b""
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) >= _MAX_ERROR_BODY:
                return ""
        payload = json.loads(body)
        entries = payload.get("errors") if isinstance(payload, dict) else None
        if not isinstance(entries, list):
            return ""
        parts = [
            ": ".join(str(e[k]) for k in ("code", "message") if e.get(k))
            for e in entries
            if isinstance(e, dict)
        ]
        parts = [p for p in parts if p]
        return f" ({'; '.join(parts)})" if parts else ""
    except (httpx.HTTPError, ValueError, AttributeError):
        return ""


def _raise_for_status(response: httpx.Response, endpoint: Endpoint, what: str) -> None:
    """404 → ImageNotFound, other errors → RegistryError; both name endpoint and status."""
    if response.status_code < 400:
        return
    message = f"{endpoint.url}: {what}: {_status_text(response)}{_error_detail(response)}"
    if response.status_code == 404:
        raise ImageNotFound(message)
    raise RegistryError(message)


def _read_limited(response: httpx.Response, limit: int, endpoint: Endpoint, what: str) -> bytes:
    """The whole body, refusing more than `limit` bytes; transport errors → RegistryError."""
    length = _content_length(response)
    if length is not None and length > limit:
        raise RegistryError(f"{endpoint.url}: {what}: {length} bytes, over the {limit} allowed")
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limit:
                raise RegistryError(f"{endpoint.url}: {what}: over the {limit} bytes allowed")
            chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise RegistryError(f"{endpoint.url}: {what}: reading failed: {_describe(exc)}") from exc
    return b"".join(chunks)


def _check_digest_syntax(digest: str) -> None:
    """Refuse digests we cannot verify before asking anyone for them."""
    algorithm, sep, encoded = digest.partition(":")
    if not sep or algorithm not in _HASHES or not re.fullmatch(r"[a-f0-9]+", encoded):
        raise errors.InvalidArgument(f"invalid or unsupported digest {digest!r}")


def _digest_of(data: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _verify_manifest(
    data: bytes, expected: str | None, header: str, endpoint: Endpoint, what: str
) -> str:
    """The manifest's digest, after checking it against the request and the registry's header."""
    if expected is not None:
        actual = _digest_of(data, expected.partition(":")[0])
        if actual != expected:
            raise DigestMismatchError(
                f"{endpoint.url}: {what}: content has digest {actual}, not the requested {expected}"
            )
        return expected
    digest = _digest_of(data, "sha256")
    if header:
        algorithm = header.partition(":")[0]
        actual = digest if algorithm == "sha256" else (
            _digest_of(data, algorithm) if algorithm in _HASHES else ""
        )
        if actual != header:
            raise DigestMismatchError(
                f"{endpoint.url}: {what}: content has digest {digest}, but the registry's "
                f"Docker-Content-Digest says {header}"
            )
    return digest


def _media_type(content_type: str, data: bytes) -> str:
    """The Content-Type's media type, or the body's `mediaType` when the header is generic.

    Some registries and proxies serve manifests as application/json; an OCI
    manifest may even omit `mediaType`, so its shape decides as a last resort.
    """
    header = content_type.split(";", 1)[0].strip().lower()
    if header not in _GENERIC_CONTENT_TYPES:
        return header
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if isinstance(body, dict):
        declared = body.get("mediaType")
        if isinstance(declared, str) and declared:
            return declared
        if "manifests" in body:
            return MEDIA_TYPE_OCI_INDEX
        if "config" in body and "layers" in body:
            return MEDIA_TYPE_OCI_MANIFEST
    return header or "application/octet-stream"


def _parse_token_response(
    response: httpx.Response, endpoint: Endpoint, what: str, with_credentials: bool
) -> tuple[str, float]:
    """(token, ttl) from a token server's answer, per Docker's token spec."""
    if response.status_code in (401, 403):
        who = "credentials were refused" if with_credentials else "anonymous access was refused"
        raise AuthenticationError(
            f"{endpoint.url}: {what}: {_status_text(response)}{_error_detail(response)}: {who}"
        )
    if response.status_code >= 400:
        detail = _error_detail(response)
        raise RegistryError(f"{endpoint.url}: {what}: {_status_text(response)}{detail}")
    try:
        body = json.loads(_read_limited(response, _MAX_ERROR_BODY * 4, endpoint, what))
    except ValueError:
        body = None
    token = None
    if isinstance(body, dict):
        token = body.get("token") or body.get("access_token")
    if not isinstance(token, str) or not token:
        raise RegistryError(f"{endpoint.url}: {what}: the answer holds no token")
    expires_in = body.get("expires_in") if isinstance(body, dict) else None
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and expires_in > 0:
        return token, float(expires_in)
    return token, DEFAULT_TOKEN_TTL


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), None if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _combine(ref: str, failures: list[errors.CriError]) -> errors.CriError:
    """One error for a pull that failed everywhere, of the class of the last (the registry's)."""
    detail = "; ".join(str(f) for f in failures)
    last = failures[-1]
    if isinstance(last, ImageNotFound):
        return type(last)(f"image {ref} not found: {detail}")
    if isinstance(last, AuthenticationError):
        return type(last)(f"pulling image {ref}: {detail}")
    return type(last)(f"pulling image {ref} failed: {detail}")
