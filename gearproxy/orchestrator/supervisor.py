"""Supervisor of the link proxy processes.

Theory of operation
-------------------
Every public port of every instance is served by one `gearproxy proxy`
process, described by a `ProxySpec`: listeners on the host, listeners inside
consumer containers' network namespaces, and a pool of targets.

Processes are started as `python -m gearproxy proxy …` (a fresh interpreter,
like multiprocessing's `spawn`; it must be single-threaded when it starts so
that, on a rootless engine, it can still join RootlessKit's user namespace).
They run in their own session and outlive the daemon: the data plane keeps
forwarding while the control plane restarts.  Each has three files in the
proxies directory: `<key>.pid`, `<key>.sock` (its control socket) and
`<key>.json` (the spec it runs).  A new daemon adopts every proxy whose
control socket answers, and kills stale ones, so a proxy is never duplicated.

The exit of a proxy is observed through a pidfd, which works for children and
adopted processes alike.  A proxy that dies is restarted at once, then with
back-off while it keeps dying:

    starting --ready--> running --exit--> backoff --timer--> starting
    (any) --stop()--> stopped

A change of targets or namespace listeners is applied live over the control
socket (established connections are never cut); a change of host listeners
restarts the process, because host sockets must be bound before a rootless
proxy leaves the host's namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gearproxy.errors import LinkError
from gearproxy.log import get_logger

log = get_logger("gearproxy.supervisor")

BACKOFF = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_AFTER = 10.0  # seconds of uptime after which the back-off resets
READY_TIMEOUT = 10.0
CONTROL_TIMEOUT = 5.0
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its NUL


@dataclass(frozen=True, slots=True)
class ProxySpec:
    """What one proxy process should be doing."""

    key: str
    listen: tuple[str, ...]
    targets: tuple[str, ...]
    netns_listen: tuple[tuple[str, str], ...] = ()  # (namespace path, HOST:PORT)
    join_ns_of: int | None = None  # rootless: RootlessKit's pid
    mode: str = "auto"
    deployment: str = ""  # the owner; names may contain dots, so the key cannot say
    busy_poll_us: int = 0  # `gearproxy proxy --busy-poll`; 0 = off

    def argv(self, control: Path) -> list[str]:
        args = [sys.executable, "-m", "gearproxy", "proxy", "--control", str(control),
                "--mode", self.mode]
        for address in self.listen:
            args += ["--listen", address]
        for path, address in self.netns_listen:
            args += ["--listen-netns", f"{path}={address}"]
        for target in self.targets:
            args += ["--target", target]
        if self.join_ns_of is not None:
            args += ["--join-ns-of", str(self.join_ns_of)]
        if self.busy_poll_us:
            args += ["--busy-poll", str(self.busy_poll_us)]
        return args

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProxySpec:
        return cls(
            key=str(data["key"]),
            listen=tuple(data["listen"]),
            targets=tuple(data["targets"]),
            netns_listen=tuple((str(p), str(a)) for p, a in data.get("netns_listen", ())),
            join_ns_of=data.get("join_ns_of"),
            mode=str(data.get("mode", "auto")),
            deployment=str(data.get("deployment", "")),
            busy_poll_us=int(data.get("busy_poll_us", 0)),
        )


async def control_request(path: Path, request: dict[str, Any],
                          wait: float = CONTROL_TIMEOUT) -> dict[str, Any]:
    """Send one request to a proxy's control socket and return its reply within `wait` s."""
    async with asyncio.timeout(wait):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    reply: dict[str, Any] = json.loads(line) if line else {"ok": False, "error": "no reply"}
    return reply


