"""Listening sockets, on the host or inside another network namespace, and their accept loop.

Accepting is done on the raw listening fd with the loop's reader callback:
each wake-up accepts until EAGAIN (bounded), which costs one registration per
listener instead of one future per connection, and hands the proxy plain
sockets that either engine can take.  When the process runs out of file
descriptors, accepting pauses briefly instead of spinning.

Accepted connections are `_socket.socket` objects, the C type under
`socket.socket`: `socket.accept()` converts family and type to enums and runs
a Python-level constructor, about 2.5 µs per connection more (measured with
2,000 accepts on loopback), and the engines need none of what it adds.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from gearproxy.errors import LinkError
from gearproxy.netns import listen_in_netns, make_listener
from gearproxy.proxy.config import Address
from gearproxy.proxy.metrics import ListenerStats

_ACCEPTS_PER_WAKEUP = 128
_EMFILE_PAUSE = 0.1
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_STREAM = int(socket.SOCK_STREAM)

ListenerKey = tuple[str | None, str]


def bind_host(address: Address) -> socket.socket:
    """Bind a host listener; an address in use raises LinkError `address in use: HOST:PORT`."""
    try:
        return make_listener(address.family, address.sockaddr)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise LinkError(f"address in use: {address}") from None
        raise LinkError(f"cannot listen on {address}: {err.strerror}") from None


def bind_netns(netns: str, address: Address) -> socket.socket:
    """Bind a listener inside the network namespace at path `netns` (helper thread)."""
    return listen_in_netns(netns, address.family, address.sockaddr, str(address))


class Listener:
    """One listening socket; calls `handler(sock, listener)` for each accepted connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, address: Address,
                 netns: str | None, stats: ListenerStats,
                 handler: Callable[[_socket.socket, Listener], None]) -> None:
        self.loop = loop
        self.sock = sock
        self.address = address
        self.netns = netns
        self.key: ListenerKey = (netns, str(address))
        self.stats = stats
        self.handler = handler
        # (fd, address) straight from the C method: socket.accept()'s wrapper is skipped.
        self._accept: Callable[[], tuple[int, Any]] = sock._accept  # type: ignore[attr-defined]
        self._family = int(sock.family)
        self.active = False
        self.closed = False
        self._paused: asyncio.TimerHandle | None = None
        # Linux copies TCP_NODELAY from a listening socket to the sockets it accepts:
        # set it once here, check it on the first accepted socket, and only fall back
        # to one setsockopt per connection if it did not carry over.
        self._nodelay_each = True
        self._nodelay_checked = False
        try:
            sock.setsockopt(*_NODELAY)
        except OSError:
            self._nodelay_checked = True

    @property
    def bound(self) -> str:
        """The address actually bound (port 0 resolved), as HOST:PORT."""
        host, port = self.sock.getsockname()[:2]
        return str(Address(host, port))

    def start(self) -> None:
        if not self.active and not self.closed:
            self.active = True
            self.loop.add_reader(self.sock.fileno(), self._on_ready)

    def stop(self) -> None:
        if self.active:
            self.active = False
            self.loop.remove_reader(self.sock.fileno())
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None

    def close(self) -> None:
        self.stop()
        if not self.closed:
            self.closed = True
            self.sock.close()

    def _on_ready(self) -> None:
        accept = self._accept
        family = self._family
        make = _socket.socket
        handler = self.handler
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                fd, _addr = accept()
                try:
                    conn = make(family, _STREAM, 0, fd)
                except OSError:
                    os.close(fd)
                    raise
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.stop()
                    self._paused = self.loop.call_later(_EMFILE_PAUSE, self._unpause)
                # ECONNABORTED and friends: that one connection is gone; keep going
                return
            conn.setblocking(False)
            if self._nodelay_each:
                if self._nodelay_checked:
                    conn.setsockopt(*_NODELAY)
                else:
                    self._first_accepted(conn)
            handler(conn, self)

    def _first_accepted(self, conn: _socket.socket) -> None:
        self._nodelay_checked = True
        try:
            inherited = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        except OSError:
            inherited = False
        self._nodelay_each = not inherited
        if not inherited:
            conn.setsockopt(*_NODELAY)

    def _unpause(self) -> None:
        self._paused = None
        self.start()
