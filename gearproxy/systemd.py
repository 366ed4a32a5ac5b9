"""The systemd notify protocol, spoken directly: no libsystemd, no extra dependency.

Theory of operation: under `Type=notify` systemd passes the address of a
datagram socket in `$NOTIFY_SOCKET` (a file system path, or `@name` for an
abstract socket) and the daemon sends it newline-separated `KEY=VALUE`
assignments, one datagram per message:

- `READY=1` once the first reconcile is done (systemd starts dependants then),
- `STATUS=...` a one-line summary shown by `systemctl status`,
- `WATCHDOG=1` every half of `$WATCHDOG_USEC`, sent *from the event loop* so
  that a blocked loop stops the pings and systemd restarts the daemon,
- `STOPPING=1` when a graceful stop begins.

Nothing here may take the daemon down: a send that fails is logged at debug
level and reported as `False`.  Without `$NOTIFY_SOCKET` (the daemon started
by hand or by `deploy`) every call is a cheap no-op returning `False`.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping, MutableMapping

from gearproxy.log import get_logger

log = get_logger("gearproxy.systemd")

# How long a send may block when systemd's receive queue is full: long enough
# not to drop READY=1 on a busy boot, short enough not to stall the loop.
SEND_TIMEOUT = 1.0

# The variables systemd sets for the notify protocol; children must not inherit them.
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(socket_path: str) -> str | bytes | None:
    """The `sendto` address for a `$NOTIFY_SOCKET` value, or None if unsupported."""
    if socket_path.startswith("@"):
        # Abstract namespace: a leading NUL instead of the '@'.
        return b"\0" + socket_path[1:].encode()
    if socket_path.startswith("/"):
        return socket_path
    return None  # relative paths and vsock: addresses are not for us


def notify(message: str, *, socket_path: str | None = None) -> bool:
    """Send `message` as one datagram to systemd; True when it was sent.

    `socket_path` overrides `$NOTIFY_SOCKET`.  False, never an exception, when
    there is no socket or the send fails.
    """
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = _address(path)
    if address is None:
        log.debug("notify_unsupported_socket", socket=path)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(message.encode(), address)
    except OSError as err:
        log.debug("notify_failed", socket=path, message=message, error=str(err))
        return False
    return True


def _one_line(text: str) -> str:
    """`text` with line breaks flattened: a newline would start a new assignment."""
    return " ".join(text.splitlines())


def ready(status: str | None = None, *, socket_path: str | None = None) -> bool:
    """Tell systemd that start-up is complete, optionally with a status line."""
    message = "READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}"
    return notify(message, socket_path=socket_path)


def status(text: str, *, socket_path: str | None = None) -> bool:
    """Set the one-line status shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}", socket_path=socket_path)


def stopping(*, socket_path: str | None = None) -> bool:
    """Tell systemd that a graceful stop has begun."""
    return notify("STOPPING=1", socket_path=socket_path)


def watchdog_ping(*, socket_path: str | None = None) -> bool:
    """One keep-alive ping."""
    return notify("WATCHDOG=1", socket_path=socket_path)


def extend_timeout(seconds: float, *, socket_path: str | None = None) -> bool:
    """Ask for `seconds` more before the start (or stop) times out.

    For a reconcile that legitimately takes longer than `TimeoutStartSec=`.
    """
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", socket_path=socket_path)


def watchdog_interval(environ: Mapping[str, str] | None = None, *,
                      pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of `$WATCHDOG_USEC`), or None when off.

    Honours `$WATCHDOG_PID`: when set, the watchdog is ours only if it names
    this process (`pid`, default `os.getpid()`), so a child that inherited the
    environment does not ping in the daemon's place.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.debug("watchdog_usec_invalid", value=raw)
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            owner_pid = int(owner)
        except ValueError:
            log.debug("watchdog_pid_invalid", value=owner)
            return None
        if owner_pid != (os.getpid() if pid is None else pid):
            return None
    return usec / 2 / 1_000_000


async def watchdog_loop(interval: float, *, socket_path: str | None = None) -> None:
    """Ping `WATCHDOG=1` now and then every `interval` seconds, until cancelled.

    Runs as a task on the daemon's event loop on purpose: if the loop is
    blocked the pings stop, and systemd's watchdog restarts a hung daemon.
    """
    while True:
        watchdog_ping(socket_path=socket_path)
        await asyncio.sleep(interval)


class Notifier:
    """The daemon's handle on systemd, read from the environment once at start-up.

    `Notifier()` reads `os.environ`; pass `environ` to read another mapping
    (tests).  Without `$NOTIFY_SOCKET` (not run by systemd) every method is a
    no-op returning False and `start` starts nothing.  With `unset=True` the
    notify variables are removed from `environ` afterwards, so processes
    spawned later do not inherit them.

    Use: `await start()` (starts the watchdog task when `$WATCHDOG_USEC` asks
    for one), `ready(summary)`, `status(summary)`, `stopping()`, `await close()`.
    """

    __slots__ = ("_task", "socket_path", "watchdog")

    def __init__(self, environ: MutableMapping[str, str] | None = None, *,
                 pid: int | None = None, unset: bool = False) -> None:
        env = os.environ if environ is None else environ
        self.socket_path: str | None = env.get("NOTIFY_SOCKET") or None
        # Seconds between watchdog pings; None when systemd expects none.
        self.watchdog: float | None = watchdog_interval(env, pid=pid)
        self._task: asyncio.Task[None] | None = None
        if unset:
            for name in NOTIFY_ENV:
                env.pop(name, None)

    def __repr__(self) -> str:
        return f"Notifier(socket_path={self.socket_path!r}, watchdog={self.watchdog!r})"

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening."""
        return self.socket_path is not None

    def notify(self, message: str) -> bool:
        """Send a raw message (see `notify`)."""
        if self.socket_path is None:
            return False
        return notify(message, socket_path=self.socket_path)

    def ready(self, status: str | None = None) -> bool:
        """`READY=1`, optionally with a status line."""
        if self.socket_path is None:
            return False
        return ready(status, socket_path=self.socket_path)

    def status(self, text: str) -> bool:
        """`STATUS=text` (flattened to one line)."""
        if self.socket_path is None:
            return False
        return status(text, socket_path=self.socket_path)

    def stopping(self) -> bool:
        """`STOPPING=1`."""
        if self.socket_path is None:
            return False
        return stopping(socket_path=self.socket_path)

    def extend_timeout(self, seconds: float) -> bool:
        """`EXTEND_TIMEOUT_USEC=` for a long start or stop."""
        if self.socket_path is None:
            return False
        return extend_timeout(seconds, socket_path=self.socket_path)

    @property
    def watchdog_task(self) -> asyncio.Task[None] | None:
        """The running watchdog task, if any."""
        return self._task

    async def start(self) -> None:
        """Start pinging from the running loop, if systemd expects pings; idempotent."""
        if self.socket_path is None or self.watchdog is None or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(
            watchdog_loop(self.watchdog, socket_path=self.socket_path),
            name="systemd-watchdog")

    async def close(self) -> None:
        """Stop the watchdog task and wait for it to end."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # wait() rather than await: the task's CancelledError stays inside it,
        # while a cancellation of the caller still propagates.
        await asyncio.wait({task})
