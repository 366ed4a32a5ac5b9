"""The relay engines end to end, in process: bytes, half-close, resets, counters, the pool.

Every test runs against both engines (splice and copy) with real sockets on
127.0.0.1 and a proxy on its own uvloop thread.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
from typing import Any

import pytest
from gearproxy_harness import unavailable
from test_proxy_support import (
    Backends,
    connect,
    expected_sha,
    in_process,
    pattern,
    recv_all,
    recv_exact,
    stream_chunks,
    unused_refused_port,
    wait_for,
)

from gearproxy.proxy.config import parse_address
from gearproxy.proxy.splice import splice_works

MODES = ["splice", "copy"]


def target(port: int) -> Any:
    return (parse_address(f"127.0.0.1:{port}", "--target"),)


@pytest.fixture
def backends() -> Any:
    b = Backends()
    yield b
    b.close()


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    if request.param == "splice" and not splice_works():
        unavailable("kernel does not splice TCP sockets")
    return str(request.param)


def _hash_reader(sock: socket.socket, out: dict[str, Any]) -> None:
    h = hashlib.sha256()
    n = 0
    buf = bytearray(1 << 20)
    while True:
        got = sock.recv_into(buf)
        if not got:
            break
        h.update(memoryview(buf)[:got])
        n += got
    out["sha"], out["n"] = h.hexdigest(), n


def _sender(sock: socket.socket, total: int, buf: bytes) -> None:
    for part in stream_chunks(total, buf):
        sock.sendall(part)
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.slow
def test_256_mib_each_way_arrives_intact(mode: str) -> None:
    """256 MiB up and 256 MiB down at once through the proxy keep their sha256 and byte count."""
    total = 256 << 20
    buf = pattern()
    want = expected_sha(total, buf)
    lsock = socket.create_server(("127.0.0.1", 0))
    server_got: dict[str, Any] = {}
    client_got: dict[str, Any] = {}

    def serve() -> None:
        conn, _ = lsock.accept()
        conn.settimeout(60)
        w = threading.Thread(target=_sender, args=(conn, total, buf))
        w.start()
        _hash_reader(conn, server_got)
        w.join(60)
        conn.close()

    st = threading.Thread(target=serve)
    st.start()
    with in_process(targets=target(lsock.getsockname()[1]), mode=mode) as px:
        c = connect(px.port, timeout=60)
        w = threading.Thread(target=_sender, args=(c, total, buf))
        w.start()
        _hash_reader(c, client_got)
        w.join(60)
        c.close()
        st.join(60)
        assert server_got == {"sha": want, "n": total}
        assert client_got == {"sha": want, "n": total}
        stats = wait_for(lambda: (s := px.stats())["totals"]["connections_active"] == 0 and s)
        assert stats["totals"]["bytes_in"] == total
        assert stats["totals"]["bytes_out"] == total
        assert stats["mode"] == mode
    lsock.close()


def test_client_half_close_is_forwarded(mode: str, backends: Backends) -> None:
    """Client shuts down writing; the backend sees EOF, still answers, and the client reads it."""
    with in_process(targets=target(backends.echo()), mode=mode) as px:
        c = connect(px.port)
        c.sendall(b"hello")
        c.shutdown(socket.SHUT_WR)
        # the echo backend answers after EOF with the echo then its own EOF
        assert recv_all(c) == b"hello"
        c.close()


def test_server_half_close_is_forwarded(mode: str) -> None:
    """Backend shuts down writing first; the client sees EOF yet can still send to the backend."""
    lsock = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = lsock.accept()
        conn.settimeout(10)
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        got.append(recv_all(conn))
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    with in_process(targets=target(lsock.getsockname()[1]), mode=mode) as px:
        c = connect(px.port)
        assert recv_all(c) == b"banner"          # EOF seen, connection still open our way
        c.sendall(b"after-eof")
        c.shutdown(socket.SHUT_WR)
        t.join(10)
        assert got == [b"after-eof"]
        c.close()
    lsock.close()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_client_reset_becomes_backend_reset(mode: str) -> None:
    """A client that resets its connection makes the proxy reset the backend side."""
    lsock = socket.create_server(("127.0.0.1", 0))
    with in_process(targets=target(lsock.getsockname()[1]), mode=mode) as px:
        c = connect(px.port)
        conn, _ = lsock.accept()
        conn.settimeout(10)
        c.sendall(b"x")
        assert conn.recv(1) == b"x"
        _reset(c)
        with pytest.raises(ConnectionResetError):
            while conn.recv(4096):
                pass
        conn.close()
    lsock.close()


def test_server_reset_becomes_client_reset(mode: str) -> None:
    """A backend that resets makes the proxy reset the client side."""
    lsock = socket.create_server(("127.0.0.1", 0))
    with in_process(targets=target(lsock.getsockname()[1]), mode=mode) as px:
        c = connect(px.port)
        conn, _ = lsock.accept()
        conn.sendall(b"y")
        assert c.recv(1) == b"y"
        _reset(conn)
        with pytest.raises(ConnectionResetError):
            while c.recv(4096):
                pass
        c.close()
    lsock.close()


def test_refused_backend_is_skipped_for_the_next(mode: str, backends: Backends) -> None:
    """With `first` balancing, a refusing backend is tried, counted, backed off, and skipped."""
    holder, dead = unused_refused_port()
    good = backends.echo(b"G")
    targets = (*target(dead), *target(good))
    with in_process(targets=targets, balance="first", mode=mode) as px:
        for _ in range(2):
            c = connect(px.port)
            assert recv_exact(c, 1) == b"G"
            c.close()
        st = px.stats()
        by = {b["target"]: b for b in st["backends"]}
        assert by[f"127.0.0.1:{dead}"]["connect_failures"] == 1     # backed off after one
        assert by[f"127.0.0.1:{dead}"]["up"] is False
        assert by[f"127.0.0.1:{good}"]["connections_total"] == 2
    holder.close()


def test_backend_that_times_out_is_skipped_for_the_next(mode: str, backends: Backends) -> None:
    """A backend whose connect hangs past --connect-timeout is marked down; the next serves."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(0)
    fillers = []
    for _ in range(4):                    # fill the accept queue: further SYNs are dropped
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(hung.getsockname())
        fillers.append(f)
    good = backends.echo(b"G")
    targets = (*target(hung.getsockname()[1]), *target(good))
    with in_process(targets=targets, balance="first", connect_timeout=0.3, mode=mode) as px:
        c = connect(px.port)
        t0 = time.monotonic()
        assert recv_exact(c, 1) == b"G"
        assert 0.25 < time.monotonic() - t0 < 3.0
        c.close()
        by = {b["target"]: b for b in px.stats()["backends"]}
        assert by[f"127.0.0.1:{hung.getsockname()[1]}"]["connect_failures"] == 1
        c = connect(px.port)                 # backed off: served at once
        t0 = time.monotonic()
        assert recv_exact(c, 1) == b"G"
        assert time.monotonic() - t0 < 0.25
        c.close()
    for f in fillers:
        f.close()
    hung.close()


