"""The splice engine: socket -> pipe -> socket in the kernel, driven by raw fd callbacks.

Theory of operation.  Each direction of a connection is a `_Pump` with a
source and a destination socket.  While the destination keeps up, only the
source's reader is registered: on each wake-up the pump borrows a pipe from
the pool, splices source -> pipe -> destination until the source says EAGAIN
(bounded per wake-up for fairness), and gives the pipe back, so an idle
connection holds no pipe.  When the destination cannot take everything, the
bytes stay in the pipe, the pump swaps its source reader for a destination
writer, and swaps back once the pipe is empty: registrations change only when
the pipe fills or empties, never per call.

Small messages skip the pipe: a pump in request/response mode (its last read
was under `_SMALL`) reads once into the process's shared buffer and writes
straight to the destination, so a message costs no pipe borrow and return and
no Python-level pipe bookkeeping.  A read that fills the buffer switches the
pump to splicing for the rest of the wake-up and after; a short splice read
switches it back.  Bytes the destination refuses go into a borrowed (empty)
pipe and the pump blocks exactly as above.

Where callbacks live: a new relay's two sockets go into the process's private
epoll set (`Poller`: one epoll_ctl per socket, none at close).  After `_PROMOTE`
wake-ups of one direction the relay moves to the loop's own add_reader/add_writer,
which costs more to set up but saves the nested epoll_wait on every message, so
short connections and long-lived ones each get the cheaper path.

States of a pump: READING (reader on src) -> BLOCKED (writer on dst, pipe
holds bytes) -> READING ... -> DONE (src said EOF; dst shut for writing).
The relay closes both sockets when both pumps are DONE.  Any socket error
(ECONNRESET, EPIPE) closes both with SO_LINGER 0, so a reset on one side is
a reset on the other.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import fcntl
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Any

from gearproxy.proxy.poller import Poller

F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
_NONBLOCK = os.SPLICE_F_NONBLOCK if hasattr(os, "SPLICE_F_NONBLOCK") else 2
_ROUNDS = 16                     # pipe-fulls moved per wake-up before yielding to others
# A read this small means the sender is in request/response mode: skip the extra splice
# that would only say EAGAIN (a syscall and an exception per message); the level-triggered
# reader wakes us again if more arrived.  Bulk reads keep draining until EAGAIN.
_SMALL = 16 * 1024
# Wake-ups of one direction after which a relay moves to the loop's own registration.
_PROMOTE = 4
LINGER_RESET = struct.pack("ii", 1, 0)


def pipe_max_size() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 1024 * 1024


class PipePool:
    """Pipe pairs of one size, created on demand and kept (up to `keep`) for reuse."""

    def __init__(self, want_size: int, keep: int) -> None:
        self.keep = keep
        self.free: list[tuple[int, int]] = []
        self.want = max(4096, min(want_size, pipe_max_size()))
        self.size = self.want
        pair = self._new()
        self.size = fcntl.fcntl(pair[1], F_GETPIPE_SZ)
        self.free.append(pair)
        # One per process: callbacks never interleave, and a pump never leaves bytes here.
        self.buf = bytearray(min(_SMALL, self.size))
        self.view = memoryview(self.buf)

    def _new(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):   # EPERM over the user's pipe quota: keep default
            fcntl.fcntl(w, F_SETPIPE_SZ, self.want)
        return r, w

    def get(self) -> tuple[int, int]:
        free = self.free
        return free.pop() if free else self._new()

    def put(self, r: int, w: int) -> None:
        if len(self.free) < self.keep:
            self.free.append((r, w))
        else:
            os.close(r)
            os.close(w)

    def close(self) -> None:
        for r, w in self.free:
            os.close(r)
            os.close(w)
        self.free.clear()


class _Pump:
    """One direction of a relay: src socket -> pipe -> dst socket."""

    __slots__ = ("busy", "dfd", "done", "dst", "on_read", "on_write", "pending", "pipes", "poller",
                 "pr", "pw", "reading", "reg", "relay", "sfd", "size", "small", "total", "wakes",
                 "writing")

    def __init__(self, relay: SpliceRelay, poller: Poller, src: _socket.socket,
                 dst: _socket.socket, pipes: PipePool) -> None:
        self.relay = relay
        self.poller = poller
        self.busy = poller.busy           # looked up once per connection, not per read
        # Where the callbacks are registered: the private set, then the loop once promoted.
        self.reg: Poller | asyncio.AbstractEventLoop = poller
        self.wakes = 0
        self.dst = dst
        self.sfd = src.fileno()
        self.dfd = dst.fileno()
        self.pipes = pipes
        self.size = pipes.size
        self.pr = -1
        self.pw = -1
        self.pending = 0
        self.total = 0
        self.reading = False
        self.writing = False
        self.done = False
        self.small = True                 # last read was small: copy, don't splice
        self.on_read = self.readable      # bound once, not per registration
        self.on_write = self.writable

    def start(self) -> None:
        self.reading = True
        self.reg.add_reader(self.sfd, self.on_read)

    def readable(self) -> None:
        if self.busy is not None:
            self.busy.touch()
        self.wakes += 1
        if self.wakes == _PROMOTE:
            self.relay.promote()
        if self.small and self.pr < 0 and self._copy():
            return
        pr = self.pr
        if pr < 0:
            try:
                pr, self.pw = self.pipes.get()
            except OSError:
                self.relay.close(True)
                return
            self.pr = pr
        pw = self.pw
        src = self.sfd
        dst = self.dfd
        size = self.size
        splice = os.splice
        try:
            for _ in range(_ROUNDS):
                try:
                    n = splice(src, pw, size, flags=_NONBLOCK)
                except BlockingIOError:
                    break
                if n == 0:
                    self._eof()
                    return
                self.total += n
                pending = n
                while pending:
                    try:
                        pending -= splice(pr, dst, pending, flags=_NONBLOCK)
                    except BlockingIOError:
                        self.pending = pending
                        self._block()
                        return
                if n < _SMALL:
                    self.small = True
                    break
        except OSError:
            self.relay.close(True)
            return
        self._release()

    def _copy(self) -> bool:
        """Move one small read through the shared buffer; False: it filled it, splice on."""
        pipes = self.pipes
        view = pipes.view
        try:
            n = os.readv(self.sfd, (view,))
        except BlockingIOError:
            return True
        except OSError:
            self.relay.close(True)
            return True
        if n == 0:
            self._eof()
            return True
        self.total += n
        try:
            sent = os.write(self.dfd, view[:n])
        except BlockingIOError:
            sent = 0
        except OSError:
            self.relay.close(True)
            return True
        if sent < n:
            # The empty pipe holds at least the buffer's size, so this write is whole.
            try:
                self.pr, self.pw = pipes.get()
                os.write(self.pw, view[sent:n])
            except OSError:
                self.relay.close(True)
                return True
            self.pending = n - sent
            self._block()
            return True
        if n < len(view):
            return True
        self.small = False
        return False

    def writable(self) -> None:
        pending = self.pending
        pr = self.pr
        dst = self.dfd
        try:
            while pending:
                pending -= os.splice(pr, dst, pending, flags=_NONBLOCK)
        except BlockingIOError:
            self.pending = pending
            return
        except OSError:
            self.relay.close(True)
            return
        self.pending = 0
        self.writing = False
        self.reg.remove_writer(dst)
        self._release()
        self.reading = True
        self.reg.add_reader(self.sfd, self.on_read)

    def _block(self) -> None:
        self.reading = False
        try:
            self.reg.remove_reader(self.sfd)
            self.reg.add_writer(self.dfd, self.on_write)
        except OSError:                  # epoll out of memory: this relay cannot go on
            self.relay.close(True)
            return
        self.writing = True

    def _release(self) -> None:
        if self.pr >= 0:
            self.pipes.put(self.pr, self.pw)
            self.pr = self.pw = -1

    def _eof(self) -> None:
        self._release()
        self.done = True
        if self.relay.other_done(self):
            # Both directions ended: close() forgets the fds and sends the FIN; an
            # unregister or a shutdown here would only be more syscalls.
            self.relay.pump_done()
            return
        self.reading = False
        self.reg.remove_reader(self.sfd)
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.relay.close(True)
            return
        self.relay.pump_done()

    def detach(self) -> None:
        """Drop callbacks (no syscall: the relay closes both sockets next) and the pipe."""
        if self.reg is self.poller:
            self.poller.forget(self.sfd)
        else:
            if self.reading:
                self.reg.remove_reader(self.sfd)
            if self.writing:
                self.reg.remove_writer(self.dfd)
        self.reading = self.writing = False
        if self.pr >= 0:
            if self.pending:                  # bytes nobody will read: close, don't pool
                os.close(self.pr)
                os.close(self.pw)
                self.pr = self.pw = -1
            else:
                self._release()
        # Bound methods point back at the pump: drop them so refcounting, not the
        # cyclic GC, frees a closed connection.
        self.on_read = self.on_write = _closed


def _closed() -> None:
    """Callback of a closed pump: never registered, only a cycle breaker."""


class SpliceRelay:
    """A client/backend socket pair relayed with splice(2) in both directions."""

    __slots__ = ("backend", "backend_stats", "client", "closed", "down", "listener_stats",
                 "on_close", "up")

    def __init__(self, poller: Poller, client: _socket.socket,
                 backend: _socket.socket, pipes: PipePool,
                 on_close: Callable[[Any], None], listener_stats: Any, backend_stats: Any) -> None:
        self.client = client
        self.backend = backend
        self.on_close = on_close
        self.listener_stats = listener_stats
        self.backend_stats = backend_stats
        self.closed = False
        self.up = _Pump(self, poller, client, backend, pipes)
        self.down = _Pump(self, poller, backend, client, pipes)

    @property
    def bytes_in(self) -> int:
        return self.up.total

    @property
    def bytes_out(self) -> int:
        return self.down.total

    def counts(self) -> tuple[int, int]:
        return self.up.total, self.down.total

    def start(self) -> None:
        self.up.start()
        self.down.start()
        # A short-lived client has usually sent its request by the time the backend
        # answered the connect: forward it now rather than after another loop turn.
        self.up.readable()

    def promote(self) -> None:
        """Move this long-lived relay's callbacks from the private epoll set to the loop's."""
        for pump in (self.up, self.down):
            poller = pump.poller
            if pump.reg is not poller:
                continue
            loop = poller.loop
            # Into the loop first: if that fails the pump is still registered somewhere.
            if pump.reading:
                loop.add_reader(pump.sfd, pump.on_read)
                poller.remove_reader(pump.sfd)
            if pump.writing:
                loop.add_writer(pump.dfd, pump.on_write)
                poller.remove_writer(pump.dfd)
            pump.reg = loop

    def other_done(self, pump: _Pump) -> bool:
        return (self.down if pump is self.up else self.up).done

    def pump_done(self) -> None:
        if self.up.done and self.down.done:
            self.close(False)

    def close(self, reset: bool = False) -> None:
        """Close both sockets; `reset` sends RST (SO_LINGER 0) instead of FIN."""
        if self.closed:
            return
        self.closed = True
        self.up.detach()
        self.down.detach()
        for sock in (self.client, self.backend):
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            sock.close()
        self.on_close(self)
        # Every path that closes returns at once: no pump reads `relay` after this.
        del self.up.relay, self.down.relay


def splice_works() -> bool:
    """Probe once whether splice(2) from a TCP socket into a pipe works here."""
    try:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return False
    pair: list[socket.socket] = []
    r = w = -1
    try:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        a = socket.create_connection(lsock.getsockname(), timeout=2)
        pair.append(a)
        b, _ = lsock.accept()
        pair.append(b)
        a.sendall(b"x")
        r, w = os.pipe()
        select.select([b], [], [], 2.0)
        b.setblocking(False)
        return os.splice(b.fileno(), w, 1, flags=_NONBLOCK) == 1
    except OSError:
        return False
    finally:
        for s in (lsock, *pair):
            s.close()
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
