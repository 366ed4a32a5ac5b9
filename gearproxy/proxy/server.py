"""The proxy process: start-up order, accepting, connecting to targets, drain and shutdown.

Start-up order (each step may fail with LinkError, exit 1):
  1. raise the soft RLIMIT_NOFILE to the hard limit;
  2. bind the host `--listen` sockets and the `--metrics` socket;
  3. `--join-ns-of PID`: join PID's user and network namespaces (single-threaded still);
  4. pick the engine (auto: probe splice once), start uvloop;
  5. bind `--listen-netns` sockets from a helper thread each;
  6. open the control socket last, then log `ready`: a supervisor knows the
     proxy is ready when its control socket answers.

Connection life: accept -> (max-conns check) -> pool candidates -> non-blocking
connect to each in turn with a timeout (callbacks, no task) -> relay (splice or
copy) -> counters folded in at close.  Failed connects back the target off;
when none is left the client is closed at once and `no_backend` counted.

Signals only set flags (loop.add_signal_handler).  First SIGTERM/SIGINT: close
listeners, let connections finish for up to --drain-timeout, then close the
rest and exit 0.  A second signal closes everything at once.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import resource
import signal
import socket
from collections.abc import Callable
from typing import Any

from gearproxy import log
from gearproxy.errors import LinkError
from gearproxy.netns import join_namespaces
from gearproxy.proxy.config import Address, Engine, ProxyConfig
from gearproxy.proxy.copy import CopyRelay
from gearproxy.proxy.listeners import Listener, ListenerKey, bind_host, bind_netns
from gearproxy.proxy.metrics import (
    ListenerStats,
    Totals,
    prometheus,
    serve_metrics_client,
    snapshot,
)
from gearproxy.proxy.poller import BusyPoll, Poller
from gearproxy.proxy.pool import Backend, Pool
from gearproxy.proxy.splice import PipePool, SpliceRelay, splice_works

_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_logger = log.get_logger("gearproxy.proxy")


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return want
    return soft


def choose_engine(mode: str) -> Engine:
    """auto -> splice when the kernel splices TCP sockets, else copy; splice must work."""
    if mode == "copy":
        return "copy"
    works = splice_works()
    if mode == "splice" and not works:
        raise LinkError("--mode splice: splice(2) from a TCP socket does not work here; "
                        "use --mode copy or auto")
    return "splice" if works else "copy"


class _Connect:
    """Connect one client to the first candidate that answers (callbacks, no task)."""

    __slots__ = ("backend", "cands", "client", "idx", "listener", "proxy", "sock", "t0", "timer")

    def __init__(self, proxy: Proxy, client: _socket.socket, listener: Listener,
                 cands: list[Backend]) -> None:
        self.proxy = proxy
        self.client = client
        self.listener = listener
        self.cands = cands
        self.idx = 0
        self.sock: _socket.socket | None = None
        self.backend: Backend | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.t0 = 0.0

    def next(self) -> None:
        proxy = self.proxy
        loop = proxy.loop
        cands = self.cands
        while self.idx < len(cands):
            backend = cands[self.idx]
            self.idx += 1
            try:
                # SOCK_NONBLOCK: non-blocking from birth, no ioctl per connection.
                sock = _socket.socket(backend.family, _STREAM_NONBLOCK)
            except OSError:
                break                                  # out of descriptors: give up now
            sock.setsockopt(*_NODELAY)
            self.t0 = loop.time()
            err = sock.connect_ex(backend.sockaddr)
            self.sock = sock
            self.backend = backend
            if err == 0:
                self._connected()
                return
            if err == errno.EINPROGRESS:
                # On loopback and veth the handshake often completes inside connect():
                # one getpeername saves a trip through the loop and a timer.
                try:
                    sock.getpeername()
                except OSError:
                    pass
                else:
                    self._connected()
                    return
                try:
                    proxy.poller.add_writer(sock.fileno(), self._on_writable)
                except OSError:                        # epoll out of memory: give up now
                    sock.close()
                    self.sock = None
                    break
                self.timer = loop.call_later(proxy.config.connect_timeout, self._on_timeout)
                return
            self._failed()
        proxy.connect_gave_up(self)

    def _failed(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.backend is not None:
            self.proxy.pool.failed(self.backend)
            self.proxy.totals.connect_failures += 1
            self.backend = None

    def _on_writable(self) -> None:
        sock = self.sock
        assert sock is not None
        failed = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
        if not failed:
            try:
                sock.getpeername()
            except OSError:          # not connected yet: a spurious wake-up, keep waiting
                return
        self.proxy.poller.remove_writer(sock.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if failed:
            self._failed()
            self.next()
        else:
            self._connected()

    def _on_timeout(self) -> None:
        self.timer = None
        if self.sock is not None:
            self.proxy.poller.remove_writer(self.sock.fileno())
        self._failed()
        self.next()

    def _connected(self) -> None:
        backend, sock = self.backend, self.sock
        assert backend is not None and sock is not None
        self.proxy.pool.succeeded(backend, self.proxy.loop.time() - self.t0)
        self.proxy.connected(self, sock, backend)

    def abort(self) -> None:
        """Give up (shutdown): close both sockets without counting a failure."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            self.proxy.poller.remove_writer(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.client.close()


