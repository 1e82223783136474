"""Single-use tokens for exec/attach/port-forward URLs.

The Exec and PortForward RPCs validate a request, store it here under a random token
and return a URL holding the token; the streaming server consumes the token on the
first request that presents it. Tokens expire after the configured TTL and at most
`max_tokens` may be outstanding (ResourceExhausted beyond), so a client that asks for
URLs and never uses them cannot grow the table without bound.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from cri_py.errors import ResourceExhausted

DEFAULT_MAX_TOKENS = 1000


@dataclass
class StreamRequest:
    """What a token stands for: one exec or attach (container) or port-forward (sandbox)."""

    kind: Literal["exec", "attach", "portforward"]
    id: str  # container id for exec and attach, sandbox id for port-forward
    cmd: list[str] = field(default_factory=list)
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False
    tty: bool = False
    ports: list[int] = field(default_factory=list)


class TokenCache:
    """Token -> StreamRequest, single use, with expiry and a size bound."""

    def __init__(
        self, ttl_seconds: float, max_tokens: int = DEFAULT_MAX_TOKENS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = float(ttl_seconds)
        self.max_tokens = max_tokens
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, StreamRequest]] = OrderedDict()  # insertion = expiry order

    def _expire(self) -> None:
        now = self.clock()
        while self._entries:
            token, (deadline, _) = next(iter(self._entries.items()))
            if deadline > now:
                break
            del self._entries[token]

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def insert(self, request: StreamRequest) -> str:
        """Store `request`; returns its new token."""
        self._expire()
        if len(self._entries) >= self.max_tokens:
            raise ResourceExhausted(f"too many outstanding streaming requests (max {self.max_tokens})")
        token = secrets.token_urlsafe(24)
        self._entries[token] = (self.clock() + self.ttl, request)
        return token

    def consume(self, token: str) -> StreamRequest | None:
        """The request for `token`, removing it; None if unknown, used or expired."""
        self._expire()
        entry = self._entries.pop(token, None)
        return entry[1] if entry is not None else None
