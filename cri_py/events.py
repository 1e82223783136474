"""Container lifecycle events for GetContainerEvents (the kubelet's Evented PLEG).

Each event carries snapshots of the pod sandbox and of its containers as they were
when it happened, so a subscriber never has to ask again. Every subscriber has a
bounded queue: one that stops reading is cut off (its stream ends with an error) and
the events it missed are counted, rather than slowing the others down or growing the
daemon's memory without bound.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import dataclass, field
from typing import Any

from cri_py.errors import ResourceExhausted
from cri_py.metrics.registry import events_dropped

log = logging.getLogger(__name__)

CREATED, STARTED, STOPPED, DELETED = "CREATED", "STARTED", "STOPPED", "DELETED"
QUEUE_SIZE = 1000


@dataclass
class Event:
    """One lifecycle change of a container (or of a pod sandbox: id is the sandbox's)."""

    kind: str
    container_id: str
    created_at_ns: int
    sandbox: Any = None  # a Sandbox snapshot
    containers: list[Any] = field(default_factory=list)  # Container snapshots of that pod


class Subscription:
    """One GetContainerEvents stream's queue."""

    def __init__(self, bus: "EventBus") -> None:
        self._bus = bus
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_SIZE)
        self.overflowed = False

    async def next(self) -> Event:
        """The next event; ResourceExhausted once this subscriber fell too far behind."""
        event = await self.queue.get()
        if event is None:
            raise ResourceExhausted(f"event subscriber fell more than {QUEUE_SIZE} events behind and was cut off")
        return event

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    """Fan-out of lifecycle events to every current subscriber."""

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, container_id: str, created_at_ns: int, sandbox: Any, containers: list[Any]) -> None:
        """Snapshot the pod's state and hand the event to every subscriber, never waiting."""
        if not self._subscribers:
            return
        event = Event(kind, container_id, created_at_ns, copy.deepcopy(sandbox), copy.deepcopy(containers))
        for sub in list(self._subscribers):
            if sub.overflowed:
                continue
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._cut_off(sub)

    def _cut_off(self, sub: Subscription) -> None:
        """Drop a subscriber that stopped reading: what it misses is counted, not kept."""
        sub.overflowed = True
        dropped = sub.queue.qsize()
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(None)
        events_dropped.inc(dropped + 1)
        self._subscribers.discard(sub)
        log.warning("cut off a GetContainerEvents subscriber that fell %d events behind", dropped)
