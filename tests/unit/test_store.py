"""The store: records survive reopening, one winner per name, crash-safe writes."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from cri_py.errors import AlreadyExists
from cri_py.store import NameRegistrar, Store, atomic_write


async def test_records_round_trip_and_survive_reopen(tmp_path):
    store = Store(str(tmp_path))
    await store.sandboxes.put("a", {"name": "pod-a", "state": "READY"})
    await store.sandboxes.put("b", {"name": "pod-b"})
    await store.sandboxes.put("a", {"name": "pod-a", "state": "NOTREADY"})
    await store.containers.put("c", {"sandbox": "a"})
    assert (await store.sandboxes.get("a"))["state"] == "NOTREADY"
    assert await store.sandboxes.delete("b") is True
    assert await store.sandboxes.delete("b") is False
    store.close()

    reopened = Store(str(tmp_path))
    assert [r["id"] for r in await reopened.sandboxes.all()] == ["a"]
    assert (await reopened.containers.get("c"))["sandbox"] == "a"
    assert await reopened.images.all() == []


async def test_put_replaces_the_whole_record(tmp_path):
    store = Store(str(tmp_path))
    await store.containers.put("c", {"state": "CREATED", "creating": True})
    await store.containers.put("c", {"state": "CREATED"})
    assert await store.containers.get("c") == {"id": "c", "state": "CREATED"}
    store.close()
    assert await Store(str(tmp_path)).containers.get("c") == {"id": "c", "state": "CREATED"}


async def test_returned_records_are_copies(tmp_path):
    store = Store(str(tmp_path))
    await store.images.put("i", {"tags": ["x"]})
    record = await store.images.get("i")
    record["tags"] = ["mutated"]
    assert (await store.images.get("i"))["tags"] == ["x"]


def test_concurrent_reservation_has_exactly_one_winner():
    registrar = NameRegistrar("sandbox")
    winners, losers = [], []
    barrier = threading.Barrier(16)

    def attempt(i):
        barrier.wait()
        try:
            registrar.reserve("web_default_uid_0", f"id-{i}")
            winners.append(i)
        except AlreadyExists:
            losers.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 15
    assert registrar.holder("web_default_uid_0") == f"id-{winners[0]}"


async def test_concurrent_reservation_from_asyncio_tasks():
    registrar = NameRegistrar("container")

    async def attempt(i):
        await asyncio.sleep(0)
        registrar.reserve("name", str(i))

    results = await asyncio.gather(*(attempt(i) for i in range(10)), return_exceptions=True)
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, AlreadyExists) for r in results if r is not None)


def test_reservation_is_idempotent_for_its_holder_and_released():
    registrar = NameRegistrar("sandbox")
    registrar.reserve("n", "id1")
    registrar.reserve("n", "id1")
    with pytest.raises(AlreadyExists, match="reserved for 'id1'"):
        registrar.reserve("n", "id2")
    registrar.release("n")
    registrar.release("n")
    registrar.reserve("n", "id2")
    assert registrar.holder("n") == "id2"


def test_atomic_write_replaces_content(tmp_path):
    path = str(tmp_path / "f")
    atomic_write(path, b"old")
    atomic_write(path, b"new")
    assert open(path, "rb").read() == b"new"
    assert os.listdir(tmp_path) == ["f"]


WRITER = textwrap.dedent(
    """
    import sys
    from cri_py.atomicfile import atomic_write
    path = sys.argv[1]
    i = 0
    print("ready", flush=True)
    while True:
        i += 1
        # big enough that a torn write is likely if writes were not atomic
        atomic_write(path, ('{"gen": %d, "pad": "%s"}' % (i, "x" * 200000)).encode())
    """
)


def test_killed_writer_leaves_old_or_new_file_never_torn(tmp_path):
    path = str(tmp_path / "metadata.json")
    atomic_write(path, b'{"gen": 0, "pad": ""}')
    for round_ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        # let it write a varying number of generations, then kill it mid-flight
        deadline_reads = 5 + round_ * 3
        for _ in range(deadline_reads):
            json.loads(open(path, "rb").read())  # readers never see a torn file either
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        data = json.loads(open(path, "rb").read())
        assert isinstance(data["gen"], int)
