"""Registry client: endpoints, mirrors, auth flows, retries, verification, streaming.

Every test talks to httpx.MockTransport handlers; no socket is ever opened, and
the host names are `.example` names that could not be reached anyway.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs

import grpc
import httpx
import pytest

from cri_py import errors
from cri_py.config import MirrorConfig, RegistryConfig
from cri_py.image import registry
from cri_py.image.registry import (
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    AuthenticationError,
    Credentials,
    DigestMismatchError,
    Endpoint,
    ImageNotFound,
    RegistryClient,
    RegistryError,
    endpoints_for,
    parse_challenges,
)

MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + "1" * 64,
            "size": 2,
        },
        "layers": [],
    }
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
BLOB = bytes(range(256)) * 1000  # 256000 bytes
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()

UPSTREAM = Endpoint("https://registry.example", "registry.example")

Handler = Callable[[httpx.Request], httpx.Response]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def manifest_response(
    body: bytes = MANIFEST, content_type: str = MEDIA_TYPE_OCI_MANIFEST, **headers: str
) -> httpx.Response:
    return httpx.Response(200, content=body, headers={"Content-Type": content_type, **headers})


def blob_response(body: bytes = BLOB, **headers: str) -> httpx.Response:
    """A streamed body, as a real transport gives (content=... would be pre-read and decoded)."""
    return httpx.Response(
        200, stream=httpx.ByteStream(body), headers={"Content-Length": str(len(body)), **headers}
    )


def error_response(status: int, code: str, message: str) -> httpx.Response:
    """A distribution-spec error body."""
    return httpx.Response(status, json={"errors": [{"code": code, "message": message}]})


def not_found() -> httpx.Response:
    return error_response(404, "MANIFEST_UNKNOWN", "manifest unknown")


class Recorder:
    """Wraps a handler and keeps every request it saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
        return self.handler(request)

    def urls(self) -> list[str]:
        return [str(r.url.copy_with(query=None)) for r in self.requests]

    def hosts(self) -> list[str]:
        return [r.url.host for r in self.requests]


def make_client(
    handler: Handler,
    config: RegistryConfig | None = None,
    credentials: Credentials | None = None,
    **kwargs,
) -> tuple[RegistryClient, Recorder, list[float]]:
    """A client over a recorded mock transport; sleeps are recorded, not slept."""
    recorder = Recorder(handler)
    kwargs.setdefault("backoff", 0)
    client = RegistryClient(
        config or RegistryConfig(), credentials, transport=httpx.MockTransport(recorder), **kwargs
    )
    sleeps: list[float] = []
    client._sleep = sleeps.append
    return client, recorder, sleeps


# --- endpoints ---------------------------------------------------------------------


def test_endpoints_mirrors_in_order_then_upstream():
    config = RegistryConfig(
        mirrors={
            "registry.example": MirrorConfig(
                endpoints=["http://m1.example:5000/", "https://m2.example"]
            )
        }
    )
    got = endpoints_for("registry.example", config)
    assert got == [
        Endpoint("http://m1.example:5000", "registry.example", True),
        Endpoint("https://m2.example", "registry.example", True),
        Endpoint("https://registry.example", "registry.example", False),
    ]


def test_endpoints_insecure_host_is_plain_http():
    config = RegistryConfig(insecure=["registry.example:5000"])
    assert endpoints_for("registry.example:5000", config) == [
        Endpoint("http://registry.example:5000", "registry.example:5000", False)
    ]
    assert endpoints_for("other.example", config)[0].url == "https://other.example"


def test_endpoints_loopback_hosts_are_plain_http():
    for host in ("127.0.0.1:5000", "localhost:5000", "[::1]:5000", "127.3.2.1"):
        assert endpoints_for(host, RegistryConfig())[0].url == f"http://{host}"
    assert endpoints_for("10.1.2.3:5000", RegistryConfig())[0].url == "https://10.1.2.3:5000"


def test_endpoints_without_upstream_stay_on_the_mirrors():
    config = RegistryConfig(
        mirrors={"docker.io": MirrorConfig(endpoints=["http://127.0.0.1:5000"], upstream=False)}
    )
    assert [e.url for e in endpoints_for("docker.io", config)] == ["http://127.0.0.1:5000"]


