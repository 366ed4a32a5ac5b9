"""The copy engine: two asyncio Protocols tied together, for kernels without socket splice.

Theory of operation.  Each socket gets a `_Leg` protocol whose peer is the
other leg.  Bytes received on one leg are written to the peer's transport at
once (uvloop tries the send immediately; only the rest is buffered).  When a
peer transport's buffer passes `copy_buffer`, its `pause_writing` pauses
reading on this leg, and `resume_writing` resumes it, so memory per
connection is bounded by two write buffers.  Flags make repeated pauses and
resumes no-ops.

An EOF is forwarded with `write_eof` (half-close), not turned into a close;
the relay closes when both sides have sent EOF.  A leg lost with an error
(reset, broken pipe) aborts its peer with SO_LINGER 0, which sends a reset.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

from gearproxy.proxy.poller import BusyPoll
from gearproxy.proxy.splice import LINGER_RESET


class _Leg(asyncio.Protocol):
    __slots__ = ("eof", "lost", "paused_peer", "peer", "relay", "stash", "total", "transport",
                 "write")

    def __init__(self, relay: CopyRelay) -> None:
        self.relay = relay
        self.transport: Any = None
        self.write: Callable[[bytes], None] | None = None
        self.peer: _Leg | None = None
        self.total = 0
        self.eof = False
        self.lost = False
        self.paused_peer = False
        self.stash: list[bytes] | None = None   # bytes that came before the peer existed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr: Any = transport
        tr.set_write_buffer_limits(high=self.relay.buffer)
        self.transport = tr

    def data_received(self, data: bytes) -> None:
        busy = self.relay.busy
        if busy is not None:
            busy.touch()
        self.total += len(data)
        write = self.write
        if write is not None:
            write(data)
        elif self.stash is None:              # before the link: hold one chunk, stop reading
            self.stash = [data]
            self.transport.pause_reading()
        else:
            self.stash.append(data)

    def link(self, peer: _Leg) -> None:
        """Connect this leg to its peer: flush what came early, then read freely."""
        self.peer = peer
        self.write = peer.transport.write
        stash, self.stash = self.stash, None
        if stash is not None:
            for data in stash:
                peer.transport.write(data)
            if not self.eof:
                self.transport.resume_reading()
        if self.eof:
            peer.transport.write_eof()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None:
            return True                       # forwarded by link()
        if peer.lost:
            return False
        if peer.eof:
            self.relay.close(False)
            return True
        try:
            peer.transport.write_eof()
        except OSError:
            self.relay.close(True)
        return True

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and not self.paused_peer and not peer.lost:
            self.paused_peer = True
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and self.paused_peer and not peer.lost:
            self.paused_peer = False
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.leg_lost(self, exc)


class CopyRelay:
    """A client/backend socket pair relayed by two Protocols with back-pressure."""

    __slots__ = (
        "attach",
        "backend",
        "backend_stats",
        "blog",
        "buffer",
        "busy",
        "client",
        "clog",
        "closed",
        "listener_stats",
        "loop",
        "on_close",
        "reported",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, client: _socket.socket,
                 backend: _socket.socket, buffer: int, on_close: Callable[[Any], None],
                 listener_stats: Any, backend_stats: Any, busy: BusyPoll | None = None) -> None:
        self.loop = loop
        self.busy = busy
        # The loop's transports want the full socket.socket around each fd.
        self.client = _full(client)
        self.backend = _full(backend)
        self.buffer = buffer
        self.on_close = on_close
        self.listener_stats = listener_stats
        self.backend_stats = backend_stats
        self.closed = False
        self.reported = False
        self.attach: asyncio.Task[None] | None = None     # held: the loop keeps only weak refs
        self.clog = _Leg(self)
        self.blog = _Leg(self)

    @property
    def bytes_in(self) -> int:
        return self.clog.total

    @property
    def bytes_out(self) -> int:
        return self.blog.total

    def counts(self) -> tuple[int, int]:
        return self.clog.total, self.blog.total

    def start(self) -> None:
        self.attach = self.loop.create_task(self._attach())

    async def _attach(self) -> None:
        try:
            await self._attach_legs()
        finally:
            self.attach = None

    async def _attach_legs(self) -> None:
        loop = self.loop
        clog, blog = self.clog, self.blog
        try:
            await loop.connect_accepted_socket(lambda: clog, self.client)
            await loop.connect_accepted_socket(lambda: blog, self.backend)
        except (OSError, RuntimeError):
            self.close(True)
            return
        if self.closed or clog.lost or blog.lost:
            self.close(True)
            return
        try:
            clog.link(blog)
            blog.link(clog)
            if clog.eof and blog.eof:
                self.close(False)
        except OSError:
            self.close(True)

    def leg_lost(self, leg: _Leg, exc: Exception | None) -> None:
        other = self.blog if leg is self.clog else self.clog
        if not other.lost and other.transport is not None:
            if exc is not None:
                _abort(other.transport)
            else:
                other.transport.close()
        if (self.clog.lost or self.clog.transport is None) and \
                (self.blog.lost or self.blog.transport is None):
            self._report()

    def close(self, reset: bool = False) -> None:
        """Close both sides; `reset` sends RST (SO_LINGER 0) instead of flushing and FIN."""
        if self.closed:
            return
        self.closed = True
        attached = False
        for leg, sock in ((self.clog, self.client), (self.blog, self.backend)):
            if leg.transport is None:
                if reset:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                sock.close()
            elif not leg.lost:
                attached = True
                if reset:
                    _abort(leg.transport)
                else:
                    leg.transport.close()
        if not attached:
            self._report()

    def _report(self) -> None:
        self.closed = True
        if not self.reported:
            self.reported = True
            self.on_close(self)


def _abort(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    transport.abort()


def _full(sock: _socket.socket) -> socket.socket:
    return socket.socket(sock.family, sock.type, sock.proto, sock.detach())
