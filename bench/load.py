"""The bench's own load generator and sink.

Wire protocol (so one sink port serves every test through any forwarder): the first byte
of a connection picks its mode.

* ``D`` (discard): the sink counts every byte; at EOF it answers the count as 8 bytes
  big-endian and closes.  The sender checks the count equals what it sent.
* ``E`` (echo): the sink writes back everything it reads.

A connection that sends nothing is simply held open (the idle-RSS test).

The sink runs in its own process on uvloop (asyncio if uvloop is missing) with one
preallocated receive buffer.  Load runs in worker processes (a spawn pool kept warm for
the whole run) with one thread per stream: blocking socket calls release the GIL, so
the generator is not the bottleneck.  Every loop is bounded in bytes or count AND in
seconds, and every socket has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import socket
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

from bench import procfs

MODE_DISCARD = ord("D")
MODE_ECHO = ord("E")
CHUNK = 1 << 20
MESSAGE = 64
SLACK = 10.0  # seconds a socket may block beyond a test's own deadline
LOOPBACK = frozenset({"127.0.0.1", "::1"})

Addr = tuple[str, int]


def _check_loopback(addr: Addr) -> None:
    if addr[0] not in LOOPBACK:
        raise ValueError(f"bench traffic stays on loopback, not {addr[0]}")


# --------------------------------------------------------------------------- sink


class _SinkState:
    __slots__ = ("active", "total", "view")

    def __init__(self) -> None:
        self.view = memoryview(bytearray(CHUNK))
        self.active = 0
        self.total = 0


class _SinkProtocol(asyncio.BufferedProtocol):
    """Discard-and-count or echo, chosen by the first byte; see the module docstring."""

    def __init__(self, state: _SinkState) -> None:
        self.state = state
        self.view = state.view
        self.mode = 0
        self.count = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.state.active += 1
        self.state.total += 1

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.mode == 0:
            self.mode = self.view[0]
        self.count += nbytes
        if self.mode == MODE_ECHO and self.transport is not None:
            self.transport.write(self.view[:nbytes].tobytes())

    def eof_received(self) -> bool:
        if self.mode == MODE_DISCARD and self.transport is not None:
            self.transport.write(self.count.to_bytes(8, "big"))
        return False  # the transport flushes the answer, then closes

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.active -= 1


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _sink_main(conn: Connection, host: str, nofile: int) -> None:
    """Sink process: serve until told to stop; answer `active` queries on `conn`."""
    procfs.raise_nofile(nofile)
    loop = _new_loop()
    state = _SinkState()
    server = loop.run_until_complete(
        loop.create_server(lambda: _SinkProtocol(state), host, 0, backlog=4096)
    )
    conn.send(server.sockets[0].getsockname()[1])

    def on_command() -> None:
        try:
            cmd = conn.recv()
        except EOFError:
            cmd = "stop"
        if cmd == "stop":
            loop.stop()
        else:
            conn.send((state.active, state.total))

    loop.add_reader(conn.fileno(), on_command)
    loop.run_forever()
    server.close()
    loop.close()


class Sink:
    """The load target: one process, one port on loopback, modes picked per connection."""

    def __init__(self, host: str = "127.0.0.1", nofile: int = 4096) -> None:
        _check_loopback((host, 0))
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_sink_main, args=(child, host, nofile), daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(30):
            self._proc.kill()
            raise RuntimeError("sink did not start within 30 s")
        self.addr: Addr = (host, int(self._conn.recv()))

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def counts(self) -> tuple[int, int]:
        """(connections open now, connections accepted ever)."""
        self._conn.send("active")
        if not self._conn.poll(10):
            raise RuntimeError("sink did not answer within 10 s")
        active, total = self._conn.recv()
        return int(active), int(total)

    def wait_active(self, at_least: int | None = None, at_most: int | None = None,
                    timeout: float = 20.0) -> int:
        """Poll the open-connection count until it is in range or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            active = self.counts()[0]
            ok = (at_least is None or active >= at_least) and (at_most is None or active <= at_most)
            if ok or time.monotonic() >= deadline:
                return active
            time.sleep(0.02)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- workers


def make_pool(workers: int = 2) -> ProcessPoolExecutor:
    """A warm pool of spawned load workers (spawned, so no state leaks in from the parent)."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    for fut in [pool.submit(os.getpid) for _ in range(workers * 2)]:
        fut.result(timeout=60)
    return pool


def _connect(addr: Addr, timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        raise
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += part
    return bytes(buf)


def _one_stream(addr: Addr, max_bytes: int, max_seconds: float, out: list[Any]) -> None:
    """Send 'D' bytes until a bound, half-close, read the sink's count."""
    payload = memoryview(bytes([MODE_DISCARD]) * CHUNK)
    sent, acked, error = 0, -1, ""
    t0 = time.monotonic()
    deadline = t0 + max_seconds
    try:
        with _connect(addr, max_seconds + SLACK) as sock:
            t0 = time.monotonic()
            while sent < max_bytes and time.monotonic() < deadline:
                n = min(CHUNK, max_bytes - sent)
                sock.sendall(payload[:n])
                sent += n
            sock.shutdown(socket.SHUT_WR)
            acked = int.from_bytes(_recv_exact(sock, 8), "big")
    except OSError as err:
        error = f"{type(err).__name__}: {err}"
    out.append((sent, acked, t0, time.monotonic(), error))