def test_endpoints_docker_hub_upstream():
    (hub,) = endpoints_for("docker.io", RegistryConfig())
    assert hub.url == "https://registry-1.docker.io"
    assert hub.host == "docker.io"


def test_endpoint_path_prefix_and_v2_not_doubled():
    prefixed = Endpoint("http://m.example:5000/prefix", "r.example")
    assert prefixed.url_for("a/b", "manifests", "t") == (
        "http://m.example:5000/prefix/v2/a/b/manifests/t"
    )
    assert Endpoint("http://m.example:5000/prefix/v2", "r.example").url_for("a", "blobs", "d") == (
        "http://m.example:5000/prefix/v2/a/blobs/d"
    )


# --- manifests and fallback ---------------------------------------------------------


MIRRORED = RegistryConfig(
    mirrors={"registry.example": MirrorConfig(endpoints=["http://m1.example", "http://m2.example"])}
)


def test_fallback_to_upstream_on_mirror_404_and_connection_error():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "m1.example":
            return not_found()
        if request.url.host == "m2.example":
            raise httpx.ConnectError("connection refused", request=request)
        return manifest_response()

    client, rec, _ = make_client(handler, MIRRORED, retries=1)
    manifest = client.get_manifest("registry.example/team/app:v1")
    assert manifest.endpoint == Endpoint("https://registry.example", "registry.example", False)
    assert manifest.repository == "team/app"
    assert manifest.digest == MANIFEST_DIGEST
    assert manifest.media_type == MEDIA_TYPE_OCI_MANIFEST
    assert manifest.data == MANIFEST
    # m2 was tried twice (retries=1), then the registry itself
    assert rec.hosts() == ["m1.example", "m2.example", "m2.example", "registry.example"]
    assert rec.requests[0].url.params["ns"] == "registry.example"
    assert "ns" not in rec.requests[-1].url.params
    assert MEDIA_TYPE_OCI_INDEX in rec.requests[0].headers["accept"]
    assert MEDIA_TYPE_DOCKER_MANIFEST in rec.requests[0].headers["accept"]


def test_first_mirror_that_answers_wins():
    client, rec, _ = make_client(lambda r: manifest_response(), MIRRORED)
    manifest = client.get_manifest("registry.example/app:v1")
    assert manifest.endpoint.url == "http://m1.example"
    assert manifest.endpoint.is_mirror
    assert rec.urls() == ["http://m1.example/v2/app/manifests/v1"]


def test_path_prefixed_mirror():
    config = RegistryConfig(
        mirrors={"docker.io": MirrorConfig(endpoints=["http://m.example:5000/cache/hub"])}
    )
    client, rec, _ = make_client(lambda r: manifest_response(), config)
    client.get_manifest("busybox")
    assert rec.urls() == ["http://m.example:5000/cache/hub/v2/library/busybox/manifests/latest"]


def test_docker_hub_and_insecure_urls():
    client, rec, _ = make_client(
        lambda r: manifest_response(), RegistryConfig(insecure=["registry.example:5000"])
    )
    client.get_manifest("busybox:1.36")
    client.get_manifest("registry.example:5000/app:v1")
    assert rec.urls() == [
        "https://registry-1.docker.io/v2/library/busybox/manifests/1.36",
        "http://registry.example:5000/v2/app/manifests/v1",
    ]


def test_not_found_everywhere_names_each_endpoint():
    client, _, _ = make_client(lambda r: not_found(), MIRRORED)
    with pytest.raises(ImageNotFound) as info:
        client.get_manifest("registry.example/app:v1")
    message = str(info.value)
    assert message.startswith("image registry.example/app:v1 not found: ")
    for url in ("http://m1.example", "http://m2.example", "https://registry.example"):
        assert f"{url}: manifest app:v1: 404 Not Found (MANIFEST_UNKNOWN: manifest unknown)" in (
            message
        )
    assert errors.grpc_code_for(info.value) == grpc.StatusCode.NOT_FOUND


