"""Drives gearproxy as a user does, for the end-to-end tests: the CLI as a
subprocess, a daemon in a private state directory, and probes from inside
containers and from the host."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0,
             interval: float = 0.1) -> Any:
    """Call `check` until it returns something truthy, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, AssertionError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not true within {timeout}s (last: {last!r})")


@dataclass
class Gearproxy:
    """The CLI of one private installation (state directory), run as subprocesses."""

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    daemon: subprocess.Popen[bytes] | None = None

    def environ(self) -> dict[str, str]:
        return {**os.environ, "GEARPROXY_STATE_DIR": str(self.state_dir), **self.env}

    def run(self, *args: str, timeout: float = 240, check: bool = False,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "gearproxy", *args], env=self.environ(),
                              capture_output=True, text=True, timeout=timeout, input=stdin,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"gearproxy {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stderr}")
        return proc

    def json(self, *args: str, timeout: float = 240) -> Any:
        proc = self.run(*args, "--json", timeout=timeout, check=True)
        return json.loads(proc.stdout)

    def start_daemon(self) -> subprocess.Popen[bytes]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir / "daemon.test.log", "ab")  # noqa: SIM115
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "gearproxy", "daemon"], env=self.environ(),
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        wait_for("daemon answers", lambda: self.run("list").returncode == 0, timeout=60,
                 interval=0.2)
        return self.daemon

    def stop_daemon(self, sig: int = signal.SIGTERM) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(sig)
            self.daemon.wait(30)
        self.daemon = None

    def proxy_pids(self) -> dict[str, int]:
        """Proxy processes according to their pid files (key -> pid), alive ones only."""
        pids = {}
        for pid_file in (self.state_dir / "proxies").glob("*.pid"):
            pid = int(pid_file.read_text().strip() or 0)
            if pid > 0 and Path(f"/proc/{pid}").exists():
                pids[pid_file.stem] = pid
        return pids

    def kill_all_proxies(self) -> None:
        for pid in proxy_processes(self.state_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def proxy_processes(state_dir: Path) -> list[int]:
    """Every running `gearproxy proxy` process whose control socket is under `state_dir`."""
    found = []
    marker = str(state_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"proxy" in argv and any(marker in a for a in argv):
            found.append(int(entry.name))
    return found


def echo_roundtrip(port: int, payload: bytes, host: str = "127.0.0.1",
                   timeout: float = 10.0) -> bytes:
    """Send `payload` to an echo server through `host:port`, half-close, read all back."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        received = bytearray()
        view = memoryview(payload)
        sock.setblocking(True)
        sent = 0
        while sent < len(view):
            sent += sock.send(view[sent:sent + 65536])
            while True:  # read what is there so neither side's buffers fill up
                sock.settimeout(0)
                try:
                    chunk = sock.recv(1 << 20)
                except (BlockingIOError, TimeoutError):
                    break
                if not chunk:
                    break
                received += chunk
            sock.settimeout(timeout)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(1 << 20):
            received += chunk
    return bytes(received)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def http_get(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> str:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode(errors="replace")


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose prerequisite is missing on a developer machine; fail it under CI,
    whose machine must have everything (a skipped test there would hide a broken CI)."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"{reason} (CI=true: prerequisites must be present)", pytrace=False)
    pytest.skip(reason)
