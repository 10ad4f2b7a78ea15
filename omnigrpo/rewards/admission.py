"""What the reward server lets in: a memory budget, a cap on requests in flight, and the limits of one image.

Why: a small PNG can declare 10000 x 10000 white pixels, 300 MB once decoded, and a few such requests decoded side
by side take the machine down. So every request reserves what it will hold *before* holding it (its body as the
bytes arrive, the parsed JSON and PNG bytes, then the pixels its images declare and the largest decode) and gives
it back when answered: 503 when it cannot fit now, 413 when it never could. A request counts towards
``max_pending`` only once its body has arrived, so slow senders cannot lock good clients out (docs/rewards.md).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, fields

MB = 2**20
CONTAINER_BYTES = 100
"""Bytes one JSON object or list of a request body takes once parsed (an empty dict in a list: about 75)."""
PIXEL_BYTES = 3
"""Bytes per pixel of the decoded RGB batch ``[N, H, W, 3]`` uint8."""
DECODE_BYTES = 12
"""Bytes per pixel of one image while it is decoded, on top: PIL's pixels (up to 4 bytes), its RGB image (4) if
it had another mode, and the bytes numpy copies from it (Pillow builds them in pieces, then joins them)."""


@dataclass(frozen=True)
class Limits:
    """The server's limits; every one is on the ``serve-reward`` command line."""

    max_body_mb: int = 64
    """Largest request body; a larger one is refused (413) before it is read."""
    max_pixels: int = 4096 * 4096
    """Most pixels one image may declare in its PNG header (413 over it, checked before decoding)."""
    memory_mb: int = 1024
    """Memory all requests in flight may hold together (bodies, parsed JSON, PNG bytes, pixels)."""
    max_pending: int = 64
    """Requests in flight whose body has arrived (decoded, queued or being scored); one more is answered 503."""
    request_timeout_s: float = 300.0
    """Deadline of one request from its first byte to its scores; over it, 504 (the judge call goes on)."""
    max_images: int = 256
    """Most images in one request (413 over it, checked before any is opened)."""
    header_timeout_s: float = 10.0
    """Time a connection has to send its request headers, from connecting or its previous answer; then closed."""
    body_timeout_s: float = 60.0
    """Time a request has to send its whole body once its headers arrived; then 408 and the connection closed."""
    max_connections: int = 512
    """Open connections at most (kept below the process's open-file limit); one more is closed at once."""
    max_connections_per_client: int = 64
    """Open connections at most from one client address; one more is closed at once."""

    def check(self) -> None:
        """Raises ValueError naming the first limit that is not a positive finite number."""
        for name in (f.name for f in fields(self)):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")


class Refused(Exception):
    """A request the server will not take, with the HTTP status that says whether retrying can help."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Admission:
    """The shared budget: a ``ticket`` per request, which ``take``s bytes as it grows, ``enter``s the
    requests in flight once its body has arrived, and ``leave``s when answered."""

    def __init__(self, limits: Limits):
        limits.check()
        self.limits = limits
        self.budget = limits.memory_mb * MB
        self.used = 0
        self.pending = 0
        self.peak = 0
        self._lock = threading.Lock()

    def ticket(self) -> Ticket:
        """A ticket for one request, holding nothing and not yet in flight."""
        return Ticket(self)

    def _enter(self) -> None:
        with self._lock:
            if self.pending >= self.limits.max_pending:
                raise Refused(503, f"{self.pending} requests in flight, the most this server takes; retry later")
            self.pending += 1

    def _take(self, held: int, nbytes: int) -> None:
        with self._lock:
            if held + nbytes > self.budget:
                raise Refused(413, f"the request needs over {(held + nbytes) // MB} MB, more than this server's "
                                   f"whole budget of {self.limits.memory_mb} MB")
            if self.used + nbytes > self.budget:
                raise Refused(503, f"the server's {self.limits.memory_mb} MB are held by other requests; retry later")
            self.used += nbytes
            self.peak = max(self.peak, self.used)

    def _leave(self, held: int, entered: bool) -> None:
        with self._lock:
            self.used -= held
            self.pending -= entered


class Ticket:
    """One request's share of the budget (thread-safe through its admission's lock)."""

    def __init__(self, admission: Admission):
        self.admission, self.held, self.entered, self.closed = admission, 0, False, False

    def take(self, nbytes: int) -> None:
        """Reserve ``nbytes`` more, or raise :class:`Refused` (413 if it could never fit, else 503)."""
        self.admission._take(self.held, nbytes)
        self.held += nbytes

    def enter(self) -> None:
        """Count the request in flight, or raise :class:`Refused` (503) when ``max_pending`` already are."""
        self.admission._enter()
        self.entered = True

    def leave(self) -> None:
        """Give everything back (idempotent)."""
        if not self.closed:
            self.closed = True
            self.admission._leave(self.held, self.entered)


def pixel_bytes(sizes: list[tuple[int, int]]) -> int:
    """Bytes that decoding images of these ``(width, height)`` holds at its peak."""
    counts = [w * h for w, h in sizes]
    return PIXEL_BYTES * sum(counts) + DECODE_BYTES * max(counts, default=0)
