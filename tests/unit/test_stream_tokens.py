import pytest

from cri_py.errors import ResourceExhausted
from cri_py.streaming.tokens import StreamRequest, TokenCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def req(kind="exec") -> StreamRequest:
    return StreamRequest(kind=kind, id="c1", cmd=["echo"], stdout=True)


def test_single_use():
    cache = TokenCache(60, clock=Clock())
    token = cache.insert(req())
    assert len(token) >= 32
    assert cache.consume(token) == req()
    assert cache.consume(token) is None
    assert cache.consume("nope") is None


def test_tokens_are_distinct():
    cache = TokenCache(60, clock=Clock())
    assert len({cache.insert(req()) for _ in range(100)}) == 100


def test_expiry():
    clock = Clock()
    cache = TokenCache(60, clock=clock)
    old = cache.insert(req())
    clock.now += 30
    young = cache.insert(req("portforward"))
    clock.now += 30
    assert cache.consume(old) is None
    assert cache.consume(young).kind == "portforward"


def test_bound_and_expiry_frees_room():
    clock = Clock()
    cache = TokenCache(10, max_tokens=3, clock=clock)
    tokens = [cache.insert(req()) for _ in range(3)]
    with pytest.raises(ResourceExhausted):
        cache.insert(req())
    cache.consume(tokens[0])
    cache.insert(req())
    clock.now += 11
    assert len(cache) == 0
    cache.insert(req())
