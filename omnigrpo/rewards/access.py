"""Who may reach the reward server: the interfaces it binds without a token, and the ``Host`` it answers.

Why: a server on loopback is still reachable from a web page in the machine's browser, through DNS
rebinding (the page's own name resolving to 127.0.0.1) if not directly. So a server binds anything but
loopback only with a token (:class:`PublicBindRefused`), and answers only requests whose ``Host`` header
names an address it is bound to, or a name it was told to allow (:class:`HostCheck`, 421 otherwise). A
wildcard bind (``0.0.0.0``, ``::``) needs a token already and answers any host unless names are given.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
"""Host names a loopback server also answers to."""


class PublicBindRefused(ValueError):
    """Binding an interface other than loopback without a token would let anyone on the network score."""


def is_loopback(host: str) -> bool:
    """Does ``host`` (an address or a name) only reach this machine?"""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def served_hosts(host: str, port: int, allowed: Collection[str] = ()) -> frozenset[str] | None:
    """The ``Host`` header values (lower case) a server bound to address ``host`` and ``port`` answers; None: any.

    Its address (on loopback also :data:`LOOPBACK_NAMES`) with the port, and each of ``allowed`` as
    given and with the port; a wildcard address takes any host unless ``allowed`` names some.
    """
    wildcard = ipaddress.ip_address(host).is_unspecified
    if wildcard and not allowed:
        return None
    names = set() if wildcard else {f"[{host}]" if ":" in host else host}
    if is_loopback(host):
        names.update(LOOPBACK_NAMES)
    served = {f"{name}:{port}" for name in names | set(allowed)} | set(allowed)
    return frozenset(name.lower() for name in served)


class HostCheck:
    """ASGI middleware: 421 for a request whose ``Host`` header is none of ``hosts`` (lower case)."""

    def __init__(self, app: ASGIApp, hosts: Collection[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = Headers(scope=scope).get("host", "") if scope["type"] == "http" else ""
        if scope["type"] == "http" and host.lower() not in self.hosts:
            message = f"this server does not answer Host {host[:100]!r} (serve-reward --allowed-host adds one)"
            await JSONResponse({"error": message}, status_code=421, headers={"Connection": "close"})(scope, receive,
                                                                                                  send)
            return
        await self.app(scope, receive, send)
