"""The notify protocol, checked by playing systemd's side on a real datagram socket."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gearproxy import systemd

RECV_TIMEOUT = 5.0


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """systemd's notify socket bound at a file system path, and its `$NOTIFY_SOCKET` value."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(RECV_TIMEOUT)
        yield sock, path


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    """systemd's notify socket in the abstract namespace, and its `@name` value."""
    name = f"gearproxy-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(RECV_TIMEOUT)
        yield sock, "@" + name


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                  ) -> tuple[socket.socket, str]:
    """Either kind of notify socket, with `$NOTIFY_SOCKET` pointing at it."""
    sock, value = request.getfixturevalue(f"{request.param}_socket")
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    return sock, value


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_arrive_as_single_datagrams(notify_socket: tuple[socket.socket, str]) -> None:
    """READY=1 (with status), STATUS=, STOPPING=1 and WATCHDOG=1 reach $NOTIFY_SOCKET,
    path or abstract, one datagram each."""
    sock, _ = notify_socket
    assert systemd.ready("3 deployments, 7 proxies")
    assert recv(sock) == "READY=1\nSTATUS=3 deployments, 7 proxies"
    assert systemd.ready()
    assert recv(sock) == "READY=1"
    assert systemd.status("2 deployments, 4 proxies")
    assert recv(sock) == "STATUS=2 deployments, 4 proxies"
    assert systemd.watchdog_ping()
    assert recv(sock) == "WATCHDOG=1"
    assert systemd.extend_timeout(1.5)
    assert recv(sock) == "EXTEND_TIMEOUT_USEC=1500000"
    assert systemd.stopping()
    assert recv(sock) == "STOPPING=1"


def test_status_is_flattened_to_one_line(notify_socket: tuple[socket.socket, str]) -> None:
    """A newline in a status cannot smuggle in another assignment (say READY=1)."""
    sock, _ = notify_socket
    assert systemd.status("broken\nREADY=1")
    assert recv(sock) == "STATUS=broken READY=1"


