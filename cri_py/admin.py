"""cri-py's own RPCs beside the CRI, on the same socket: what the CRI has no call for.

`ImportImages` loads an image archive into the running daemon's store (the daemon
owns the store; a second process writing it would race the daemon's cached view).
Messages are JSON, so there is no generated code for three fields.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from cri_py.errors import InvalidArgument
from cri_py.image.images import ImageManager

SERVICE = "cripy.admin.v1.Admin"
IMPORT_METHOD = f"/{SERVICE}/ImportImages"


def _decode(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"request is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument("request is not a JSON object")
    return value


def _encode(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode()


def summary(records: list[Any]) -> list[dict[str, Any]]:
    """What the CLI prints for imported images."""
    return [{"id": r.id, "repo_tags": r.repo_tags, "repo_digests": r.repo_digests, "size": r.size} for r in records]


def handler(images: ImageManager) -> grpc.GenericRpcHandler:
    """The admin service for `server.add_generic_rpc_handlers`."""

    async def import_images(request: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
        path = request.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidArgument("path must be an absolute path of an image archive")
        name = request.get("name") or None
        records = await images.import_archive(path, name)
        return {"images": summary(records)}

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ImportImages": grpc.unary_unary_rpc_method_handler(
                import_images, request_deserializer=_decode, response_serializer=_encode
            )
        },
    )


def call_import(socket_path: str, path: str, name: str | None, timeout: float = 600) -> dict[str, Any]:
    """Client side: ask the daemon on `socket_path` to import `path`."""
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        method = channel.unary_unary(IMPORT_METHOD, request_serializer=_encode, response_deserializer=json.loads)
        return method({"path": path, "name": name or ""}, timeout=timeout)