def test_all_backends_down_closes_client_promptly(mode: str) -> None:
    """With every backend refusing, the client is closed within a second and counted."""
    holder, dead = unused_refused_port()
    with in_process(targets=target(dead), mode=mode) as px:
        for _ in range(2):        # first: connect refused; second: backend already backed off
            c = connect(px.port)
            t0 = time.monotonic()
            assert recv_all(c) == b""
            assert time.monotonic() - t0 < 1.0
            c.close()
        st = wait_for(lambda: (s := px.stats())["totals"]["no_backend"] == 2 and s)
        assert st["totals"]["connect_failures"] == 1
        assert st["totals"]["connections_total"] == 0
    holder.close()


def test_counters_match_bytes_sent(mode: str) -> None:
    """Listener, backend and total counters equal the bytes each side sent."""
    lsock = socket.create_server(("127.0.0.1", 0))
    up, down = 300_001, 123_457
    with in_process(targets=target(lsock.getsockname()[1]), mode=mode) as px:
        c = connect(px.port)
        conn, _ = lsock.accept()
        conn.settimeout(10)
        c.sendall(b"u" * up)
        c.shutdown(socket.SHUT_WR)
        assert len(recv_all(conn)) == up
        conn.sendall(b"d" * down)
        conn.close()
        assert len(recv_all(c)) == down
        c.close()
        st = wait_for(lambda: (s := px.stats())["totals"]["connections_active"] == 0 and s)
        for entry in (st["totals"], st["listeners"][0], st["backends"][0]):
            assert (entry["bytes_in"], entry["bytes_out"]) == (up, down)
            assert entry["connections_total"] == 1
        assert st["backends"][0]["connect_latency_ms"]["avg"] >= 0
    lsock.close()