def test_explicit_socket_path_overrides_environment(
        path_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`socket_path=` is used even when $NOTIFY_SOCKET is unset."""
    sock, path = path_socket
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1", socket_path=path)
    assert recv(sock) == "READY=1"


def test_without_notify_socket_every_call_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Started by hand (no $NOTIFY_SOCKET): the helpers return False and send nothing."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")
    assert not systemd.ready("x")
    assert not systemd.status("x")
    assert not systemd.stopping()


@pytest.mark.parametrize("value", ["relative/notify", "vsock:2:1234"])
def test_unsupported_addresses_return_false(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths and vsock addresses are refused with False, not an exception."""
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert not systemd.ready()


def test_send_failure_returns_false_and_never_raises(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A notify socket that is gone (systemd restarted, stale environment) gives False."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not systemd.ready()
    monkeypatch.setenv("NOTIFY_SOCKET", f"@gearproxy-absent-{uuid.uuid4().hex}")
    assert not systemd.stopping()


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid(
        env: dict[str, str], expected: float | None) -> None:
    """Half of WATCHDOG_USEC in seconds; None when unset, invalid or meant for another pid."""
    assert systemd.watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_defaults_to_the_current_process() -> None:
    """Without `pid=`, WATCHDOG_PID is compared with os.getpid()."""
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(env) == 1.0


def test_notifier_reads_environment_and_optionally_unsets() -> None:
    """The daemon captures the settings once; `unset=True` keeps them from its children."""
    env = {"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "7", "PATH": "/"}
    notifier = systemd.Notifier(env, pid=7, unset=True)
    assert (notifier.socket_path, notifier.watchdog) == ("@sd", 5.0)
    assert notifier.enabled
    assert env == {"PATH": "/"}
    kept = {"NOTIFY_SOCKET": "@sd"}
    assert systemd.Notifier(kept).watchdog is None
    assert kept == {"NOTIFY_SOCKET": "@sd"}


def test_notifier_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Notifier()` with no argument reads the process environment."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = systemd.Notifier()
    assert (notifier.socket_path, notifier.watchdog) == ("/run/systemd/notify", 15.0)


def test_disabled_notifier_sends_nothing_and_starts_no_watchdog() -> None:
    """A Notifier with no socket is inert: False everywhere, no watchdog task."""
    notifier = systemd.Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert not notifier.extend_timeout(1)
    assert not notifier.notify("WATCHDOG=1")

    async def lifecycle() -> None:
        await notifier.start()
        assert notifier.watchdog_task is None
        await notifier.close()

    asyncio.run(lifecycle())


def test_notifier_without_watchdog_usec_starts_no_task(
        path_socket: tuple[socket.socket, str]) -> None:
    """With a socket but no WATCHDOG_USEC, start() starts nothing (systemd expects no pings)."""
    _, path = path_socket
    notifier = systemd.Notifier({"NOTIFY_SOCKET": path})

    async def lifecycle() -> None:
        await notifier.start()
        assert notifier.watchdog_task is None

    asyncio.run(lifecycle())


def test_notifier_sends_to_its_captured_socket(path_socket: tuple[socket.socket, str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Once captured, the Notifier keeps working after $NOTIFY_SOCKET is unset."""
    sock, path = path_socket
    notifier = systemd.Notifier({"NOTIFY_SOCKET": path})
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notifier.ready("1 deployment, 2 proxies")
    assert recv(sock) == "READY=1\nSTATUS=1 deployment, 2 proxies"
    assert notifier.status("idle")
    assert recv(sock) == "STATUS=idle"
    assert notifier.extend_timeout(2)
    assert recv(sock) == "EXTEND_TIMEOUT_USEC=2000000"
    assert notifier.stopping()
    assert recv(sock) == "STOPPING=1"


class Arrivals:
    """Records when each datagram arrives, from a thread independent of the event loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.times: list[float] = []
        self.messages: list[str] = []
        self.cond = threading.Condition()
        self.done = threading.Event()
        sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self.cond:
                self.times.append(time.monotonic())
                self.messages.append(data.decode())
                self.cond.notify_all()

    def wait_for(self, count: int, timeout: float = RECV_TIMEOUT) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.times) >= count, timeout), \
                f"only {len(self.times)} of {count} pings arrived"

    def stop(self) -> None:
        self.done.set()
        self.thread.join(RECV_TIMEOUT)


def test_watchdog_pings_stop_while_the_loop_is_blocked(
        path_socket: tuple[socket.socket, str]) -> None:
    """WATCHDOG=1 comes from the event loop: a blocked loop sends none, then pings resume."""
    sock, path = path_socket
    interval, block = 0.05, 0.6
    arrivals = Arrivals(sock)
    notifier = systemd.Notifier({"NOTIFY_SOCKET": path,
                                 "WATCHDOG_USEC": str(int(interval * 2 * 1_000_000))})
    assert notifier.watchdog == interval
    window: list[float] = []

    def block_loop() -> None:
        window.append(time.monotonic())
        time.sleep(block)  # the hung daemon: nothing else runs on the loop meanwhile
        window.append(time.monotonic())

    async def scenario() -> None:
        await notifier.start()
        task = notifier.watchdog_task
        assert task is not None
        try:
            await asyncio.to_thread(arrivals.wait_for, 3)
            asyncio.get_running_loop().call_soon(block_loop)
            await asyncio.sleep(0)  # block_loop runs before this coroutine resumes
            before = len(arrivals.times)
            await asyncio.to_thread(arrivals.wait_for, before + 3)
        finally:
            await notifier.close()
        assert task.cancelled()
        assert notifier.watchdog_task is None

    try:
        asyncio.run(scenario())
    finally:
        arrivals.stop()

    start, end = window
    assert set(arrivals.messages) == {"WATCHDOG=1"}
    # Slack at the start: a ping sent just before the block may be read a little later.
    during = [t for t in arrivals.times if start + 0.1 < t < end]
    assert during == [], f"{len(during)} pings arrived while the loop was blocked"
    assert any(t >= end for t in arrivals.times), "pings did not resume after the block"
    gaps = [b - a for a, b in zip(arrivals.times, arrivals.times[1:], strict=False)]
    assert max(gaps) >= block - 0.1
