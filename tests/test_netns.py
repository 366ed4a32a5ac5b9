"""Network namespaces: a listener inside one, and joining one as a rootless proxy does.

The tests create their own namespaces with `unshare` (a process that holds
the namespace and is killed afterwards) and reach them with `nsenter`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from gearproxy_harness import unavailable
from test_proxy_support import Backends, ProxyProcess, connect, recv_exact

from gearproxy.errors import LinkError
from gearproxy.netns import join_namespaces, listen_in_netns


@pytest.fixture(autouse=True)
def _util_linux() -> None:
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        unavailable("needs unshare and nsenter (util-linux)")

ECHO = """
import socket, socketserver, sys
class H(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)
srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""

CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
s.sendall(b"inside-ns")
got = b""
while len(got) < 9:
    data = s.recv(64)
    if not data:
        break
    got += data
print(got.decode())
"""


class Namespace:
    """A process holding fresh namespaces (net, optionally user) with lo up."""

    def __init__(self, *, user: bool, program: list[str]) -> None:
        flags = ["--user", "--map-root-user"] if user else []
        script = 'ip link set lo up && exec "$@"'
        self.proc = subprocess.Popen(["unshare", *flags, "--net", "sh", "-c", script, "sh",
                                      *program], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.first_line = self.proc.stdout.readline().strip()
        if self.proc.poll() is not None:
            unavailable(f"cannot create namespaces here (unshare exited {self.proc.returncode})")
        self.net = f"/proc/{self.proc.pid}/ns/net"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def backends() -> Iterator[Backends]:
    b = Backends()
    yield b
    b.close()


def test_listener_inside_namespace_reached_from_client_inside(tmp_path: Path,
                                                              backends: Backends) -> None:
    """--listen-netns puts the listener in the namespace; a client there reaches the host target."""
    ns = Namespace(user=False, program=["sh", "-c", "echo up; exec sleep 60"])
    try:
        echo = backends.echo()
        px = ProxyProcess(tmp_path, "--listen-netns", f"{ns.net}=127.0.0.1:0",
                          "--target", f"127.0.0.1:{echo}")
        try:
            listener = px.stats()["listeners"][0]
            assert listener["netns"] == ns.net
            port = listener["bound"].rsplit(":", 1)[1]
            inside = subprocess.run(["nsenter", f"--net={ns.net}", sys.executable, "-c", CLIENT,
                                     port], check=False, capture_output=True, text=True, timeout=20)
            assert inside.stdout.strip() == "inside-ns", inside.stderr
            with pytest.raises(ConnectionRefusedError):       # nothing listens on the host
                connect(int(port)).close()
            assert px.ctl is not None                          # add/remove at run time too
            added = px.ctl(op="add_listener", listen="127.0.0.1:0", netns=ns.net)
            assert added["ok"], added
            port2 = added["listen"].rsplit(":", 1)[1]
            inside = subprocess.run(["nsenter", f"--net={ns.net}", sys.executable, "-c", CLIENT,
                                     port2], check=False, capture_output=True, text=True,
                                    timeout=20)
            assert inside.stdout.strip() == "inside-ns", inside.stderr
        finally:
            assert px.stop() == 0
    finally:
        ns.close()


def test_listen_in_netns_leaves_calling_thread_in_its_namespace() -> None:
    """Creating a socket in another namespace does not move any thread of the caller."""
    ns = Namespace(user=False, program=["sh", "-c", "echo up; exec sleep 60"])
    try:
        before = os.readlink("/proc/thread-self/ns/net")
        sock = listen_in_netns(ns.net, socket.AF_INET, ("127.0.0.1", 0), "127.0.0.1:0")
        assert os.readlink("/proc/thread-self/ns/net") == before
        sock.close()
    finally:
        ns.close()


def test_join_namespaces_refuses_once_threads_exist() -> None:
    """join_namespaces raises LinkError when the process already has threads (EINVAL trap)."""
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, args=(10,))
    t.start()
    try:
        with pytest.raises(LinkError, match="already has threads"):
            join_namespaces(os.getpid())
    finally:
        stop.set()
        t.join()


def test_join_ns_of_relays_host_listener_to_target_inside(tmp_path: Path) -> None:
    """--join-ns-of: host listener bound first, then user+net namespaces joined, target inside."""
    ns = Namespace(user=True, program=[sys.executable, "-c", ECHO])
    try:
        echo_port = int(ns.first_line)
        px = ProxyProcess(tmp_path, "--listen", "127.0.0.1:0", "--join-ns-of", str(ns.proc.pid),
                          "--target", f"127.0.0.1:{echo_port}")
        try:
            target_ns = os.readlink(ns.net)
            assert os.readlink(f"/proc/{px.proc.pid}/ns/net") == target_ns
            assert os.readlink(f"/proc/{px.proc.pid}/ns/user") == os.readlink(
                f"/proc/{ns.proc.pid}/ns/user")
            c = connect(px.port())                              # the host-side listener
            c.sendall(b"rootless")
            assert recv_exact(c, 8) == b"rootless"
            c.close()
        finally:
            assert px.stop() == 0
    finally:
        ns.close()


def test_join_ns_of_missing_pid_exits_1(tmp_path: Path) -> None:
    """--join-ns-of a PID with no namespaces to open exits 1 naming the path."""
    result = subprocess.run([sys.executable, "-m", "gearproxy", "proxy", "--listen",
                             "127.0.0.1:0", "--join-ns-of", "999999999"],
                            check=False, capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert "/proc/999999999/ns/user" in result.stderr and "missing" in result.stderr
