"""A private epoll set for connection sockets, woken through one reader of the event loop.

Why not the loop's own add_reader/add_writer: on uvloop each first registration of
an fd builds a libuv poll handle, whose init probes the fd with an epoll ADD and
DEL and an ioctl, raises and catches two KeyErrors, and looks the fd up in a
WeakValueDictionary; removing it costs two more epoll DELs (one fails).  A short
connection registers two sockets, so that was about 12 epoll_ctl calls and
2 ioctls per connection, measured with `strace -c`.  Here a socket costs one
epoll ADD for its whole life, a MOD only when a pump blocks or unblocks, and
nothing at close: closing the last fd of a socket takes it out of the epoll set.

The set is level-triggered, like the loop's readers.  One wake-up of the loop
handles at most `_BATCH` events; more stay pending and the loop wakes again at
once, so other loop work (timers, the control socket) still runs between batches.
An fd that leaves the set during a batch (forgotten and closed, or unregistered)
has its remaining events in that batch dropped: its number may already belong to
a new socket, whose own readiness the next poll reports (libuv does the same).
"""

from __future__ import annotations

import asyncio
import os
import select
from collections.abc import Callable

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
# A hang-up or error wakes both sides: the reader reads EOF or the error, the writer
# gets EPIPE; either path closes the relay.
_READ_EVENTS = _IN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
_WRITE_EVENTS = _OUT | select.EPOLLHUP | select.EPOLLERR
_BATCH = 64

Callback = Callable[[], None]


class Poller:
    """Reader and writer callbacks for raw fds, in one epoll set the loop watches."""

    __slots__ = ("_dispatching", "_ep", "_gone", "_masks", "_poll", "busy", "loop", "readers",
                 "writers")

    def __init__(self, loop: asyncio.AbstractEventLoop, busy: BusyPoll | None = None) -> None:
        self.loop = loop
        self.busy = busy                       # engines call busy.touch() on each read
        self._ep = select.epoll()              # close-on-exec
        self._poll = self._ep.poll
        self._masks: dict[int, int] = {}
        self._dispatching = False
        self._gone: set[int] = set()           # fds that left the set during this batch
        self.readers: dict[int, Callback] = {}
        self.writers: dict[int, Callback] = {}
        loop.add_reader(self._ep.fileno(), self._dispatch)

    def close(self) -> None:
        if not self._ep.closed:
            self.loop.remove_reader(self._ep.fileno())
            self._ep.close()
        self.readers.clear()
        self.writers.clear()
        self._masks.clear()

    def _dispatch(self) -> None:
        readers = self.readers
        writers = self.writers
        gone = self._gone
        self._dispatching = True
        try:
            for fd, events in self._poll(0, _BATCH):
                if gone and fd in gone:
                    continue
                cb = readers.get(fd) if events & _READ_EVENTS else None
                if cb is not None:
                    cb()
                    if gone and fd in gone:          # the reader closed it
                        continue
                if events & _WRITE_EVENTS and (cb := writers.get(fd)) is not None:
                    cb()
        finally:
            self._dispatching = False
            gone.clear()

    def _set(self, fd: int, mask: int) -> None:
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        if not old:
            self._ep.register(fd, mask)
            self._masks[fd] = mask
        elif mask:
            self._ep.modify(fd, mask)
            self._masks[fd] = mask
        else:
            self._ep.unregister(fd)
            del self._masks[fd]
            if self._dispatching:
                self._gone.add(fd)

    def add_reader(self, fd: int, callback: Callback) -> None:
        old = self._masks.get(fd, 0)
        if not old:                            # the common case, spelled out: no _set call
            self._ep.register(fd, _IN)
            self._masks[fd] = _IN
        elif not old & _IN:
            self._set(fd, old | _IN)
        self.readers[fd] = callback            # only once registered: a failure leaves no trace

    def remove_reader(self, fd: int) -> None:
        if self.readers.pop(fd, None) is not None:
            self._set(fd, self._masks.get(fd, 0) & ~_IN)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._set(fd, self._masks.get(fd, 0) | _OUT)
        self.writers[fd] = callback

    def remove_writer(self, fd: int) -> None:
        if self.writers.pop(fd, None) is not None:
            self._set(fd, self._masks.get(fd, 0) & ~_OUT)

    def forget(self, fd: int) -> None:
        """Drop `fd`'s callbacks without a syscall: the caller closes it next."""
        self.readers.pop(fd, None)
        self.writers.pop(fd, None)
        if self._masks.pop(fd, None) is not None and self._dispatching:
            self._gone.add(fd)

    def watching(self, fd: int) -> bool:
        return fd in self._masks


class BusyPoll:
    """Keep the loop polling, not sleeping, for `window` seconds after the last read.

    A message through a proxy that sleeps costs two wake-ups (client -> proxy, backend
    -> proxy); on a VM each is tens of µs of IPI and scheduler work.  While this is
    active a callback re-schedules itself with call_soon, so the loop polls its fds
    with a zero timeout and finds the next message without being woken.  Each read
    (`touch`) restarts the window; after `window` seconds without one the loop
    sleeps again.  The price is a CPU kept busy while traffic flows: off by default.
    """

    __slots__ = ("_spin", "active", "hot", "loop", "since", "window")

    def __init__(self, loop: asyncio.AbstractEventLoop, window: float) -> None:
        self.loop = loop
        self.window = window
        self.active = False
        self.hot = False
        self.since = 0.0
        self._spin = self.spin

    def touch(self) -> None:
        self.hot = True
        if not self.active:
            self.active = True
            self.since = self.loop.time()
            self.loop.call_soon(self._spin)

    def spin(self) -> None:
        if self.hot:
            self.hot = False
            self.since = self.loop.time()
        elif self.loop.time() - self.since > self.window:
            self.active = False
            return
        os.sched_yield()
        self.loop.call_soon(self._spin)
