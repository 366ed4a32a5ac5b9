"""Helpers shared by the proxy tests: backends, an in-process proxy, a subprocess proxy.

Holds no tests.  Every wait has a deadline; every port is read back from a
bound socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvloop

from gearproxy.proxy.config import ProxyConfig, parse_address
from gearproxy.proxy.listeners import bind_host
from gearproxy.proxy.server import Proxy, choose_engine

BLOCK = 1 << 20


def pattern() -> bytes:
    """A fixed-seed pseudo-random buffer a little over 2 MiB (odd size: chunk edges shift)."""
    import random

    return random.Random(1234).randbytes(2 * BLOCK + 4099)


def stream_chunks(total: int, buf: bytes, chunk: int = 256 * 1024) -> Iterator[memoryview]:
    """`total` bytes cut from `buf` repeated, as memoryviews (no copies)."""
    view = memoryview(buf)
    pos = 0
    left = total
    while left:
        n = min(chunk, left, len(buf) - pos)
        yield view[pos:pos + n]
        pos = (pos + n) % len(buf)
        left -= n


def expected_sha(total: int, buf: bytes) -> str:
    import hashlib

    h = hashlib.sha256()
    for part in stream_chunks(total, buf, 4 * BLOCK):
        h.update(part)
    return h.hexdigest()


def wait_for(cond: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `cond()` until truthy, with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class _Echo(asyncio.Protocol):
    def __init__(self, tag: bytes, live: set[Any]) -> None:
        self.tag = tag
        self.live = live
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.live.add(transport)
        if self.tag:
            transport.write(self.tag)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.live.discard(self.transport)


class Backends:
    """Echo servers on 127.0.0.1 in one background uvloop thread (optionally tagged)."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[Any] = []
        self.live: set[Any] = set()

    def echo(self, tag: bytes = b"") -> int:
        async def start() -> Any:
            return await self.loop.create_server(lambda: _Echo(tag, self.live), "127.0.0.1", 0,
                                                 backlog=4096)
        server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def close(self) -> None:
        async def stop() -> None:
            for server in self.servers:
                server.close()
            for transport in list(self.live):
                transport.abort()
            for server in self.servers:
                await server.wait_closed()
            for _ in range(100):
                if not self.live:
                    break
                await asyncio.sleep(0.01)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class InProcessProxy:
    """A Proxy on its own uvloop thread; `port` is its first listener's bound port."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("listen", (parse_address("127.0.0.1:0", "--listen"),))
        self.config = ProxyConfig(**options)
        engine = choose_engine(self.config.mode)
        socks = [(a, bind_host(a)) for a in self.config.listen]
        ready = threading.Event()
        self.proxy = Proxy(self.config, engine, socks, None, handle_signals=False,
                           on_ready=lambda _p: ready.set())
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise AssertionError(f"proxy did not start: {self.error!r}")
        first = next(iter(self.proxy.listeners.values()))
        self.port = int(first.sock.getsockname()[1])

    def _run(self) -> None:
        try:
            uvloop.run(self.proxy.main())
        except BaseException as err:
            self.error = err

    def call(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on the proxy's loop thread and return its result."""
        async def go() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(go(), self.proxy.loop).result(10)

    def stats(self) -> dict[str, Any]:
        return self.call(self.proxy.stats)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.thread.is_alive():
            self.proxy.loop.call_soon_threadsafe(self.proxy.request_stop)
            self.thread.join(30)
        assert self.error is None, self.error


@contextlib.contextmanager
def in_process(**options: Any) -> Iterator[InProcessProxy]:
    proxy = InProcessProxy(**options)
    try:
        yield proxy
    finally:
        proxy.stop()


class Control:
    """A client of a proxy's NDJSON control socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rwb")

    def raw(self, line: bytes) -> dict[str, Any]:
        self.file.write(line + b"\n")
        self.file.flush()
        reply = self.file.readline()
        assert reply.endswith(b"\n"), reply
        return json.loads(reply)  # type: ignore[no-any-return]

    def __call__(self, **request: Any) -> dict[str, Any]:
        return self.raw(json.dumps(request).encode())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class ProxyProcess:
    """`python -m gearproxy proxy ...` as a user runs it, ready once its control socket answers."""

    def __init__(self, tmp: Path, *args: str, control: bool = True) -> None:
        self.control_path = tmp / "ctl.sock"
        self.log_path = tmp / "proxy.log"
        argv = [sys.executable, "-m", "gearproxy", "proxy", *args]
        if control:
            argv += ["--control", str(self.control_path)]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.ctl: Control | None = None
        if control:
            self.ctl = wait_for(self._try_control, 15, "control socket")

    def _try_control(self) -> Control | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"proxy exited {self.proc.returncode}: {self.output()}")
        if not self.control_path.exists():
            return None
        try:
            ctl = Control(self.control_path)
        except OSError:
            return None
        return ctl

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stats(self) -> dict[str, Any]:
        assert self.ctl is not None
        reply = self.ctl(op="stats")
        assert reply["ok"], reply
        return reply["stats"]  # type: ignore[no-any-return]

    def port(self, index: int = 0) -> int:
        return int(self.stats()["listeners"][index]["bound"].rsplit(":", 1)[1])

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            break
        out += data
    return bytes(out)


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            return bytes(out)
        out += data


def unused_refused_port() -> tuple[socket.socket, int]:
    """A port bound but not listening (connects are refused while the socket lives)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