def stream_worker(addr: Addr, streams: int, max_bytes: int,
                  max_seconds: float) -> list[tuple[int, int, float, float, str]]:
    """Worker: `streams` concurrent bulk senders, one thread each."""
    out: list[Any] = []
    threads = [threading.Thread(target=_one_stream, args=(addr, max_bytes, max_seconds, out))
               for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds + 2 * SLACK)
    return out


def _connrate_thread(addr: Addr, max_conns: int, deadline: float, out: list[Any]) -> None:
    request = bytes([MODE_ECHO]) * MESSAGE
    ok = errors = 0
    first_error = ""
    while ok + errors < max_conns and time.monotonic() < deadline:
        try:
            with _connect(addr, SLACK) as sock:
                sock.sendall(request)
                if _recv_exact(sock, MESSAGE) != request:
                    raise ConnectionError("echo mismatch")
            ok += 1
        except OSError as err:
            errors += 1
            first_error = first_error or f"{type(err).__name__}: {err}"
    out.append((ok, errors, first_error))


def connrate_worker(addr: Addr, threads: int, max_conns: int,
                    max_seconds: float) -> tuple[int, int, float, float, str]:
    """Worker: `threads` loops of connect, 64-byte request, 64-byte response, close."""
    out: list[Any] = []
    t0 = time.monotonic()
    deadline = t0 + max_seconds
    per_thread = max(1, max_conns // threads)
    pool = [threading.Thread(target=_connrate_thread, args=(addr, per_thread, deadline, out))
            for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(max_seconds + 2 * SLACK)
    t1 = time.monotonic()
    errs = [e for _, _, e in out if e]
    return (sum(o[0] for o in out), sum(o[1] for o in out), t0, t1, errs[0] if errs else "")


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..1)."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def pingpong_worker(addr: Addr, max_count: int, max_seconds: float, warmup: int = 200,
                    cpu: int | None = None) -> dict[str, Any]:
    """Worker: 64-byte request/response on one connection; round-trip times in µs.

    With `cpu`, the worker runs pinned to that CPU for the test (and is unpinned after).
    """
    if cpu is None:
        return _pingpong(addr, max_count, max_seconds, warmup)
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        return _pingpong(addr, max_count, max_seconds, warmup)
    finally:
        os.sched_setaffinity(0, old)


def _pingpong(addr: Addr, max_count: int, max_seconds: float, warmup: int) -> dict[str, Any]:
    message = bytes([MODE_ECHO]) * MESSAGE
    samples: list[float] = []
    deadline = time.monotonic() + max_seconds
    with _connect(addr, max_seconds + SLACK) as sock:
        for _ in range(warmup):
            sock.sendall(message)
            _recv_exact(sock, MESSAGE)
        clock = time.perf_counter_ns
        while len(samples) < max_count and time.monotonic() < deadline:
            t = clock()
            sock.sendall(message)
            got = sock.recv(MESSAGE)
            if len(got) < MESSAGE:
                got += _recv_exact(sock, MESSAGE - len(got))
            samples.append((clock() - t) / 1000.0)
    samples.sort()
    return {"samples": len(samples), "p50_us": percentile(samples, 0.50),
            "p90_us": percentile(samples, 0.90), "p99_us": percentile(samples, 0.99),
            "min_us": samples[0] if samples else math.nan,
            "max_us": samples[-1] if samples else math.nan}


# --------------------------------------------------------------------------- measurements


@dataclass(frozen=True, slots=True)
class Throughput:
    streams: int
    bytes_sent: int
    bytes_acked: int
    seconds: float
    gbit_s: float
    errors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConnRate:
    connections: int
    errors: int
    seconds: float
    per_s: float
    first_error: str


@dataclass(frozen=True, slots=True)
class Latency:
    samples: int
    p50_us: float
    p90_us: float
    p99_us: float
    min_us: float
    max_us: float


@dataclass(frozen=True, slots=True)
class Idle:
    connections: int
    opened: int
    rss_base_kib: int
    rss_kib: int
    per_conn_kib: float
    pipes_base: int
    pipes_idle: int
    fds_per_conn: float
    error: str


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts) if base or i < extra]