@dataclass(slots=True)
class SupervisedProxy:
    """Run-time record of one proxy process."""

    spec: ProxySpec
    control: Path
    pid: int = 0
    state: str = "starting"
    restarts: int = 0
    crashes: int = 0  # consecutive quick exits, for the back-off
    started_at: float = 0.0
    child: bool = False  # ours to reap (spawned), or adopted from a previous daemon
    pidfd: int = -1
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    restart_task: asyncio.Task[None] | None = None

    def summary(self) -> dict[str, Any]:
        return {"key": self.spec.key, "pid": self.pid, "state": self.state,
                "restarts": self.restarts, "listen": list(self.spec.listen),
                "netns_listen": [list(x) for x in self.spec.netns_listen],
                "targets": list(self.spec.targets)}


class Supervisor:
    """Starts, adopts, re-configures, restarts and stops proxy processes."""

    def __init__(self, directory: Path) -> None:
        check_socket_path(directory / f"{'0' * 16}.sock")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.proxies: dict[str, SupervisedProxy] = {}
        self._closing = False

    # -- files -------------------------------------------------------------

    def _path(self, key: str, suffix: str) -> Path:
        if suffix == ".sock":  # a Unix socket path has 107 bytes at most: keep it short
            return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.sock"
        return self.directory / f"{key}{suffix}"

    def _write_files(self, proxy: SupervisedProxy) -> None:
        self._path(proxy.spec.key, ".pid").write_text(f"{proxy.pid}\n")
        self._path(proxy.spec.key, ".json").write_text(json.dumps(asdict(proxy.spec)))

    def _remove_files(self, key: str) -> None:
        for suffix in (".pid", ".json", ".sock", ".log"):
            with contextlib.suppress(FileNotFoundError):
                self._path(key, suffix).unlink()

    # -- adoption ----------------------------------------------------------

    async def adopt_existing(self) -> list[str]:
        """Adopt every proxy left running by a previous daemon; kill stale ones."""
        adopted: list[str] = []
        for pid_file in sorted(self.directory.glob("*.pid")):
            key = pid_file.stem
            try:
                pid = int(pid_file.read_text().strip() or 0)
                spec = ProxySpec.from_json(json.loads(self._path(key, ".json").read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                self._remove_files(key)
                continue
            if not _is_our_proxy(pid):
                self._remove_files(key)
                continue
            proxy = SupervisedProxy(spec=spec, control=self._path(key, ".sock"), pid=pid)
            try:
                reply = await control_request(proxy.control, {"op": "ping"}, wait=2.0)
                alive = bool(reply.get("ok"))
            except (OSError, TimeoutError, ValueError):
                alive = False
            if not alive:
                log.warning("proxy_stale_killed", key=key, pid=pid)
                _kill(pid, signal.SIGKILL)
                self._remove_files(key)
                continue
            try:
                proxy.pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._remove_files(key)
                continue
            proxy.state = "running"
            proxy.started_at = time.monotonic()
            self.proxies[key] = proxy
            self._watch(proxy)
            adopted.append(key)
            log.info("proxy_adopted", key=key, pid=pid)
        return adopted

    # -- desired state -----------------------------------------------------

    async def ensure(self, spec: ProxySpec) -> SupervisedProxy:
        """Make the proxy `spec.key` run `spec`: start, re-configure live, or restart."""
        proxy = self.proxies.get(spec.key)
        if proxy is None:
            proxy = SupervisedProxy(spec=spec, control=self._path(spec.key, ".sock"))
            self.proxies[spec.key] = proxy
            await self._spawn(proxy)
            return proxy
        old = proxy.spec
        if old == spec:
            return proxy
        if (old.listen != spec.listen or old.join_ns_of != spec.join_ns_of
                or old.mode != spec.mode or old.busy_poll_us != spec.busy_poll_us
                or proxy.state != "running"):
            proxy.spec = spec
            await self._terminate(proxy, drain=True)
            await self._spawn(proxy)
            return proxy
        await self._reconfigure(proxy, spec)
        return proxy

    async def _reconfigure(self, proxy: SupervisedProxy, spec: ProxySpec) -> None:
        old = proxy.spec
        if old.targets != spec.targets:
            await self._control(proxy, {"op": "set_targets", "targets": list(spec.targets)})
        for path, address in old.netns_listen:
            if (path, address) not in spec.netns_listen:
                await self._control(proxy, {"op": "remove_listener", "listen": address,
                                            "netns": path}, strict=False)
        for path, address in spec.netns_listen:
            if (path, address) not in old.netns_listen:
                reply = await self._control(proxy, {"op": "add_listener", "listen": address,
                                                    "netns": path}, strict=False)
                # A consumer that died meanwhile is no error: its "die" event re-applies,
                # and its next start gets a new namespace.
                if not reply.get("ok") and _namespace_exists(path):
                    raise LinkError(f"proxy {proxy.spec.key} refused add_listener: "
                                    f"{reply.get('error', 'unknown error')}")
        proxy.spec = spec
        self._write_files(proxy)

    async def _control(self, proxy: SupervisedProxy, request: dict[str, Any], *,
                       strict: bool = True) -> dict[str, Any]:
        try:
            reply = await control_request(proxy.control, request)
        except (OSError, TimeoutError, ValueError) as exc:
            raise LinkError(f"proxy {proxy.spec.key} does not answer on its control "
                            f"socket: {exc}") from exc
        if strict and not reply.get("ok"):
            raise LinkError(f"proxy {proxy.spec.key} refused {request['op']}: "
                            f"{reply.get('error', 'unknown error')}")
        return reply

    async def stats(self, key: str) -> dict[str, Any] | None:
        proxy = self.proxies.get(key)
        if proxy is None or proxy.state != "running":
            return None
        try:
            reply = await control_request(proxy.control, {"op": "stats"}, wait=2.0)
        except (OSError, TimeoutError, ValueError):
            return None
        stats = reply.get("stats")
        return stats if isinstance(stats, dict) else None

    async def stop(self, key: str) -> None:
        """Stop the proxy `key` (draining) and forget it."""
        proxy = self.proxies.pop(key, None)
        if proxy is None:
            return
        proxy.state = "stopped"
        if proxy.restart_task is not None:
            proxy.restart_task.cancel()
        await self._terminate(proxy, drain=True)
        self._remove_files(key)

    async def close(self, *, stop_proxies: bool = False) -> None:
        """Stop watching; proxies keep running unless `stop_proxies`."""
        self._closing = True
        for proxy in list(self.proxies.values()):
            if proxy.restart_task is not None:
                proxy.restart_task.cancel()
            if stop_proxies:
                await self.stop(proxy.spec.key)
            else:
                self._unwatch(proxy)

    # -- processes ---------------------------------------------------------

    async def _spawn(self, proxy: SupervisedProxy) -> None:
        with contextlib.suppress(FileNotFoundError):
            proxy.control.unlink()
        proxy.pid = self._popen(_without_missing_namespaces(proxy.spec), proxy.control)
        proxy.child = True
        proxy.pidfd = os.pidfd_open(proxy.pid)
        proxy.state = "starting"
        proxy.started_at = time.monotonic()
        proxy.exited = asyncio.Event()
        self._write_files(proxy)
        self._watch(proxy)
        await self._wait_ready(proxy)

    def _popen(self, spec: ProxySpec, control: Path) -> int:
        """Start the process in its own session (it outlives the daemon), logging to a file.

        posix_spawn rather than subprocess.Popen: a Popen object would insist on
        owning the child until it exits, but these children are meant to outlive
        us; we reap them ourselves when their pidfd says they ended.  (Python opens
        every descriptor close-on-exec, so the child inherits only 0, 1 and 2.)"""
        argv = spec.argv(control)
        with open(self._path(spec.key, ".log"), "ab") as logfile, \
                open(os.devnull, "rb") as devnull:
            return os.posix_spawn(argv[0], argv, dict(os.environ), setsid=True, file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull.fileno(), 0),
                (os.POSIX_SPAWN_DUP2, logfile.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, logfile.fileno(), 2),
            ])

    async def _wait_ready(self, proxy: SupervisedProxy) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if proxy.exited.is_set():
                raise LinkError(f"proxy {proxy.spec.key} exited at start-up: "
                                f"{self._last_error(proxy.spec.key)}")
            try:
                reply = await control_request(proxy.control, {"op": "ping"}, wait=1.0)
                if reply.get("ok"):
                    proxy.state = "running"
                    return
            except (OSError, TimeoutError, ValueError):
                pass
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await proxy.exited.wait()
        raise LinkError(f"proxy {proxy.spec.key} did not become ready within {READY_TIMEOUT:g}s")

    def _last_error(self, key: str) -> str:
        try:
            lines = self._path(key, ".log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1][-300:] if lines else "no output"

    def _watch(self, proxy: SupervisedProxy) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(proxy.pidfd, self._on_exit, proxy)

    def _unwatch(self, proxy: SupervisedProxy) -> None:
        if proxy.pidfd >= 0:
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                asyncio.get_running_loop().remove_reader(proxy.pidfd)
            os.close(proxy.pidfd)
            proxy.pidfd = -1

    def _on_exit(self, proxy: SupervisedProxy) -> None:
        self._unwatch(proxy)
        code: int | None = None
        if proxy.child:
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(proxy.pid, 0)
                code = os.waitstatus_to_exitcode(status)
            proxy.child = False
        proxy.exited.set()
        if proxy.state in ("stopped", "stopping") or self._closing:
            return
        if time.monotonic() - proxy.started_at > STABLE_AFTER:
            proxy.crashes = 0
        delay = BACKOFF[min(proxy.crashes, len(BACKOFF) - 1)]
        proxy.state = "backoff"
        proxy.crashes += 1
        proxy.restarts += 1
        log.warning("proxy_exited", key=proxy.spec.key, pid=proxy.pid, code=code,
                    restart_in=delay, restarts=proxy.restarts)
        proxy.restart_task = asyncio.get_running_loop().create_task(self._restart(proxy, delay))

    async def _restart(self, proxy: SupervisedProxy, delay: float) -> None:
        await asyncio.sleep(delay)
        if proxy.state != "backoff" or self.proxies.get(proxy.spec.key) is not proxy:
            return
        try:
            await self._spawn(proxy)
        except LinkError as exc:
            log.error("proxy_restart_failed", key=proxy.spec.key, error=str(exc))

    async def _terminate(self, proxy: SupervisedProxy, *, drain: bool) -> None:
        if proxy.pid <= 0 or proxy.exited.is_set():
            return
        previous, proxy.state = proxy.state, "stopping"
        _kill(proxy.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(12.0 if drain else 0.5):
                await proxy.exited.wait()
        if not proxy.exited.is_set():
            _kill(proxy.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await proxy.exited.wait()
        if proxy.state == "stopping":
            proxy.state = previous


def check_socket_path(path: Path) -> None:
    """Refuse, in words, a Unix socket path the kernel would refuse (over 107 bytes)."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise LinkError(f"socket path {path} is longer than a Unix socket allows "
                        f"({MAX_SOCKET_PATH} bytes): set GEARPROXY_STATE_DIR to a shorter "
                        "directory")


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _is_our_proxy(pid: int) -> bool:
    """True when `pid` is a `gearproxy proxy` process (guards against reused pids)."""
    if pid <= 0:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"gearproxy" in argv and b"proxy" in argv


def _namespace_exists(path: str) -> bool:
    """Whether a `/proc/<pid>/ns/net` still exists (procfs: answers without blocking)."""
    return os.path.exists(path)


def _without_missing_namespaces(spec: ProxySpec) -> ProxySpec:
    """Drop namespace listeners whose namespace is gone (the consumer stopped):
    the lifecycle re-adds them when the consumer starts again."""
    alive = tuple((p, a) for p, a in spec.netns_listen if _namespace_exists(p))
    if alive == spec.netns_listen:
        return spec
    return replace(spec, netns_listen=alive)
