"""The private epoll set of the splice engine, and when a relay leaves it for the loop.

Poller tests drive a real uvloop loop with socketpairs; relay tests run a real
proxy in process against an echo backend on 127.0.0.1 and look at where each
relay's callbacks are registered.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from test_proxy_support import Backends, connect, in_process, recv_exact, wait_for

from gearproxy.proxy.config import parse_address
from gearproxy.proxy.poller import BusyPoll, Poller
from gearproxy.proxy.splice import _PROMOTE, SpliceRelay, splice_works

pytestmark = pytest.mark.skipif(not splice_works(), reason="splice(2) on TCP not available")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _turn(loop: asyncio.AbstractEventLoop, times: int = 3) -> None:
    """Let the loop run a few iterations (each polls the epoll set once)."""
    for _ in range(times):
        loop.run_until_complete(asyncio.sleep(0.01))


def test_reader_fires_while_readable_and_stops_when_removed(
        loop: asyncio.AbstractEventLoop) -> None:
    poller = Poller(loop)
    a, b = _pair()
    seen: list[bytes] = []
    poller.add_reader(b.fileno(), lambda: seen.append(b.recv(100)))
    a.send(b"one")
    _turn(loop)
    assert seen == [b"one"]
    poller.remove_reader(b.fileno())
    assert not poller.watching(b.fileno())
    a.send(b"two")
    _turn(loop)
    assert seen == [b"one"]
    assert b.recv(100) == b"two"
    poller.close()
    a.close()
    b.close()


def test_reader_and_writer_on_one_fd_are_independent(loop: asyncio.AbstractEventLoop) -> None:
    poller = Poller(loop)
    a, b = _pair()
    reads: list[bytes] = []
    writes: list[int] = []

    def on_write() -> None:
        writes.append(1)
        poller.remove_writer(b.fileno())      # writable at once: fire once, then stop

    poller.add_reader(b.fileno(), lambda: reads.append(b.recv(100)))
    poller.add_writer(b.fileno(), on_write)
    _turn(loop)
    assert writes == [1]
    assert reads == []
    assert poller.watching(b.fileno())         # the reader is still registered
    a.send(b"x")
    _turn(loop)
    assert reads == [b"x"]
    poller.close()
    a.close()
    b.close()


def test_forget_then_close_lets_the_fd_number_be_reused(loop: asyncio.AbstractEventLoop) -> None:
    """Closing a forgotten fd drops it from the epoll set: a new socket on the same
    number registers cleanly and gets its own callback, not the old one."""
    poller = Poller(loop)
    a, b = _pair()
    old: list[bytes] = []
    poller.add_reader(b.fileno(), lambda: old.append(b"old"))
    number = b.fileno()
    poller.forget(number)
    b.close()
    a.close()
    c, d = _pair()
    fresh = d if d.fileno() == number else c
    other = c if fresh is d else d
    new: list[bytes] = []
    poller.add_reader(fresh.fileno(), lambda: new.append(fresh.recv(100)))
    other.send(b"hi")
    _turn(loop)
    assert new == [b"hi"]
    assert old == []
    poller.close()
    c.close()
    d.close()


def test_events_left_in_a_batch_for_a_closed_fd_never_reach_its_new_owner(
        loop: asyncio.AbstractEventLoop) -> None:
    """One batch holds events for fds A and B.  A's callback forgets and closes B, and
    a new socket takes B's number with its own callbacks: B's leftover event in the
    batch must not call them (the new socket has nothing to read and is not writable)."""
    poller = Poller(loop)
    a1, b1 = _pair()
    a2, b2 = _pair()
    number = b2.fileno()
    stale: list[str] = []
    fresh: list[socket.socket] = []

    def first() -> None:
        b1.recv(10)
        x, y = _pair()                         # made first, so neither takes B's number
        poller.forget(number)
        b2.close()
        y.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        while True:                            # fill y's buffer: y is not writable
            try:
                y.send(b"z" * 65536)
            except BlockingIOError:
                break
        os.dup2(y.fileno(), number)            # the new owner of B's number
        fresh.extend((x, y))
        poller.add_reader(number, lambda: stale.append("reader"))
        poller.add_writer(number, lambda: stale.append("writer"))

    poller.add_reader(b1.fileno(), first)
    poller.add_reader(number, lambda: stale.append("old owner"))
    a1.send(b"1")                              # A ready first, then B: one batch, in order
    a2.send(b"2")
    poller._dispatch()
    assert stale == []
    poller.forget(number)
    os.close(number)
    poller.close()
    for sock in (a1, b1, a2, *fresh):
        sock.close()


def test_a_batch_larger_than_one_wakeup_is_served_over_several(
        loop: asyncio.AbstractEventLoop) -> None:
    """More ready fds than one dispatch takes: all are served, none starves."""
    poller = Poller(loop)
    pairs = [_pair() for _ in range(150)]
    got: list[int] = []
    for i, (_a, b) in enumerate(pairs):
        poller.add_reader(b.fileno(), lambda i=i, b=b: (got.append(i), b.recv(10)))
    for a, _b in pairs:
        a.send(b"x")
    _turn(loop, 10)
    assert sorted(got) == list(range(150))
    poller.close()
    for a, b in pairs:
        a.close()
        b.close()


def _relays(px: Any) -> list[SpliceRelay]:
    return px.call(lambda: list(px.proxy.relays))  # type: ignore[no-any-return]


def test_short_connections_stay_in_the_private_set_long_ones_move_to_the_loop(
        backends: Backends) -> None:
    """A request/response connection never pays the loop's registration; one that keeps
    talking is moved to it after a few wake-ups, and keeps relaying correctly."""
    port = backends.echo()
    with in_process(targets=(parse_address(f"127.0.0.1:{port}", "--target"),),
                    mode="splice") as px:
        short = connect(px.port)
        short.sendall(b"ping")
        assert recv_exact(short, 4) == b"ping"
        (relay,) = wait_for(lambda: _relays(px), what="relay")
        poller = px.proxy.poller
        assert relay.up.reg is poller and relay.down.reg is poller

        talker = connect(px.port)
        for i in range(_PROMOTE * 3):
            msg = b"%04d" % i
            talker.sendall(msg)
            assert recv_exact(talker, 4) == msg
        moved = [r for r in _relays(px) if r is not relay]
        assert len(moved) == 1
        assert moved[0].up.reg is px.proxy.loop and moved[0].down.reg is px.proxy.loop
        # The first connection, still idle, was left where it was.
        assert relay.up.reg is poller
        for sock in (short, talker):
            sock.close()
        wait_for(lambda: not _relays(px), what="relays closed")
        assert not px.call(lambda: dict(poller.readers) or dict(poller.writers))


def test_busy_poll_spins_while_touched_and_sleeps_after_the_window(
        loop: asyncio.AbstractEventLoop) -> None:
    """Touched, the spinner keeps the loop turning (many iterations in a short sleep);
    untouched for longer than its window it stops, and a touch starts it again."""
    busy = BusyPoll(loop, 0.02)
    spins: list[float] = []
    original = busy.spin

    def counted() -> None:
        spins.append(loop.time())
        original()

    busy._spin = counted
    busy.touch()
    assert busy.active
    _turn(loop, 1)                            # 10 ms: well inside the 20 ms window
    assert busy.active and len(spins) > 10    # the loop polled, it did not sleep 10 ms
    loop.run_until_complete(asyncio.sleep(0.1))
    assert not busy.active                    # no touch for > window: back to sleeping
    stopped = len(spins)
    _turn(loop, 2)
    assert len(spins) == stopped
    busy.touch()
    assert busy.active
    loop.run_until_complete(asyncio.sleep(0.1))
    assert not busy.active


@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_busy_poll_proxy_relays_and_goes_back_to_sleep(backends: Backends, mode: str) -> None:
    port = backends.echo()
    with in_process(targets=(parse_address(f"127.0.0.1:{port}", "--target"),), mode=mode,
                    busy_poll=0.005) as px:
        busy = px.proxy.poller.busy
        assert busy is not None
        sock = connect(px.port)
        for i in range(50):
            msg = b"%04d" % i
            sock.sendall(msg)
            assert recv_exact(sock, 4) == msg
        sock.close()
        wait_for(lambda: not px.call(lambda: busy.active), what="spinner to stop")
        assert px.stats()["totals"]["bytes_in"] == 200


@pytest.fixture
def backends() -> Iterator[Backends]:
    b = Backends()
    yield b
    b.close()


def _fds(backends: Backends) -> int:
    """Open fds of this process but the echo backend's: it keeps half-closed peers open."""
    return len(os.listdir("/proc/self/fd")) - len(backends.live)


@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_many_short_connections_and_resets_leave_no_fd_or_registration_behind(
        backends: Backends, mode: str) -> None:
    """2,000 connections (most closed cleanly, every tenth reset by the client, a few
    talking long enough to be promoted): afterwards the proxy holds what it held before."""
    port = backends.echo()
    with in_process(targets=(parse_address(f"127.0.0.1:{port}", "--target"),),
                    mode=mode) as px:
        def one(i: int) -> None:
            sock = connect(px.port)
            rounds = _PROMOTE * 2 if i % 50 == 0 else 1
            for _ in range(rounds):
                sock.sendall(b"ping")
                assert recv_exact(sock, 4) == b"ping"
            if i % 10 == 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.close()

        for i in range(100):                   # warm up: pipe pool and loop internals
            one(i)
        wait_for(lambda: not _relays(px), what="warm-up relays closed")
        before = _fds(backends)
        for i in range(2000):
            one(i)
        wait_for(lambda: not _relays(px), timeout=30, what="relays closed")
        poller = px.proxy.poller
        assert px.call(lambda: (dict(poller.readers), dict(poller.writers))) == ({}, {})
        assert _fds(backends) <= before
        assert px.stats()["totals"]["connections_total"] == 2100