def measure_throughput(pool: Executor, addr: Addr, streams: int, max_bytes: int,
                       max_seconds: float, workers: int = 2) -> Throughput:
    """Bulk transfer over `streams` connections; Gbit/s of bytes the sink confirmed.

    `max_bytes` bounds each stream; the rate spans the first connect to the last answer.
    """
    _check_loopback(addr)
    futs = [pool.submit(stream_worker, addr, n, max_bytes, max_seconds)
            for n in _split(streams, min(streams, workers))]
    rows = [row for fut in futs for row in fut.result(timeout=max_seconds + 3 * SLACK)]
    sent = sum(r[0] for r in rows)
    acked = sum(max(r[1], 0) for r in rows)
    seconds = max(r[3] for r in rows) - min(r[2] for r in rows)
    errors = tuple(r[4] for r in rows if r[4])
    errors += tuple(f"stream sent {r[0]} but sink counted {r[1]}"
                    for r in rows if not r[4] and r[0] != r[1])
    return Throughput(streams, sent, acked, seconds, acked * 8 / seconds / 1e9 if seconds else 0.0,
                      errors)


def measure_connrate(pool: Executor, addr: Addr, max_conns: int, max_seconds: float,
                     workers: int = 2, threads: int = 4) -> ConnRate:
    """Short connections per second from `workers` x `threads` sequential loops."""
    _check_loopback(addr)
    futs = [pool.submit(connrate_worker, addr, threads, max(1, max_conns // workers), max_seconds)
            for _ in range(workers)]
    rows = [fut.result(timeout=max_seconds + 3 * SLACK) for fut in futs]
    ok = sum(r[0] for r in rows)
    seconds = max(r[3] for r in rows) - min(r[2] for r in rows)
    first = next((r[4] for r in rows if r[4]), "")
    return ConnRate(ok, sum(r[1] for r in rows), seconds, ok / seconds if seconds else 0.0, first)


def measure_latency(pool: Executor, addr: Addr, max_count: int, max_seconds: float,
                    pin_pids: list[int] | None = None) -> Latency:
    """Ping-pong round trips of 64-byte messages on one persistent connection.

    With `pin_pids` (forwarder and sink), they and the client share CPU 0 for the test:
    the figure is then the path's own cost, without cross-CPU wake-ups (tens of µs on
    a VM, more than the forwarding itself).
    """
    _check_loopback(addr)
    cpu = None
    old: dict[int, set[int]] = {}
    if pin_pids is not None:
        cpu = min(os.sched_getaffinity(0))
        old = procfs.pin(pin_pids, {cpu})
    try:
        got = pool.submit(pingpong_worker, addr, max_count, max_seconds, 200, cpu).result(
            timeout=max_seconds + 3 * SLACK)
    finally:
        procfs.unpin(old)
    return Latency(got["samples"], got["p50_us"], got["p90_us"], got["p99_us"], got["min_us"],
                   got["max_us"])


def measure_idle(addr: Addr, count: int, sink: Sink, forwarder_pids: Any,
                 timeout: float = 60.0) -> Idle:
    """Open `count` idle connections through a forwarder and read its RSS growth.

    `forwarder_pids` is a callable returning the forwarder's current pids (socat forks).
    The sink's open-connection count tells when the forwarder has dialled every backend.
    """
    _check_loopback(addr)
    procfs.raise_nofile(count + 1024)
    deadline = time.monotonic() + timeout
    base_active = sink.counts()[0]
    pids = forwarder_pids()
    fds_base = procfs.fd_kinds(pids)
    rss_base, pipes_base = procfs.rss_kib(pids), fds_base["pipe"]
    socks: list[socket.socket] = []
    error = ""
    try:
        for _ in range(count):
            if time.monotonic() >= deadline:
                error = f"opened only {len(socks)} connections before the deadline"
                break
            try:
                socks.append(_connect(addr, max(0.1, deadline - time.monotonic())))
            except OSError as err:
                error = f"connect {len(socks) + 1}: {type(err).__name__}: {err}"
                break
        reached = sink.wait_active(at_least=base_active + len(socks),
                                   timeout=max(0.1, deadline - time.monotonic()))
        if reached < base_active + len(socks) and not error:
            error = f"sink saw only {reached - base_active} of {len(socks)} connections"
        time.sleep(0.2)  # let the forwarder finish the per-connection work it defers
        pids = forwarder_pids()
        fds = procfs.fd_kinds(pids)
        rss, pipes = procfs.rss_kib(pids), fds["pipe"]
        if not pids or rss == 0:
            error = error or "the forwarder exited"
    finally:
        opened = len(socks)
        for sock in socks:
            sock.close()
    sink.wait_active(at_most=base_active, timeout=30)
    per_conn = (rss - rss_base) / opened if opened and rss else math.nan
    fds_per_conn = (fds.total() - fds_base.total()) / opened if opened and rss else math.nan
    return Idle(count, opened, rss_base, rss, per_conn, pipes_base, pipes, fds_per_conn, error)
