"""Files a user names as input (a config, a prompt file): read only when they are regular files of sane size.

Why: a path can name a FIFO (opening it waits for a writer that never comes), a device (``/dev/zero`` reads until
memory runs out), a directory, or a link to any of these. Each is refused here by ``stat`` (which follows links)
before the file is opened, and a file past :data:`MAX_INPUT_BYTES` is refused instead of read whole.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_INPUT_BYTES = 1 << 30
"""Largest input file read (1 GiB): far past any real config or prompt set, short of exhausting memory."""
KINDS = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device",
         stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


class InputFileError(ValueError):
    """An input path that is not a readable regular file within the size limit; the message names it."""


def regular_file(path: Path, limit: int | None = None) -> int:
    """The size of ``path`` when it (or what its links lead to) is a regular file of at most ``limit`` bytes
    (default :data:`MAX_INPUT_BYTES`); raises FileNotFoundError when nothing is there, InputFileError for anything
    else. Never opens the path."""
    limit = MAX_INPUT_BYTES if limit is None else limit
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in KINDS.items() if test(info.st_mode)), "a special file")
        via = f" (a link to {path.resolve()})" if path.is_symlink() else ""
        raise InputFileError(f"{path}: is {kind}{via}, not a regular file")
    if info.st_size > limit:
        raise InputFileError(f"{path}: {info.st_size} bytes, over the limit of {limit} for an input file")
    return info.st_size


def read_input(path: Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file checked by :func:`regular_file`; read at most ``limit`` bytes (a file that
    grows past it while read is refused too)."""
    limit = MAX_INPUT_BYTES if limit is None else limit
    regular_file(path, limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # swapped for a FIFO since the stat: no wait on a writer
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputFileError(f"{path}: is no longer a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputFileError(f"{path}: over the limit of {limit} bytes for an input file")
    return data
