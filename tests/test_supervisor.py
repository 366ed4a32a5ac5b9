"""The proxy supervisor with real `gearproxy proxy` processes and real sockets (no Docker):
start, live re-configuration, restart after a crash, adoption by a new supervisor, stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from gearproxy.orchestrator.supervisor import ProxySpec, Supervisor


class EchoServer:
    """A threaded echo server on 127.0.0.1 that prefixes replies with its name."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(1024)
                conn.sendall(self.name + b":" + data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def servers() -> Iterator[tuple[EchoServer, EchoServer]]:
    a, b = EchoServer(b"a"), EchoServer(b"b")
    yield a, b
    a.close()
    b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ask(port: int, payload: bytes = b"hi") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        return sock.recv(1024)


async def ask_async(port: int) -> bytes:
    return await asyncio.to_thread(ask, port)


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_start_reconfigure_restart_and_stop(tmp_path: Path,
                                            servers: tuple[EchoServer, EchoServer]) -> None:
    """A proxy starts ready; a new pool applies live (same pid); a SIGKILLed proxy is back
    within a second with its restart counted; stop removes the process and its files."""
    a, b = servers
    port = free_port()

    async def scenario() -> None:
        sup = Supervisor(tmp_path / "proxies")
        spec = ProxySpec("d.web-1.80", (f"127.0.0.1:{port}",), (f"127.0.0.1:{a.port}",))
        proxy = await sup.ensure(spec)
        assert proxy.state == "running"
        assert await ask_async(port) == b"a:hi"
        pid = proxy.pid
        await sup.ensure(ProxySpec(spec.key, spec.listen, (f"127.0.0.1:{b.port}",)))
        assert proxy.pid == pid  # changed live, not restarted
        assert await ask_async(port) == b"b:hi"

        os.kill(pid, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while not (proxy.state == "running" and proxy.pid != pid):
            assert loop.time() < deadline, "proxy not back within a second"
            await asyncio.sleep(0.02)
        assert proxy.restarts == 1
        assert await ask_async(port) == b"b:hi"

        new_pid = proxy.pid
        await sup.stop(spec.key)
        assert _is_gone(new_pid)
        assert list((tmp_path / "proxies").iterdir()) == []
        await sup.close()

    run(scenario())


def test_a_busy_poll_change_restarts_the_proxy_with_the_flag(
        tmp_path: Path, servers: tuple[EchoServer, EchoServer]) -> None:
    """--busy-poll cannot change over the control socket: a new value means a new process,
    started with the flag, serving the same listener."""
    a, _ = servers
    port = free_port()

    async def scenario() -> None:
        sup = Supervisor(tmp_path / "proxies")
        spec = ProxySpec("d.web-1.80", (f"127.0.0.1:{port}",), (f"127.0.0.1:{a.port}",))
        proxy = await sup.ensure(spec)
        pid = proxy.pid
        await sup.ensure(replace(spec, busy_poll_us=100))
        assert proxy.state == "running" and proxy.pid != pid
        pids.append(proxy.pid)
        assert await ask_async(port) == b"a:hi"
        await sup.close(stop_proxies=False)       # the proxy stays up to be looked at

    pids: list[int] = []
    run(scenario())
    try:
        cmdline = Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"--busy-poll") + 1] == b"100"
    finally:
        os.kill(pids[0], signal.SIGTERM)


def test_a_new_supervisor_adopts_running_proxies(tmp_path: Path,
                                                 servers: tuple[EchoServer, EchoServer]) -> None:
    """Proxies outlive their supervisor; the next one adopts them (same pid, no duplicate)
    and supervises them again, while a stale pid file is cleaned up."""
    a, _ = servers
    port = free_port()
    spec = ProxySpec("d.db-1.27017", (f"127.0.0.1:{port}",), (f"127.0.0.1:{a.port}",))
    pids: list[int] = []

    async def first() -> None:
        sup = Supervisor(tmp_path / "proxies")
        pids.append((await sup.ensure(spec)).pid)
        await sup.close()  # the daemon goes away; the proxy keeps serving

    async def second() -> None:
        (tmp_path / "proxies" / "d.gone-1.1.pid").write_text("999999\n")
        sup = Supervisor(tmp_path / "proxies")
        assert await sup.adopt_existing() == [spec.key]
        assert not (tmp_path / "proxies" / "d.gone-1.1.pid").exists()
        proxy = await sup.ensure(spec)
        assert proxy.pid == pids[0]
        assert await ask_async(port) == b"a:hi"
        os.kill(proxy.pid, signal.SIGKILL)  # adopted, not our child: still supervised
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while not (proxy.state == "running" and proxy.pid != pids[0]):
            assert loop.time() < deadline, "adopted proxy not restarted"
            await asyncio.sleep(0.02)
        assert await ask_async(port) == b"a:hi"
        await sup.close(stop_proxies=True)

    run(first())
    assert ask(port) == b"a:hi"  # served with no supervisor at all
    run(second())


def test_a_proxy_that_cannot_start_is_reported(tmp_path: Path) -> None:
    """A host port held by someone else: ensure() raises with the proxy's own reason."""
    from gearproxy.errors import LinkError

    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]

        async def scenario() -> None:
            sup = Supervisor(tmp_path / "proxies")
            with pytest.raises(LinkError, match="address in use"):
                await sup.ensure(ProxySpec("d.x-1.1", (f"127.0.0.1:{port}",), ()))
            await sup.close(stop_proxies=True)

        run(scenario())


def _is_gone(pid: int) -> bool:
    """The process no longer runs (gone, or a zombie awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] == "Z"
    except OSError:
        return True


def test_a_state_directory_too_long_for_unix_sockets_is_refused_in_words(
        tmp_path: Path) -> None:
    """Control sockets have short hashed names, but a state directory past the kernel's
    107-byte socket path limit is refused with a message saying what to do."""
    from gearproxy.errors import LinkError
    from gearproxy.orchestrator.api import ApiClient

    deep = tmp_path / ("d" * 120)
    with pytest.raises(LinkError, match="GEARPROXY_STATE_DIR"):
        Supervisor(deep / "proxies")
    with pytest.raises(LinkError, match="longer than a Unix socket allows"):
        ApiClient(deep / "daemon.sock").request("ping")


def test_control_socket_names_stay_short_for_long_keys(
        tmp_path: Path, servers: tuple[EchoServer, EchoServer]) -> None:
    """A long deployment and instance name still gives a usable control socket."""
    a, _ = servers
    port = free_port()
    key = "d" * 63 + "." + "web" * 20 + "-1.80"

    async def scenario() -> None:
        sup = Supervisor(tmp_path / "proxies")
        proxy = await sup.ensure(ProxySpec(key, (f"127.0.0.1:{port}",),
                                           (f"127.0.0.1:{a.port}",)))
        assert len(str(proxy.control)) < 107 and proxy.state == "running"
        assert await ask_async(port) == b"a:hi"
        await sup.close(stop_proxies=True)

    run(scenario())
