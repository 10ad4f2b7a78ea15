"""A cap on what a reward actor's process writes to its stdout and stderr.

Why: a user's judge that prints a line per image, or a library that logs a warning per call, runs in a reward
actor whose output Ray forwards to the driver's terminal and writes to its session logs. Unbounded, it buries
the run's own lines and can fill a disk. :class:`OutputThrottle` puts a pipe in place of file descriptors 1
and 2 (so C code's writes are caught too) and passes on at most ``budget_bytes`` per ``window_s``; the rest is
dropped, counted, and said once per window.
"""

from __future__ import annotations

import os
import sys
import threading
import time


class OutputThrottle:
    """Passes on at most ``budget_bytes`` of this process's stdout and stderr (together) per ``window_s``."""

    def __init__(self, budget_bytes: int, window_s: float = 60.0):
        self.budget, self.window_s = budget_bytes, window_s
        self.start, self.used, self.dropped = time.monotonic(), 0, 0
        self._lock = threading.Lock()

    installed = False
    """This process's output already passes through a throttle (a process has one: the first wins)."""

    @classmethod
    def once(cls, budget_bytes: int, window_s: float = 60.0) -> None:
        """Install a throttle in this process unless one is already in place."""
        if not cls.installed:
            cls(budget_bytes, window_s).install()
            cls.installed = True

    def install(self) -> None:
        """Route file descriptors 1 and 2 through the throttle, each by a daemon thread of its own."""
        for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
            if stream is not None:
                stream.flush()
            target = os.dup(fd)
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            threading.Thread(target=self._pump, args=(read, target), name=f"output-throttle-{fd}",
                             daemon=True).start()

    def _pump(self, read: int, target: int) -> None:
        while chunk := _read(read):
            for out in self.admit(chunk):
                try:
                    os.write(target, out)
                except OSError:  # the log file is gone or the disk is full: keep draining the pipe
                    continue

    def admit(self, chunk: bytes) -> list[bytes]:
        """What to write of ``chunk``: its share of this window's budget, and a note where output is dropped."""
        with self._lock:
            out = []
            now = time.monotonic()
            if now - self.start >= self.window_s:  # a new window: say what the last one dropped
                if self.dropped:
                    out.append(f"omnigrpo: {self.dropped} bytes of reward output were dropped\n".encode())
                self.start, self.used, self.dropped = now, 0, 0
            keep = chunk[: max(0, self.budget - self.used)]
            self.used += len(keep)
            out.append(keep)
            if len(keep) < len(chunk):
                if not self.dropped:
                    out.append(f"\nomnigrpo: reward output is over {self.budget} bytes in {self.window_s:g} s; the "
                               "rest of this window's is dropped\n".encode())
                self.dropped += len(chunk) - len(keep)
            return [b for b in out if b]


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except OSError:
        return b""
