"""`gearproxy proxy` as a process: options, exit codes, control socket, metrics, signals, memory."""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from gearproxy_harness import unavailable
from test_proxy_support import (
    Backends,
    Control,
    ProxyProcess,
    connect,
    recv_all,
    recv_exact,
    wait_for,
)

from gearproxy.cli import main


@pytest.fixture
def backends() -> Iterator[Backends]:
    b = Backends()
    yield b
    b.close()


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gearproxy", "proxy", *args],
                          check=False, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("args", "option"), [
    (["--listen", "127.0.0.1"], "--listen"),
    (["--listen", "nohost:80"], "--listen"),
    (["--listen", "127.0.0.1:99999"], "--listen"),
    (["--listen", "::1:80"], "--listen"),
    (["--listen", "127.0.0.1:0", "--target", "10.0.0.1"], "--target"),
    (["--listen", "127.0.0.1:0", "--target", "10.0.0.1:0"], "--target"),
    (["--listen-netns", "127.0.0.1:80"], "--listen-netns"),
    (["--listen", "127.0.0.1:0", "--metrics", "x:y"], "--metrics"),
    (["--listen", "127.0.0.1:0", "--connect-timeout", "0"], "--connect-timeout"),
    (["--listen", "127.0.0.1:0", "--max-conns", "-1"], "--max-conns"),
    (["--listen", "127.0.0.1:0", "--mode", "fast"], "--mode"),
    (["--listen", "127.0.0.1:0", "--busy-poll", "-1"], "--busy-poll"),
    (["--listen", "127.0.0.1:0", "--busy-poll", "2000000"], "--busy-poll"),
    ([], "--listen"),
])
def test_malformed_option_exits_2_naming_it(args: list[str], option: str) -> None:
    """A malformed option value exits 2 with one line naming the option."""
    result = CliRunner().invoke(main, ["proxy", *args])
    assert result.exit_code == 2, result.output
    assert option in result.output


def test_address_in_use_exits_1() -> None:
    """A --listen address already bound exits 1 with `address in use: HOST:PORT`."""
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    result = run_cli("--listen", f"127.0.0.1:{port}", "--target", "127.0.0.1:9")
    holder.close()
    assert result.returncode == 1
    assert f"address in use: 127.0.0.1:{port}" in result.stderr


def test_missing_namespace_exits_1_saying_which(tmp_path: Path) -> None:
    """A --listen-netns path that does not exist exits 1 naming the path and `missing`."""
    path = tmp_path / "no-such-ns"
    result = run_cli("--listen-netns", f"{path}=127.0.0.1:0", "--target", "127.0.0.1:9")
    assert result.returncode == 1
    assert str(path) in result.stderr and "missing" in result.stderr


def test_non_namespace_path_exits_1_saying_why(tmp_path: Path) -> None:
    """A --listen-netns path that is not a network namespace exits 1 saying so."""
    path = tmp_path / "plain-file"
    path.write_text("")
    result = run_cli("--listen-netns", f"{path}=127.0.0.1:0", "--target", "127.0.0.1:9")
    assert result.returncode == 1
    assert str(path) in result.stderr and "not a network namespace" in result.stderr


def test_namespace_not_permitted_exits_1_saying_why() -> None:
    """A namespace the process may not join (from an unprivileged user namespace) exits 1."""
    ns = "/proc/1/ns/net"
    probe = subprocess.run(["unshare", "--user", "true"], check=False, capture_output=True,
                           timeout=20)
    if probe.returncode != 0:
        unavailable("unprivileged user namespaces are not available here")
    result = subprocess.run(
        ["unshare", "--user", sys.executable, "-m", "gearproxy", "proxy",
         "--listen-netns", f"{ns}=127.0.0.1:0", "--target", "127.0.0.1:9"],
        check=False, capture_output=True, text=True, timeout=20)
    assert result.returncode == 1, result.stderr
    assert ns in result.stderr and "not permitted" in result.stderr


def test_control_socket_serves_and_survives_bad_requests(tmp_path: Path,
                                                         backends: Backends) -> None:
    """Malformed control requests get error replies; the proxy keeps serving; socket is 0600."""
    echo = backends.echo()
    px = ProxyProcess(tmp_path, "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{echo}")
    try:
        ctl = px.ctl
        assert ctl is not None
        assert stat.S_IMODE(px.control_path.stat().st_mode) == 0o600
        for bad in (b"not json", b"[1,2]", b'{"op":"nope"}', b'{"op":"set_targets"}',
                    b'{"op":"set_targets","targets":["bad"]}', b'{"op":"add_listener"}',
                    b'{"op":"add_listener","listen":"127.0.0.1:0","netns":"/nonexistent"}'):
            reply = ctl.raw(bad)
            assert reply["ok"] is False and reply["error"], bad
        assert ctl(op="ping") == {"ok": True, "pong": True}
        assert ctl(op="set_targets", targets=[f"127.0.0.1:{echo}"])["ok"]
        added = ctl(op="add_listener", listen="127.0.0.2:0")
        assert added["ok"] and added["existed"] is False, added
        assert ctl(op="add_listener", listen="127.0.0.2:0")["existed"] is True
        port2 = int(added["listen"].rsplit(":", 1)[1])
        c = socket.create_connection(("127.0.0.2", port2), timeout=10)
        c.sendall(b"via-second")
        assert recv_exact(c, 10) == b"via-second"
        assert ctl(op="remove_listener", listen="127.0.0.2:0") == {"ok": True, "removed": True}
        c.sendall(b"still")                                   # live connection not cut
        assert recv_exact(c, 5) == b"still"
        c.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port2), timeout=10).close()
        other = Control(px.control_path)                      # a second client is served too
        assert other(op="ping")["ok"]
        other.close()
    finally:
        assert px.stop() == 0