class Proxy:
    """One proxy process' state: listeners, pool, live relays, counters."""

    def __init__(self, config: ProxyConfig, engine: Engine,
                 host_socks: list[tuple[Address, socket.socket]],
                 metrics_sock: socket.socket | None, *, handle_signals: bool = True,
                 on_ready: Callable[[Proxy], None] | None = None) -> None:
        self.config = config
        self.handle_signals = handle_signals
        self.on_ready = on_ready
        self.engine = engine
        self.host_socks = host_socks
        self.metrics_sock = metrics_sock
        self.metrics_bound: str | None = None
        if metrics_sock is not None:
            host, port = metrics_sock.getsockname()[:2]
            self.metrics_bound = str(Address(host, port))
        self.pool = Pool(config.targets, config.balance, backoff_base=config.backoff_base,
                         backoff_max=config.backoff_max)
        self.totals = Totals()
        self.listeners: dict[ListenerKey, Listener] = {}
        self.listener_stats: dict[ListenerKey, ListenerStats] = {}
        self.relays: set[Any] = set()
        self.connecting: set[_Connect] = set()
        self.nconns = 0
        self.draining = False
        self.signals = 0
        self.pipes: PipePool | None = None
        self._idle: dict[Any, tuple[int, float]] = {}
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in main
        self.poller: Poller = None  # type: ignore[assignment]  # set in main
        self._stop: asyncio.Event | None = None
        self._force: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None

    # -- connections -------------------------------------------------------------
    def on_accept(self, sock: _socket.socket, listener: Listener) -> None:
        config = self.config
        if config.max_conns and self.nconns >= config.max_conns:
            self.totals.refused_max_conns += 1
            listener.stats.refused += 1
            sock.close()
            return
        cands = self.pool.candidates()
        if not cands:
            self.totals.no_backend += 1
            listener.stats.refused += 1
            sock.close()
            return
        self.nconns += 1
        conn = _Connect(self, sock, listener, cands)
        self.connecting.add(conn)
        conn.next()

    def connect_gave_up(self, conn: _Connect) -> None:
        self.connecting.discard(conn)
        self.nconns -= 1
        self.totals.no_backend += 1
        conn.listener.stats.refused += 1
        conn.client.close()
        self._check_drained()

    def connected(self, conn: _Connect, sock: _socket.socket, backend: Backend) -> None:
        self.connecting.discard(conn)
        ls = conn.listener.stats
        relay: Any
        if self.pipes is not None:
            relay = SpliceRelay(self.poller, conn.client, sock, self.pipes, self.relay_closed,
                                ls, backend.stats)
        else:
            relay = CopyRelay(self.loop, conn.client, sock, self.config.copy_buffer,
                              self.relay_closed, ls, backend.stats, self.poller.busy)
        self.relays.add(relay)
        ls.total += 1
        ls.active += 1
        self.totals.total += 1
        self.totals.active += 1
        relay.start()

    def relay_closed(self, relay: Any) -> None:
        self.relays.discard(relay)
        self._idle.pop(relay, None)
        self.nconns -= 1
        b_in, b_out = relay.counts()
        for st in (relay.listener_stats, relay.backend_stats, self.totals):
            st.active -= 1
            st.bytes_in += b_in
            st.bytes_out += b_out
        self._check_drained()

    def _check_drained(self) -> None:
        if self.draining and self.nconns == 0 and self._drained is not None:
            self._drained.set()

    # -- control operations ------------------------------------------------------
    def set_targets(self, targets: tuple[Address, ...]) -> None:
        self.pool.set_targets(targets)
        _logger.info("targets_set", targets=[str(t) for t in targets])

    def _add(self, sock: socket.socket, address: Address, netns: str | None) -> Listener:
        key: ListenerKey = (netns, str(address))
        stats = self.listener_stats.get(key)
        if stats is None:
            stats = self.listener_stats[key] = ListenerStats(str(address), netns)
        listener = Listener(self.loop, sock, address, netns, stats, self.on_accept)
        self.listeners[key] = listener
        stats.bound = listener.bound
        listener.start()
        return listener

    def add_listener(self, address: Address, netns: str | None) -> tuple[str, bool]:
        """Listen on `address` (inside `netns` if given); (bound address, already existed)."""
        if self.draining:
            raise LinkError("draining: not adding listeners")
        existing = self.listeners.get((netns, str(address)))
        if existing is not None:
            return existing.bound, True
        sock = bind_netns(netns, address) if netns else bind_host(address)
        listener = self._add(sock, address, netns)
        _logger.info("listener_added", listen=listener.bound, netns=netns)
        return listener.bound, False

    def remove_listener(self, address: Address, netns: str | None) -> bool:
        """Stop listening on `address`; live connections stay.  False if it was not listening."""
        listener = self.listeners.pop((netns, str(address)), None)
        if listener is None:
            return False
        listener.close()
        _logger.info("listener_removed", listen=str(address), netns=netns)
        return True

    def stats(self) -> dict[str, Any]:
        listening = set(self.listeners)
        return snapshot(self.totals,
                        [(st, key in listening) for key, st in self.listener_stats.items()],
                        self.pool.describe(), list(self.relays),
                        {"mode": self.engine, "draining": self.draining,
                         "balance": self.config.balance, "metrics": self.metrics_bound,
                         "targets": [b.label for b in self.pool.members]})

    # -- life cycle --------------------------------------------------------------
    def request_stop(self) -> None:
        """Begin a graceful stop, as SIGTERM does (call on the loop's thread)."""
        self._on_signal()

    def _on_signal(self) -> None:
        self.signals += 1
        if self.signals == 1:
            assert self._stop is not None
            self._stop.set()
        elif self._force is not None:
            self._force.set()

    async def main(self) -> int:
        """Serve until signalled; returns the exit code."""
        self.loop = loop = asyncio.get_running_loop()
        self._stop, self._force, self._drained = asyncio.Event(), asyncio.Event(), asyncio.Event()
        if self.handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal)
        config = self.config
        self.poller = Poller(loop, BusyPoll(loop, config.busy_poll) if config.busy_poll else None)
        if self.engine == "splice":
            self.pipes = PipePool(config.pipe_size, config.pipe_pool)
        servers: list[asyncio.AbstractServer] = []
        idle_task: asyncio.Task[None] | None = None
        try:
            for address, sock in self.host_socks:
                self._add(sock, address, None)
            self.host_socks = []
            for item in config.listen_netns:
                self.add_listener(item.address, item.netns)
            if self.metrics_sock is not None:
                render: Callable[[], str] = lambda: prometheus(self.stats())  # noqa: E731
                servers.append(await asyncio.start_server(
                    lambda r, w: serve_metrics_client(r, w, render), sock=self.metrics_sock,
                    limit=8192))
            if config.idle_timeout > 0:
                idle_task = loop.create_task(self._idle_sweeper(config.idle_timeout))
            if config.control is not None:
                from gearproxy.proxy.control import serve_control
                servers.append(await serve_control(self, config.control,
                                                   config.control_line_limit))
            _logger.info("ready", listen=[x.bound for x in self.listeners.values()],
                         netns=[x.netns for x in self.listeners.values()],
                         targets=[b.label for b in self.pool.members], mode=self.engine,
                         control=str(config.control) if config.control else None)
            if self.on_ready is not None:
                self.on_ready(self)
            await self._stop.wait()
            await self._drain(config.drain_timeout)
        finally:
            if idle_task is not None:
                idle_task.cancel()
            for listener in self.listeners.values():
                listener.close()
            for server in servers:
                server.close()
            self._close_all()
            if config.control is not None:
                with contextlib.suppress(OSError):
                    config.control.unlink()
            if self.pipes is not None:
                self.pipes.close()
            self.poller.close()
        _logger.info("stopped", connections_total=self.totals.total)
        return 0

    async def _drain(self, timeout: float) -> None:
        assert self._drained is not None and self._force is not None
        self.draining = True
        for listener in self.listeners.values():
            listener.close()
        _logger.info("draining", active=self.nconns, timeout=timeout)
        self._check_drained()
        if self.nconns == 0:
            return
        waits = [asyncio.ensure_future(self._drained.wait()),
                 asyncio.ensure_future(self._force.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.nconns:
            _logger.warning("drain_cut", active=self.nconns, forced=self._force.is_set())

    def _close_all(self) -> None:
        for conn in list(self.connecting):
            conn.abort()
        self.connecting.clear()
        for relay in list(self.relays):
            relay.close(True)

    async def _idle_sweeper(self, idle: float) -> None:
        """Close relays that moved no byte for `idle` seconds (no cost on the hot path)."""
        period = max(0.05, min(idle / 4, 5.0))
        seen = self._idle
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            for relay in list(self.relays):
                moved = sum(relay.counts())
                prev = seen.get(relay)
                if prev is None or prev[0] != moved:
                    seen[relay] = (moved, now)
                elif now - prev[1] >= idle:
                    relay.close(False)


def run(config: ProxyConfig) -> int:
    """Run one proxy process in the foreground; returns its exit code."""
    import uvloop

    raise_nofile()
    host_socks: list[tuple[Address, socket.socket]] = []
    metrics_sock: socket.socket | None = None
    try:
        for address in config.listen:
            host_socks.append((address, bind_host(address)))
        if config.metrics is not None:
            metrics_sock = bind_host(config.metrics)
        if config.join_ns_of is not None:
            join_namespaces(config.join_ns_of)
        engine = choose_engine(config.mode)
        proxy = Proxy(config, engine, host_socks, metrics_sock)
        code: int = uvloop.run(proxy.main())
        return code
    finally:
        for _addr, sock in host_socks:
            sock.close()
        if metrics_sock is not None:
            metrics_sock.close()