def test_manifest_by_digest_is_verified():
    client, rec, _ = make_client(lambda r: manifest_response())
    manifest = client.get_manifest(f"registry.example/app@{MANIFEST_DIGEST}")
    assert manifest.digest == MANIFEST_DIGEST
    assert rec.urls() == [f"https://registry.example/v2/app/manifests/{MANIFEST_DIGEST}"]


def test_manifest_digest_mismatch_is_refused():
    wrong = "sha256:" + "0" * 64
    client, _, _ = make_client(lambda r: manifest_response())
    with pytest.raises(DigestMismatchError) as info:
        client.get_manifest(f"registry.example/app@{wrong}")
    assert wrong in str(info.value) and MANIFEST_DIGEST in str(info.value)
    assert "https://registry.example" in str(info.value)


def test_corrupt_mirror_falls_back_to_upstream():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "m1.example":
            return manifest_response(body=MANIFEST + b" ")
        return manifest_response()

    client, _, _ = make_client(handler, MIRRORED)
    manifest = client.get_manifest(f"registry.example/app@{MANIFEST_DIGEST}")
    assert manifest.endpoint.url == "http://m2.example"


def test_docker_content_digest_header_checked():
    wrong = "sha256:" + "f" * 64
    client, _, _ = make_client(lambda r: manifest_response(**{"Docker-Content-Digest": wrong}))
    with pytest.raises(DigestMismatchError, match="Docker-Content-Digest"):
        client.get_manifest("registry.example/app:v1")
    right = {"Docker-Content-Digest": MANIFEST_DIGEST}
    client, _, _ = make_client(lambda r: manifest_response(**right))
    assert client.get_manifest("registry.example/app:v1").digest == MANIFEST_DIGEST


def test_generic_content_type_falls_back_to_body_media_type():
    body = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_DOCKER_MANIFEST}).encode()
    client, _, _ = make_client(lambda r: manifest_response(body, "application/json; charset=utf-8"))
    assert client.get_manifest("registry.example/app:v1").media_type == MEDIA_TYPE_DOCKER_MANIFEST
    index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    client, _, _ = make_client(lambda r: manifest_response(index, ""))
    assert client.get_manifest("registry.example/app:v1").media_type == MEDIA_TYPE_OCI_INDEX


def test_get_manifest_by_digest_uses_given_endpoint():
    client, rec, _ = make_client(lambda r: manifest_response(), MIRRORED)
    endpoint = Endpoint("http://m2.example", "registry.example", True)
    manifest = client.get_manifest_by_digest(endpoint, "app", MANIFEST_DIGEST)
    assert manifest.endpoint == endpoint
    assert rec.urls() == [f"http://m2.example/v2/app/manifests/{MANIFEST_DIGEST}"]
    with pytest.raises(errors.InvalidArgument):
        client.get_manifest_by_digest(endpoint, "app", "md5:abc")


def test_oversized_manifest_refused():
    big = b"x" * (registry.MAX_MANIFEST_SIZE + 1)
    client, _, _ = make_client(lambda r: manifest_response(big))
    with pytest.raises(RegistryError, match="over the"):
        client.get_manifest("registry.example/app:v1")


# --- auth ---------------------------------------------------------------------------


def basic_registry(user: str, password: str) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != basic(user, password):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="test, realm"'})
        return manifest_response()

    return handler


def test_basic_challenge_flow():
    client, rec, _ = make_client(basic_registry("u", "p"), credentials=Credentials("u", "p"))
    client.get_manifest("registry.example/app:v1")
    assert [r.headers.get("authorization") for r in rec.requests] == [None, basic("u", "p")]
    # the endpoint's challenge is remembered: the next request authenticates up front
    client.get_manifest("registry.example/other:v1")
    assert len(rec.requests) == 3
    assert rec.requests[2].headers["authorization"] == basic("u", "p")


def test_basic_challenge_without_credentials():
    client, _, _ = make_client(basic_registry("u", "p"))
    with pytest.raises(AuthenticationError, match="authentication required by https://registry"):
        client.get_manifest("registry.example/app:v1")


