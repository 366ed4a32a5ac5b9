"""`gearproxy daemon` as systemd runs it: the notify protocol on a real datagram socket,
one daemon per state directory, and a clear failure when the engine does not answer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import docker
import pytest
from gearproxy_harness import Gearproxy

pytestmark = pytest.mark.docker


def receive(sock: socket.socket, want: str, timeout: float = 60) -> list[str]:
    """Datagrams until one contains `want` (each split into its lines)."""
    sock.settimeout(timeout)
    seen: list[str] = []
    while not any(want in line for line in seen):
        seen.extend(sock.recv(4096).decode().splitlines())
    return seen


def test_daemon_notifies_ready_status_and_stopping(
        tmp_path: Path, docker_client: docker.DockerClient) -> None:
    """READY=1 with a STATUS= summary once reconcile is done, STOPPING=1 on SIGTERM; the
    proxies it spawns do not inherit NOTIFY_SOCKET."""
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        env = {**os.environ, "GEARPROXY_STATE_DIR": str(tmp_path / "state"),
               "NOTIFY_SOCKET": str(notify)}
        daemon = subprocess.Popen([sys.executable, "-m", "gearproxy", "daemon"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            lines = receive(sock, "READY=1")
            assert any(line.startswith("STATUS=0 deployments") for line in lines)
            assert Gearproxy(tmp_path / "state").run("list").returncode == 0  # serving
            daemon.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in receive(sock, "STOPPING=1")
            assert daemon.wait(30) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()


def test_second_daemon_on_the_same_state_refuses(
        tmp_path: Path, docker_client: docker.DockerClient) -> None:
    """Only one daemon serves a state directory; a second one exits 1 saying so."""
    gp = Gearproxy(tmp_path / "state")
    gp.start_daemon()
    try:
        second = gp.run("daemon", timeout=60)
        assert second.returncode == 1
        assert "already serves" in second.stderr.strip().splitlines()[-1]
        assert gp.run("list").returncode == 0  # the first one is untouched
    finally:
        gp.stop_daemon()


def test_daemon_with_no_engine_exits_1_in_one_line(tmp_path: Path) -> None:
    """DOCKER_HOST pointing nowhere: the daemon exits 1 with one line naming the engine."""
    gp = Gearproxy(tmp_path / "state", env={"DOCKER_HOST": "unix:///nonexistent.sock"})
    proc = gp.run("daemon", timeout=60)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gearproxy: error:") and "/nonexistent.sock" in last