@pytest.mark.slow
def test_thousand_concurrent_connections(mode: str, backends: Backends) -> None:
    """1,000 connections open at once each get their own echo back."""
    n = 1000
    with in_process(targets=target(backends.echo()), mode=mode) as px:
        socks = [connect(px.port) for _ in range(n)]
        for i, s in enumerate(socks):
            s.sendall(b"%06d" % i)
        for i, s in enumerate(socks):
            assert recv_exact(s, 6) == b"%06d" % i
        assert wait_for(lambda: px.stats()["totals"]["connections_active"] == n)
        for s in socks:
            s.close()
        wait_for(lambda: px.stats()["totals"]["connections_active"] == 0, 30)
        assert px.stats()["totals"]["connections_total"] == n


def test_live_pool_change_keeps_transfer_and_moves_new_connections(
        mode: str, backends: Backends) -> None:
    """set_targets mid-transfer: the open transfer completes; new connections reach the new pool."""
    a, b = backends.echo(b"A"), backends.echo(b"B")
    with in_process(targets=target(a), mode=mode) as px:
        c = connect(px.port)
        assert recv_exact(c, 1) == b"A"
        c.sendall(b"1" * 100_000)
        px.call(px.proxy.set_targets, target(b))
        c2 = connect(px.port)
        assert recv_exact(c2, 1) == b"B"
        c2.close()
        c.sendall(b"2" * 100_000)
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"1" * 100_000 + b"2" * 100_000
        c.close()
        st = px.stats()
        assert st["targets"] == [f"127.0.0.1:{b}"]
        assert {x["target"]: x["in_pool"] for x in st["backends"]} == {
            f"127.0.0.1:{b}": True, f"127.0.0.1:{a}": False}


def test_max_conns_refuses_excess(mode: str, backends: Backends) -> None:
    """Beyond --max-conns open connections, new ones are closed at once and counted."""
    with in_process(targets=target(backends.echo(b"E")), mode=mode, max_conns=2) as px:
        held = [connect(px.port) for _ in range(2)]
        for s in held:
            assert recv_exact(s, 1) == b"E"
        extra = connect(px.port)
        assert recv_all(extra) == b""
        extra.close()
        assert px.stats()["totals"]["refused_max_conns"] == 1
        held[0].close()
        wait_for(lambda: px.stats()["totals"]["connections_active"] == 1)
        again = connect(px.port)
        assert recv_exact(again, 1) == b"E"
        for s in (again, held[1]):
            s.close()


def test_idle_timeout_closes_silent_connections(mode: str, backends: Backends) -> None:
    """A connection that moves no byte for --idle-timeout is closed by the proxy."""
    with in_process(targets=target(backends.echo()), mode=mode, idle_timeout=0.3) as px:
        c = connect(px.port)
        c.sendall(b"ping")
        assert recv_exact(c, 4) == b"ping"
        t0 = time.monotonic()
        assert recv_all(c) == b""
        assert 0.25 < time.monotonic() - t0 < 3.0
        c.close()


def test_ipv6_listener_relays(mode: str, backends: Backends) -> None:
    """An [::1] listener relays to an IPv4 target."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no ::1 here")
    listen = (parse_address("[::1]:0", "--listen"),)
    with in_process(listen=listen, targets=target(backends.echo()), mode=mode) as px:
        c = socket.create_connection(("::1", px.port), timeout=10)
        c.sendall(b"six")
        assert recv_exact(c, 3) == b"six"
        c.close()


def test_small_messages_into_a_stalled_reader_arrive_whole_and_counted(mode: str) -> None:
    """Small messages, one per wake-up, into a backend that stops reading for a while: the
    proxy's sends come back short (in splice mode the small-message path must put the rest
    in a pipe and block), and every byte still arrives in order and is counted once."""
    import random

    rng = random.Random(7)
    messages = [rng.randbytes(rng.randint(1, 9000)) for _ in range(1500)]
    payload = b"".join(messages)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # inherited: a small window
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    with in_process(targets=target(lsock.getsockname()[1]), mode=mode) as px:
        c = connect(px.port, timeout=60)
        conn, _ = lsock.accept()
        conn.settimeout(30)
        received = bytearray()

        def stalled_reader() -> None:
            time.sleep(1.0)  # long enough for the proxy's socket buffers to fill
            while len(received) < len(payload):
                chunk = conn.recv(1 << 16)
                if not chunk:
                    return
                received.extend(chunk)

        reader = threading.Thread(target=stalled_reader)
        reader.start()
        for m in messages:
            c.sendall(m)
            time.sleep(0.0002)  # one message per proxy wake-up, not a coalesced stream
        reader.join(60)
        assert not reader.is_alive()
        assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
        c.close()
        conn.close()
        st = wait_for(lambda: (s := px.stats())["totals"]["connections_active"] == 0 and s)
        assert st["totals"]["bytes_in"] == len(payload)
    lsock.close()