def test_basic_wrong_credentials_are_permission_denied():
    client, rec, _ = make_client(basic_registry("u", "p"), credentials=Credentials("u", "wrong"))
    with pytest.raises(AuthenticationError) as info:
        client.get_manifest("registry.example/app:v1")
    assert errors.grpc_code_for(info.value) == grpc.StatusCode.PERMISSION_DENIED
    assert "https://registry.example" in str(info.value) and "401" in str(info.value)
    assert len(rec.requests) == 2


def test_forbidden_is_permission_denied():
    client, _, _ = make_client(lambda r: httpx.Response(403))
    with pytest.raises(AuthenticationError, match="403 Forbidden") as info:
        client.get_manifest("registry.example/app:v1")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED


class BearerRegistry:
    """A registry at registry.example whose tokens come from auth.example."""

    CHALLENGE = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:app:pull"'
    )

    def __init__(self, expires_in: int | None = None) -> None:
        self.issued = 0
        self.expires_in = expires_in
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            with self.lock:
                self.issued += 1
                token = f"tok{self.issued}"
            body: dict[str, object] = {"token": token}
            if request.method == "POST":
                body = {"access_token": token}
            if self.expires_in is not None:
                body["expires_in"] = self.expires_in
            return httpx.Response(200, json=body)
        if not request.headers.get("authorization", "").startswith("Bearer tok"):
            return httpx.Response(401, headers={"WWW-Authenticate": self.CHALLENGE})
        if "/blobs/" in request.url.path:
            return blob_response()
        return manifest_response()


def test_bearer_flow_with_basic_credentials_and_cached_token():
    client, rec, _ = make_client(BearerRegistry(), credentials=Credentials("u", "p"))
    client.get_manifest("registry.example/app:v1")
    token_requests = [r for r in rec.requests if r.url.host == "auth.example"]
    assert len(token_requests) == 1
    params = token_requests[0].url.params
    assert params["service"] == "registry.example"
    assert params["scope"] == "repository:app:pull"
    assert token_requests[0].headers["authorization"] == basic("u", "p")
    assert rec.requests[-1].headers["authorization"] == "Bearer tok1"

    before = len(rec.requests)
    client.get_manifest("registry.example/app:v2")
    with client.open_blob(UPSTREAM, "app", BLOB_DIGEST) as blob:
        assert b"".join(blob.iter_chunks()) == BLOB
    assert [r.url.host for r in rec.requests[before:]] == ["registry.example", "registry.example"]
    assert all(r.headers["authorization"] == "Bearer tok1" for r in rec.requests[before:])


def test_anonymous_bearer_flow_sends_no_credentials():
    client, rec, _ = make_client(BearerRegistry())
    client.get_manifest("registry.example/app:v1")
    token_request = next(r for r in rec.requests if r.url.host == "auth.example")
    assert "authorization" not in token_request.headers


