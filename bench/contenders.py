"""The forwarders the bench compares, each started as a subprocess on loopback.

A contender knows whether it is installed, its version, and how to start one forwarding
instance towards a target.  Listening ports are never guessed: haproxy gets a socket we
bound to port 0 (``bind fd@N``); the others bind port 0 themselves and we read the port
back from /proc.  An instance is ready once a probe (a 64-byte echo through it to the
sink, or a bare connect for iperf3) succeeds, within a deadline.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import procfs

Addr = tuple[str, int]
Probe = Callable[[Addr], None]
START_TIMEOUT = 20.0
HAPROXY_MAXPIPES = 64
BUSY_POLL_US = 200       # the busy-poll contender's window: a few round trips long


def max_conns() -> int:
    """Connections a forwarder can hold with this process's RLIMIT_NOFILE (inherited).

    Two fds per connection plus headroom for listeners, pipes and the event loop.  Without
    CAP_SYS_RESOURCE the hard limit caps this (20,000 fds here: under 10,000 connections).
    """
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(64, (soft - 256 - 2 * HAPROXY_MAXPIPES) // 2)


class StartError(RuntimeError):
    """A contender was found but did not come up; the message says why."""


@dataclass
class Instance:
    """One running forwarder (or, for `direct`, just the target's address)."""

    name: str
    addr: Addr
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    extra_pids: list[int] = field(default_factory=list)

    def pids(self) -> list[int]:
        """The forwarder's process tree now (socat forks a child per connection)."""
        if self.proc is None:
            return []
        return procfs.descendants(self.proc.pid)

    @property
    def root_pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; only this instance's own process."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def echo_probe(addr: Addr) -> None:
    """One 64-byte echo through `addr` to the bench sink: proves the whole path works."""
    from bench.load import MESSAGE, MODE_ECHO, _connect, _recv_exact

    message = bytes([MODE_ECHO]) * MESSAGE
    with _connect(addr, 2.0) as sock:
        sock.sendall(message)
        if _recv_exact(sock, MESSAGE) != message:
            raise OSError("echo mismatch")


def connect_probe(addr: Addr) -> None:
    """A bare connect (for targets that must not receive stray bytes, like iperf3)."""
    socket.create_connection(addr, 2.0).close()


def _tail(path: Path | None, limit: int = 600) -> str:
    if path is None or not path.exists():
        return ""
    return path.read_text(errors="replace")[-limit:].strip()


def launch(name: str, argv: list[str], log: Path, *, pass_fds: tuple[int, ...] = (),
           known_port: int | None = None, probe: Probe = echo_probe,
           host: str = "127.0.0.1") -> Instance:
    """Start `argv`, learn its port, and wait until `probe` succeeds through it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                pass_fds=pass_fds, start_new_session=True)
    inst = Instance(name, (host, known_port or 0), proc, log)
    deadline = time.monotonic() + START_TIMEOUT
    last = "no listening socket yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"{name} exited with {proc.returncode}: {_tail(log)}")
        if inst.addr[1] == 0:
            ports = procfs.listening_ports(inst.pids())
            if len(ports) == 1:
                inst.addr = (host, ports.pop())
        if inst.addr[1]:
            try:
                probe(inst.addr)
                return inst
            except OSError as err:
                last = f"probe: {err}"
        time.sleep(0.05)
    inst.stop()
    raise StartError(f"{name} not ready within {START_TIMEOUT:.0f} s ({last}): {_tail(log)}")


def _run_text(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def _deb_version(package: str) -> str:
    return _run_text(["dpkg-query", "-W", "-f", "${Version}", package]) or "unknown"


class Contender:
    """Base: a named way to forward loopback TCP.  Subclasses override three methods."""

    name = "?"
    note = ""

    def unavailable(self) -> str | None:
        """Why this contender cannot run here, or None."""
        return None

    def version(self) -> str:
        return ""

    def start(self, target: Addr, logdir: Path, *, tag: str = "",
              probe: Probe = echo_probe) -> Instance:
        raise NotImplementedError


class Direct(Contender):
    """No forwarder: the client talks to the target.  The limit everything is measured against."""

    name = "direct"
    note = "no forwarder (the limit)"

    def version(self) -> str:
        return "kernel loopback"

    def start(self, target: Addr, logdir: Path, *, tag: str = "",
              probe: Probe = echo_probe) -> Instance:
        return Instance(self.name, target)


class Gearproxy(Contender):
    """`python -m gearproxy proxy` in one of its forwarding modes."""

    def __init__(self, mode: str, busy_poll_us: int = 0) -> None:
        self.mode = mode
        self.busy_poll_us = busy_poll_us
        self.name = f"gearproxy-{mode}" if not busy_poll_us else "gearproxy-busypoll"
        self.note = f"--mode {mode}, uvloop, one process"
        if busy_poll_us:
            self.note += f", --busy-poll {busy_poll_us} (keeps a CPU busy while traffic flows)"

    def unavailable(self) -> str | None:
        try:
            found = importlib.util.find_spec("gearproxy.proxy.command")
        except ImportError as err:
            return f"gearproxy not importable: {err}"
        return None if found else "gearproxy.proxy.command does not exist yet"

    def version(self) -> str:
        try:
            import gearproxy
        except ImportError:
            return "unknown"
        # Say which checkout is measured: an editable install may point elsewhere.
        where = Path(gearproxy.__file__).resolve().parent.parent
        return f"{getattr(gearproxy, '__version__', 'unknown')} ({where})"

    def start(self, target: Addr, logdir: Path, *, tag: str = "",
              probe: Probe = echo_probe) -> Instance:
        argv = [sys.executable, "-m", "gearproxy", "proxy", "--listen", "127.0.0.1:0",
                "--target", f"{target[0]}:{target[1]}", "--mode", self.mode,
                "--max-conns", str(max_conns()), "--busy-poll", str(self.busy_poll_us)]
        return launch(self.name, argv, logdir / f"{self.name}{tag}.log", probe=probe)


class Socat(Contender):
    name = "socat"
    note = "fork per connection, nodelay"

    def unavailable(self) -> str | None:
        return None if shutil.which("socat") else "socat not installed"

    def version(self) -> str:
        return _deb_version("socat")

    def start(self, target: Addr, logdir: Path, *, tag: str = "",
              probe: Probe = echo_probe) -> Instance:
        argv = ["socat", "TCP-LISTEN:0,bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay",
                f"TCP:{target[0]}:{target[1]},nodelay"]
        return launch(self.name, argv, logdir / f"socat{tag}.log", probe=probe)


HAPROXY_CFG = """\
global
    maxconn {maxconn}
    maxpipes {maxpipes}
    tune.pipesize {pipesize}
defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    option splice-request
    option splice-response
frontend bench
    bind fd@{fd}
    default_backend target
backend target
    server t {host}:{port}
"""


class HAProxy(Contender):
    name = "haproxy"
    note = "splice-request/response forced, pipes of fs.pipe-max-size, default nbthread"

    def unavailable(self) -> str | None:
        return None if shutil.which("haproxy") else "haproxy not installed"

    def version(self) -> str:
        lines = _run_text(["haproxy", "-v"]).splitlines()
        return lines[0].split()[2] if lines and len(lines[0].split()) > 2 else "unknown"

    def start(self, target: Addr, logdir: Path, *, tag: str = "",
              probe: Probe = echo_probe) -> Instance:
        try:
            pipesize = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        except (OSError, ValueError):
            pipesize = 1 << 20
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(4096)
            port = listener.getsockname()[1]
            cfg = logdir / f"haproxy{tag}.cfg"
            logdir.mkdir(parents=True, exist_ok=True)
            cfg.write_text(HAPROXY_CFG.format(maxconn=max_conns(), pipesize=pipesize,
                                              maxpipes=HAPROXY_MAXPIPES,
                                              fd=listener.fileno(), host=target[0],
                                              port=target[1]))
            return launch(self.name, ["haproxy", "-db", "-f", str(cfg)],
                          logdir / f"haproxy{tag}.log", pass_fds=(listener.fileno(),),
                          known_port=port, probe=probe)
        finally:
            listener.close()


DOCKER_PROXY_PATHS = ("/usr/sbin/docker-proxy", "/usr/libexec/docker/docker-proxy",
                      "/usr/bin/docker-proxy", "/usr/local/bin/docker-proxy")


class DockerProxy(Contender):
    """Docker's userland proxy, started the way dockerd starts it (fd 3 reports start-up)."""

    name = "docker-proxy"
    note = "Docker's userland-proxy (Go, io.Copy)"

    def _path(self) -> str | None:
        found = shutil.which("docker-proxy")
        if found:
            return found
        return next((p for p in DOCKER_PROXY_PATHS if Path(p).is_file()), None)

    def unavailable(self) -> str | None:
        return None if self._path() else "docker-proxy not found (docker.io package)"

    def version(self) -> str:
        return f"docker.io {_deb_version('docker.io')}"

    def start(self, target: Addr, logdir: Path, *, tag: str = "",
              probe: Probe = echo_probe) -> Instance:
        path = self._path()
        assert path is not None
        # dockerd hands docker-proxy a pipe as fd 3 and reads "0\n" (or "1\n<error>") from
        # it; without it the proxy would write to and close whatever fd 3 happens to be.
        r, w = os.pipe()
        try:
            argv = ["bash", "-c", f'exec "$0" "$@" 3>&{w}', path, "-proto", "tcp",
                    "-host-ip", "127.0.0.1", "-host-port", "0",
                    "-container-ip", target[0], "-container-port", str(target[1])]
            return launch(self.name, argv, logdir / f"docker-proxy{tag}.log", pass_fds=(w,),
                          probe=probe)
        finally:
            os.close(w)
            os.close(r)


def all_contenders() -> list[Contender]:
    """Every contender the bench knows, in table order."""
    return [Direct(), Gearproxy("splice"), Gearproxy("copy"), Gearproxy("splice", BUSY_POLL_US),
            Socat(), HAProxy(), DockerProxy()]
