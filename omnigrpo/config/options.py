"""Command-line option values: a count, a port, a finite number, a Host header value (each refused by argparse
with its flag), and an output path that must not be written over unasked.

Why: ``--samples -3`` or ``--port 70000`` or ``--max-wait-ms nan`` must end in one ``omnigrpo:`` line
naming the flag (argparse prefixes the message with it), not in a traceback minutes later.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

from omnigrpo.config.loader import ConfigError


def count(least: int = 1) -> Callable[[str], int]:
    """An integer of at least ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    parse.__name__ = "count"  # argparse names the type in some messages
    return parse


def port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    value = count(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {value}")
    return value


HOST_HEADER = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


def host_header(text: str) -> str:
    """A ``Host`` header value: a name or address, with an optional port (an IPv6 address in brackets)."""
    if not HOST_HEADER.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:100]!r} is not a Host header value (NAME or NAME:PORT)")
    return text


def finite(least: float = 0.0, above: bool = False) -> Callable[[str], float]:
    """A finite number of at least ``least`` (more than ``least`` when ``above``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < least or (above and value == least):
            raise argparse.ArgumentTypeError(f"must be {'more than' if above else 'at least'} {least:g}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def writable(path: Path, flag: str, force: bool) -> None:
    """Refuse (a :class:`ConfigError` naming ``flag`` and the path) to write over an existing file unless ``force``, or
    to write a file where a directory is."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file path")
    if path.exists() and not force:
        raise ConfigError(f"{flag} {path}: exists; refusing to write over it (add --force)")
