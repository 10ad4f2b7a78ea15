"""What the reward server lets in: a memory budget, a cap on requests in flight, and the limits of one image.

Why: a 316 KB PNG can declare 10000x10000 white pixels, 300 MB once decoded; forty such requests decoded
side by side take the machine down and the server stops answering anyone. So every request reserves
what it will hold *before* holding it — its body as the bytes arrive, the parsed JSON and the PNG bytes
(twice the body), then the pixels its images declare in their headers — and gives it all back when it
is answered. A request that cannot fit now is answered 503 (clients retry with backoff); one that
could never fit, or an image over ``max_pixels``, 413. Held memory is therefore at most
``memory_mb`` plus one request's overshoot of its last chunk, whatever the clients send.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

MB = 2**20
PIXEL_BYTES = 3
"""Bytes per pixel of the decoded RGB batch ``[N, H, W, 3]`` uint8."""
DECODE_BYTES = 8
"""Bytes per pixel of one image while it is decoded (PIL's 4-byte pixels, then the RGB copy), on top."""


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
    """Requests in flight (read, queued or being scored); one more is answered 503."""
    request_timeout_s: float = 300.0
    """Deadline of one request from its first byte to its scores; over it, 504 (the judge call goes on)."""

    def check(self) -> None:
        """Raises ValueError naming the first limit that is not a positive finite number."""
        for name in ("max_body_mb", "max_pixels", "memory_mb", "max_pending", "request_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")


class Refused(Exception):
    """A request the server will not take, with the HTTP status that says whether retrying can help."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Admission:
    """The shared budget: ``enter`` a request, ``take`` bytes as it grows, ``leave`` when answered."""

    def __init__(self, limits: Limits):
        limits.check()
        self.limits = limits
        self.budget = limits.memory_mb * MB
        self.used = 0
        self.pending = 0
        self.peak = 0
        self._lock = threading.Lock()

    def enter(self) -> Ticket:
        """A ticket for one request; 503 when ``max_pending`` requests are already in flight."""
        with self._lock:
            if self.pending >= self.limits.max_pending:
                raise Refused(503, f"{self.pending} requests in flight, the most this server takes; retry later")
            self.pending += 1
        return Ticket(self)

    def _take(self, held: int, nbytes: int) -> None:
        with self._lock:
            if held + nbytes > self.budget:
                raise Refused(413, f"the request needs over {(held + nbytes) // MB} MB, more than this server's "
                                   f"whole budget of {self.limits.memory_mb} MB")
            if self.used + nbytes > self.budget:
                raise Refused(503, f"the server's {self.limits.memory_mb} MB are held by other requests; retry later")
            self.used += nbytes
            self.peak = max(self.peak, self.used)

    def _leave(self, held: int) -> None:
        with self._lock:
            self.used -= held
            self.pending -= 1


class Ticket:
    """One request's share of the budget (thread-safe through its admission's lock)."""

    def __init__(self, admission: Admission):
        self.admission, self.held, self.closed = admission, 0, False

    def take(self, nbytes: int) -> None:
        """Reserve ``nbytes`` more, or raise :class:`Refused` (413 if it could never fit, else 503)."""
        self.admission._take(self.held, nbytes)
        self.held += nbytes

    def leave(self) -> None:
        """Give everything back (idempotent)."""
        if not self.closed:
            self.closed = True
            self.admission._leave(self.held)


def pixel_bytes(sizes: list[tuple[int, int]]) -> int:
    """Bytes that decoding images of these ``(width, height)`` holds at its peak."""
    counts = [w * h for w, h in sizes]
    return PIXEL_BYTES * sum(counts) + DECODE_BYTES * max(counts, default=0)
