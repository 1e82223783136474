"""The CRI ImageService edge: CRI messages in, ImageManager calls, CRI messages out."""

from __future__ import annotations

import json
import time

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc

from cri_py.errors import InvalidArgument
from cri_py.image.images import ImageManager, ImageRecord, split_user
from cri_py.image.registry import Credentials


def credentials_from(auth: cri.AuthConfig) -> Credentials | None:
    """The CRI AuthConfig as registry credentials; None when it carries nothing."""
    if not (auth.username or auth.password or auth.auth or auth.identity_token or auth.registry_token):
        return None
    return Credentials.from_fields(
        username=auth.username,
        password=auth.password,
        auth=auth.auth,
        server_address=auth.server_address,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
    )


def image_message(record: ImageRecord) -> cri.Image:
    """An image record as the CRI Image message."""
    uid, username = split_user(record.user)
    image = cri.Image(
        id=record.id,
        repo_tags=record.repo_tags,
        repo_digests=record.repo_digests,
        size=record.size,
        username=username,
        pinned=record.pinned,
        spec=cri.ImageSpec(image=record.id),
    )
    if uid is not None:
        image.uid.value = uid
    return image


def _spec_name(spec: cri.ImageSpec) -> str:
    if not spec.image:
        raise InvalidArgument("image spec has no image name")
    return spec.image


class ImageService(cri_grpc.ImageServiceServicer):
    """ImageService over the image manager."""

    def __init__(self, images: ImageManager) -> None:
        self.images = images

    async def PullImage(self, request: cri.PullImageRequest, context: grpc.aio.ServicerContext) -> cri.PullImageResponse:
        record = await self.images.pull(_spec_name(request.image), credentials_from(request.auth))
        return cri.PullImageResponse(image_ref=record.id)

    async def ListImages(self, request: cri.ListImagesRequest, context: grpc.aio.ServicerContext) -> cri.ListImagesResponse:
        wanted = request.filter.image.image if request.HasField("filter") else ""
        if wanted:
            record = self.images.resolve(wanted)
            records = [record] if record is not None else []
        else:
            records = sorted(self.images.list(), key=lambda r: r.created_at)
        return cri.ListImagesResponse(images=[image_message(r) for r in records])

    async def ImageStatus(self, request: cri.ImageStatusRequest, context: grpc.aio.ServicerContext) -> cri.ImageStatusResponse:
        record = self.images.resolve(_spec_name(request.image))
        if record is None:
            return cri.ImageStatusResponse()  # the CRI says: absent image, empty status, no error
        response = cri.ImageStatusResponse(image=image_message(record))
        if request.verbose:
            response.info["info"] = json.dumps(
                {
                    "id": record.id,
                    "manifestDigest": record.manifest_digest,
                    "imageSpec": record.config,
                    "layers": record.layers,
                    "pinned": record.pinned,
                }
            )
        return response

    async def RemoveImage(self, request: cri.RemoveImageRequest, context: grpc.aio.ServicerContext) -> cri.RemoveImageResponse:
        await self.images.remove(_spec_name(request.image))
        return cri.RemoveImageResponse()

    async def ImageFsInfo(self, request: cri.ImageFsInfoRequest, context: grpc.aio.ServicerContext) -> cri.ImageFsInfoResponse:
        stamp, used, inodes, mountpoint = await self.images.fs_usage()
        usage = cri.FilesystemUsage(
            timestamp=int(stamp * 1e9) or time.time_ns(),
            fs_id=cri.FilesystemIdentifier(mountpoint=mountpoint),
        )
        usage.used_bytes.value = used
        usage.inodes_used.value = inodes
        return cri.ImageFsInfoResponse(image_filesystems=[usage])
