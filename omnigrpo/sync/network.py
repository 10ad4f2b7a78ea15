"""Where a process group binds and meets: loopback and a file store on one machine, the node's own address
and a TCP store across hosts.

Why: on the private local cluster every socket stays on loopback and the groups meet through a file, which
opens no listening socket at all. On a cluster of several hosts each member must bind the address other
hosts reach it at (the one Ray reports for its node), and file locking on network file systems is too
fragile to meet through, so the groups meet at a TCP store served by their rank 0 on its node address.
"""

from __future__ import annotations

import datetime
import socket

import torch.distributed as dist

LOOPBACK = "127.0.0.1"


def is_loopback(address: str) -> bool:
    """Is ``address`` this machine's loopback?

    >>> is_loopback("127.0.0.1"), is_loopback("10.0.0.2")
    (True, False)
    """
    return address.startswith("127.") or address in ("localhost", "::1")


def interface_of(address: str) -> str:
    """The name of this machine's network interface that holds ``address`` (gloo and NCCL bind by name)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family in (socket.AF_INET, socket.AF_INET6) and a.address.split("%")[0] == address for a in addrs):
            return name
    raise OSError(f"no network interface of this machine has the address {address}")


def serve_store(host: str, size: int, timeout_s: float) -> tuple[Served, str]:
    """A TCP store served here on ``host`` only (a free port; torch's own server would listen on every
    interface), for ``size`` members; returns it and its ``tcp://host:port`` spec for the others."""
    listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    port = listener.getsockname()[1]
    store = dist.TCPStore(host, port, size, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=listener.fileno())
    return Served(store, listener), f"tcp://{host}:{port}"


class Served:
    """A served store and the listening socket it owns (kept open as long as the store is)."""

    def __init__(self, store: dist.TCPStore, listener: socket.socket):
        self.store, self.listener = store, listener


def open_store(spec: str, size: int, timeout_s: float) -> dist.Store:
    """The store ``spec`` names: ``tcp://host:port`` (a client of rank 0's :func:`serve_store`) or a file path."""
    if spec.startswith("tcp://"):
        host, _, port = spec.removeprefix("tcp://").rpartition(":")
        return dist.TCPStore(host, int(port), size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.FileStore(spec.removeprefix("file://"), size)
