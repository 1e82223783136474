"""Error mapping: domain errors reach clients as the right gRPC codes, via the interceptor."""

import asyncio

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc

from cri_py import errors
from cri_py.metrics.registry import grpc_request_duration
from cri_py.server import ErrorMetricsInterceptor


@pytest.mark.parametrize(
    "exc, code",
    [
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Unimplemented("x"), grpc.StatusCode.UNIMPLEMENTED),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (asyncio.TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (NotImplementedError(), grpc.StatusCode.UNIMPLEMENTED),
        (KeyError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_grpc_code_for(exc, code):
    assert errors.grpc_code_for(exc) == code


class Raising(cri_grpc.RuntimeServiceServicer):
    """Each RPC raises what the test asks for, as a service below the edge would."""

    async def Version(self, request, context):
        raise errors.NotFound(f"no such thing {request.version!r}")

    async def Status(self, request, context):
        raise ValueError("a bug")

    async def RuntimeConfig(self, request, context):
        return cri.RuntimeConfigResponse()

    async def GetContainerEvents(self, request, context):
        yield cri.ContainerEventResponse(container_id="one")
        raise errors.FailedPrecondition("stream broke")


@pytest.fixture
async def stub(tmp_path):
    server = grpc.aio.server(interceptors=[ErrorMetricsInterceptor()])
    cri_grpc.add_RuntimeServiceServicer_to_server(Raising(), server)
    address = f"unix://{tmp_path}/s.sock"
    server.add_insecure_port(address)
    await server.start()
    channel = grpc.aio.insecure_channel(address)
    yield cri_grpc.RuntimeServiceStub(channel)
    await channel.close()
    await server.stop(None)


def _count(method, code):
    return grpc_request_duration.labels(method, code)._sum.get(), sum(
        b.get() for b in grpc_request_duration.labels(method, code)._buckets
    )


async def test_domain_error_becomes_its_code_with_message(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Version(cri.VersionRequest(version="v9"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no such thing 'v9'"


async def test_unexpected_error_is_internal(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Status(cri.StatusRequest())
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "a bug" in err.value.details()


async def test_unbuilt_rpc_is_unimplemented_never_a_fake_success(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListContainers(cri.ListContainersRequest())
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "ListContainers" in err.value.details()


async def test_stream_error_after_items(stub):
    call = stub.GetContainerEvents(cri.GetEventsRequest())
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for item in call:
            got.append(item.container_id)
    assert got == ["one"]
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_each_call_is_observed_by_method_and_code(stub):
    _, before = _count("RuntimeService/RuntimeConfig", "OK")
    _, nf_before = _count("RuntimeService/Version", "NOT_FOUND")
    await stub.RuntimeConfig(cri.RuntimeConfigRequest())
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Version(cri.VersionRequest())
    assert _count("RuntimeService/RuntimeConfig", "OK")[1] == before + 1
    assert _count("RuntimeService/Version", "NOT_FOUND")[1] == nf_before + 1