def test_metrics_endpoint_serves_prometheus_text(tmp_path: Path, backends: Backends) -> None:
    """--metrics answers GET /metrics with Prometheus text including per-backend counters."""
    echo = backends.echo()
    px = ProxyProcess(tmp_path, "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{echo}",
                      "--metrics", "127.0.0.1:0")
    try:
        mport = int(px.stats()["metrics"].rsplit(":", 1)[1])   # bound port, read back
        c = connect(px.port())
        c.sendall(b"abc")
        assert recv_exact(c, 3) == b"abc"
        c.close()
        wait_for(lambda: px.stats()["totals"]["connections_active"] == 0)
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as resp:
            body = resp.read().decode()
            assert resp.headers["Content-Type"].startswith("text/plain")
        assert "gearproxy_connections_total 1" in body
        assert f'gearproxy_backend_bytes_total{{target="127.0.0.1:{echo}",direction="in"}} 3' \
            in body
    finally:
        assert px.stop() == 0


def test_sigterm_drains_then_exits_0(tmp_path: Path, backends: Backends) -> None:
    """SIGTERM stops accepting, lets the open connection finish, then exits 0."""
    echo = backends.echo()
    px = ProxyProcess(tmp_path, "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{echo}",
                      "--drain-timeout", "20")
    port = px.port()
    c = connect(port)
    c.sendall(b"before")
    assert recv_exact(c, 6) == b"before"
    px.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "draining" in px.output(), 10, "draining log")
    with pytest.raises(ConnectionRefusedError):
        connect(port).close()
    c.sendall(b"during")                                      # still relayed while draining
    assert recv_exact(c, 6) == b"during"
    assert px.proc.poll() is None
    c.shutdown(socket.SHUT_WR)
    assert recv_all(c) == b""
    c.close()
    assert px.proc.wait(10) == 0
    px.stop()
    assert not px.control_path.exists()


def test_drain_timeout_cuts_and_second_signal_exits_at_once(tmp_path: Path,
                                                            backends: Backends) -> None:
    """Open connections are cut after --drain-timeout; a second SIGTERM exits immediately."""
    echo = backends.echo()
    for second in (False, True):
        d = tmp_path / str(second)
        d.mkdir()
        px = ProxyProcess(d, "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{echo}",
                          "--drain-timeout", "30" if second else "0.5")
        c = connect(px.port())
        c.sendall(b"x")
        assert recv_exact(c, 1) == b"x"
        t0 = time.monotonic()
        px.proc.send_signal(signal.SIGTERM)
        if second:
            wait_for(lambda px=px: "draining" in px.output(), 10, "draining log")
            px.proc.send_signal(signal.SIGTERM)
        assert px.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
        with pytest.raises(ConnectionResetError):
            recv_all(c)
        c.close()
        px.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_slow_receiver_keeps_proxy_memory_bounded(tmp_path: Path, mode: str) -> None:
    """A backend that never reads: the sender is stalled and proxy RSS grows < 24 MiB."""
    lsock = socket.create_server(("127.0.0.1", 0))
    px = ProxyProcess(tmp_path, "--listen", "127.0.0.1:0", "--mode", mode,
                      "--target", f"127.0.0.1:{lsock.getsockname()[1]}")
    try:
        before = px.rss_kib()
        c = connect(px.port())
        stalled, _ = lsock.accept()                          # accepted, never read
        c.settimeout(0.5)
        chunk = b"z" * (1 << 20)
        sent = 0
        deadline = time.monotonic() + 8
        while sent < (512 << 20) and time.monotonic() < deadline:
            try:
                sent += c.send(chunk)
            except TimeoutError:
                break
        grown = px.rss_kib() - before
        assert sent < (256 << 20), "sender never stalled"
        assert grown < 24 * 1024, f"proxy RSS grew {grown} KiB after {sent} bytes"
        assert px.stats()["mode"] == mode
        stalled.close()
        c.close()
    finally:
        px.stop()
        lsock.close()