def test_bearer_token_expiry_honoured(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(registry.time, "monotonic", lambda: now[0])
    server = BearerRegistry(expires_in=120)
    client, _, _ = make_client(server)
    client.get_manifest("registry.example/app:v1")
    now[0] += 100
    client.get_manifest("registry.example/app:v1")
    assert server.issued == 1
    now[0] += 20  # past 90% of the lifetime
    client.get_manifest("registry.example/app:v1")
    assert server.issued == 2


def test_bearer_default_scope_for_later_repositories():
    client, rec, _ = make_client(BearerRegistry())
    client.get_manifest("registry.example/app:v1")
    client.get_manifest("registry.example/other/thing:v1")
    scopes = [r.url.params["scope"] for r in rec.requests if r.url.host == "auth.example"]
    assert scopes == ["repository:app:pull", "repository:other/thing:pull"]


def test_identity_token_uses_oauth2_refresh_grant():
    creds = Credentials.from_fields(identity_token="refresh-me", server_address="registry.example")
    client, rec, _ = make_client(BearerRegistry(), credentials=creds)
    client.get_manifest("registry.example/app:v1")
    (token_request,) = [r for r in rec.requests if r.url.host == "auth.example"]
    assert token_request.method == "POST"
    form = {k: v[0] for k, v in parse_qs(token_request.content.decode()).items()}
    assert form == {
        "grant_type": "refresh_token",
        "refresh_token": "refresh-me",
        "service": "registry.example",
        "scope": "repository:app:pull",
        "client_id": "cri-py",
    }
    assert rec.requests[-1].headers["authorization"] == "Bearer tok1"


def test_registry_token_sent_from_the_first_request():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer pre-issued"
        return manifest_response()

    creds = Credentials.from_fields(registry_token="pre-issued")
    client, rec, _ = make_client(handler, credentials=creds)
    client.get_manifest("registry.example/app:v1")
    assert len(rec.requests) == 1


def test_token_server_refusal_is_permission_denied():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return error_response(401, "UNAUTHORIZED", "bad login")
        return httpx.Response(401, headers={"WWW-Authenticate": BearerRegistry.CHALLENGE})

    client, _, _ = make_client(handler, credentials=Credentials("u", "bad"))
    with pytest.raises(AuthenticationError, match="bad login") as info:
        client.get_manifest("registry.example/app:v1")
    assert errors.grpc_code_for(info.value) == grpc.StatusCode.PERMISSION_DENIED


def test_parallel_downloads_share_one_token_fetch():
    server = BearerRegistry()
    client, _, _ = make_client(server)
    endpoint = UPSTREAM
    results: list[bytes] = []
    failures: list[BaseException] = []

    def pull() -> None:
        try:
            with client.open_blob(endpoint, "app", BLOB_DIGEST) as blob:
                results.append(b"".join(blob))
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert results == [BLOB] * 8
    assert server.issued == 1


def test_credentials_go_to_mirrors_only_when_meant_for_them():
    mirror = Endpoint("http://m1.example:5000", "registry.example", True)
    upstream = Endpoint("https://registry.example", "registry.example", False)
    anywhere = Credentials("u", "p")
    assert anywhere.applies_to(mirror) and anywhere.applies_to(upstream)
    for_registry = Credentials("u", "p", server_address="https://registry.example/v1/")
    assert for_registry.applies_to(upstream) and not for_registry.applies_to(mirror)
    assert Credentials("u", "p", server_address="m1.example:5000").applies_to(mirror)

    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.url.host == "m1.example":
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="m"'})
        return basic_registry("u", "p")(request)

    config = RegistryConfig(
        mirrors={"registry.example": MirrorConfig(endpoints=["http://m1.example:5000"])}
    )
    client, _, _ = make_client(handler, config, for_registry)
    client.get_manifest("registry.example/app:v1")
    assert seen == [None, None, basic("u", "p")]


def test_credentials_from_fields_decodes_auth():
    auth = base64.b64encode(b"user:pa:ss").decode()
    creds = Credentials.from_fields(auth=auth, server_address="docker.io")
    assert (creds.username, creds.password) == ("user", "pa:ss")
    assert "pa:ss" not in repr(creds)
    assert Credentials.from_fields(username=None).is_empty
    with pytest.raises(errors.InvalidArgument):
        Credentials.from_fields(auth="!!not base64!!")


def test_parse_challenges_robustly():
    got = parse_challenges(
        [
            'Bearer realm="https://auth.example/token",service="reg",'
            'scope="repository:a/b:pull,push" , Basic realm = "say \\"hi\\", ok"',
            "Basic realm=bare",
        ]
    )
    assert [c.scheme for c in got] == ["bearer", "basic", "basic"]
    assert got[0].params == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push",
    }
    assert got[1].params == {"realm": 'say "hi", ok'}
    assert got[2].params == {"realm": "bare"}


# --- retries ------------------------------------------------------------------------


def flaky(*responses: httpx.Response | Exception) -> Handler:
    """Answer with the given responses in order, then with the manifest."""
    pending = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        if pending:
            item = pending.pop(0)
            if isinstance(item, Exception):
                raise item
            return item
        return manifest_response()

    return handler


def test_retries_503_then_success_with_exponential_backoff():
    client, rec, sleeps = make_client(
        flaky(httpx.Response(503), httpx.Response(503), httpx.ReadTimeout("slow")), backoff=0.5
    )
    assert client.get_manifest("registry.example/app:v1").digest == MANIFEST_DIGEST
    assert len(rec.requests) == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_retry_on_429_honours_retry_after_up_to_the_cap():
    client, _, sleeps = make_client(
        flaky(
            httpx.Response(429, headers={"Retry-After": "2"}),
            httpx.Response(429, headers={"Retry-After": "3600"}),
        )
    )
    client.get_manifest("registry.example/app:v1")
    assert sleeps == [2.0, registry.MAX_BACKOFF]


