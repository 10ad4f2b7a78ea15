"""The reward server's connections: a timer that closes slow and idle ones, and caps in all and per client.

Why: uvicorn closes an idle connection only after a first answer, and its ``limit_concurrency`` counts idle
connections beside real requests, so a few dozen sockets that send nothing, or headers a byte at a time, would hold
the server's file descriptors for good. :class:`GuardedH11Protocol` (uvicorn's own h11 protocol, given as ``http=``)
closes a connection that sends no request headers within ``header_timeout_s`` and refuses new ones past
``max_connections`` or ``max_connections_per_client`` (docs/rewards.md, "Reward services").
"""

from __future__ import annotations

import asyncio
import functools
import resource
from collections import Counter
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from omnigrpo.rewards.admission import Limits

FD_MARGIN = 64
"""File descriptors kept free under the soft open-file limit: the listening socket, logs, a judge's files."""


def connection_cap(max_connections: int) -> int:
    """``max_connections``, lowered to the soft ``RLIMIT_NOFILE`` less :data:`FD_MARGIN` (at least 1)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - FD_MARGIN))


class Connections:
    """The open connections of one server, counted in all and by client address (one event loop: no lock)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.cap = connection_cap(limits.max_connections)
        self.open = 0
        self.by_client: Counter[str] = Counter()
        self.refused = 0

    def admit(self, client: str) -> bool:
        """Count a new connection from ``client``, or False when it is one too many (in all or for it)."""
        if self.open >= self.cap or self.by_client[client] >= self.limits.max_connections_per_client:
            self.refused += 1
            return False
        self.open += 1
        self.by_client[client] += 1
        return True

    def release(self, client: str) -> None:
        """Forget a connection :meth:`admit` counted."""
        self.open -= 1
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]

    def protocol(self) -> Callable[..., GuardedH11Protocol]:
        """What ``uvicorn.Config(http=...)`` takes: it builds one protocol per connection, counted here."""
        return functools.partial(GuardedH11Protocol, connections=self)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and the caps of :class:`Connections`."""

    def __init__(self, *args: Any, connections: Connections, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.guard = connections
        self.peer = ""
        self.counted = False
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.peer = self.client[0] if self.client else ""
        if not self.guard.admit(self.peer):
            transport.close()
            return
        self.counted = True
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.counted:
            self.counted = False
            self.guard.release(self.peer)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # the next request's headers are due (a pipelined one already here disarms it at once)
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self.header_timer = self.loop.call_later(self.guard.limits.header_timeout_s, self._close_late)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _close_late(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.transport.close()