def test_gives_up_after_retries_naming_registry_and_status():
    client, rec, sleeps = make_client(lambda r: httpx.Response(503), retries=2)
    with pytest.raises(RegistryError) as info:
        client.get_manifest("registry.example/app:v1")
    assert len(rec.requests) == 3 and len(sleeps) == 2
    message = str(info.value)
    assert "https://registry.example" in message and "503 Service Unavailable" in message
    assert "after 3 attempts" in message
    assert errors.grpc_code_for(info.value) == grpc.StatusCode.UNAVAILABLE


def test_no_retry_on_404():
    client, rec, _ = make_client(lambda r: not_found())
    with pytest.raises(ImageNotFound):
        client.get_manifest("registry.example/app:v1")
    assert len(rec.requests) == 1


def test_connection_errors_give_up_with_a_clear_error():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    client, _, _ = make_client(refuse, retries=1)
    expected = r"https://registry.example: manifest app:v1: ConnectError: .*refused"
    with pytest.raises(RegistryError, match=expected):
        client.get_manifest("registry.example/app:v1")


# --- blobs --------------------------------------------------------------------------


def test_blob_streams_in_chunks_and_follows_redirect():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "registry.example":
            assert request.headers["accept-encoding"] == "identity"
            return httpx.Response(
                307, headers={"Location": "https://storage.example/bucket/data?sig=abc"}
            )
        assert request.url.path == "/bucket/data"
        assert request.url.params["sig"] == "abc"
        assert "authorization" not in request.headers
        return blob_response(**{"Content-Encoding": "gzip"})

    client, rec, _ = make_client(handler, credentials=Credentials.from_fields(registry_token="t"))
    endpoint = client.endpoints("registry.example")[-1]
    with client.open_blob(endpoint, "app", BLOB_DIGEST) as blob:
        assert blob.content_length == len(BLOB)
        chunks = list(blob.iter_chunks(100_000))
    assert [len(c) for c in chunks] == [100_000, 100_000, 56_000]
    assert b"".join(chunks) == BLOB  # raw bytes: Content-Encoding is not undone
    assert rec.hosts() == ["registry.example", "storage.example"]
    assert rec.requests[0].headers["authorization"] == "Bearer t"


def test_blob_not_found():
    client, _, _ = make_client(lambda r: error_response(404, "BLOB_UNKNOWN", "blob unknown"))
    endpoint = UPSTREAM
    expected = "https://registry.example: blob app@sha256:.*404 Not Found"
    with pytest.raises(ImageNotFound, match=expected):
        with client.open_blob(endpoint, "app", BLOB_DIGEST):
            pass


class BreakingStream(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield b"x" * 1000
        raise httpx.ReadError("connection reset")


def test_blob_broken_midway_is_reported_not_retried():
    client, rec, _ = make_client(lambda r: httpx.Response(200, stream=BreakingStream()))
    endpoint = UPSTREAM
    with pytest.raises(RegistryError, match="after 1000 bytes: ReadError"):
        with client.open_blob(endpoint, "app", BLOB_DIGEST) as blob:
            for _ in blob.iter_chunks(10):
                pass
    assert len(rec.requests) == 1


def test_blob_retries_5xx_before_streaming():
    client, rec, _ = make_client(_blob_after(httpx.Response(502)))
    endpoint = UPSTREAM
    with client.open_blob(endpoint, "app", BLOB_DIGEST) as blob:
        assert b"".join(blob) == BLOB
    assert len(rec.requests) == 2


def _blob_after(*failures: httpx.Response) -> Handler:
    pending = list(failures)

    def handler(request: httpx.Request) -> httpx.Response:
        return pending.pop(0) if pending else blob_response()

    return handler


def test_client_is_a_context_manager():
    with make_client(lambda r: manifest_response())[0] as client:
        client.get_manifest("registry.example/app:v1")
    with pytest.raises(RuntimeError):
        client.get_manifest("registry.example/app:v1")
