"""Host-side port probing (`gearproxy.ports.port_is_free`) against real sockets on this host."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gearproxy.ports import port_is_free


@contextmanager
def listener(address: str, family: socket.AddressFamily = socket.AF_INET,
             *, v6only: bool = True) -> Iterator[int]:
    """A listening TCP socket on `address`, port chosen by the kernel and read back."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind((address, 0))
        sock.listen()
        yield sock.getsockname()[1]
    finally:
        sock.close()


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0"])
def test_port_with_a_listener_is_taken(address: str) -> None:
    """A port another socket listens on (loopback or wildcard) is not free for all addresses."""
    with listener(address) as port:
        assert port_is_free("local", port) is False


def test_port_with_a_loopback_listener_is_taken_on_loopback() -> None:
    """Probing the very address a foreign listener holds reports the port taken."""
    with listener("127.0.0.1") as port:
        assert port_is_free("local", port, "127.0.0.1") is False


def test_port_is_free_once_the_listener_closed() -> None:
    """After the only listener on a port closes, the port is free again."""
    with listener("0.0.0.0") as port:
        pass
    assert port_is_free("local", port) is True


def _tcp_states(port: int) -> set[str]:
    """The TCP states (hex codes of /proc/net/tcp) of IPv4 sockets whose local port is `port`."""
    states = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            states.add(fields[3])
    return states


def test_port_in_time_wait_counts_as_free() -> None:
    """A port whose server side closed a connection first (TIME_WAIT) is free for a new listener."""
    with listener("127.0.0.1") as port:
        pass
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    accepted, _ = server.accept()
    server.close()
    accepted.close()  # the server side closes first, so its end enters TIME_WAIT
    assert client.recv(1) == b""
    client.close()
    if Path("/proc/net/tcp").exists():
        assert "06" in _tcp_states(port), "precondition: the server end is in TIME_WAIT"
    assert port_is_free("local", port) is True


@pytest.mark.skipif(not ipv6_available(), reason="this host has no IPv6")
def test_ipv6_only_listener_makes_the_port_taken_for_all_addresses() -> None:
    """A foreign IPv6-only listener on `::` blocks a public port, though IPv4 alone is free."""
    with listener("::", socket.AF_INET6, v6only=True) as port:
        assert port_is_free("local", port, "0.0.0.0") is True
        assert port_is_free("local", port) is False
        assert port_is_free("local", port, "::") is False


def test_address_not_on_this_host_is_not_free() -> None:
    """A specific listen address the host does not have cannot be bound, so it is not free."""
    assert port_is_free("local", 4000, "192.0.2.1") is False  # TEST-NET-1, never local


def test_other_hosts_are_not_probed_and_count_as_free() -> None:
    """Only `local` is probeable yet; any other placement host is reported free."""
    with listener("0.0.0.0") as port:
        assert port_is_free("other-host", port) is True


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_outside_range_is_a_value_error(port: int) -> None:
    """A port number outside 1..65535 is a programming error, not a "taken" answer."""
    with pytest.raises(ValueError, match=r"outside 1\.\.65535"):
        port_is_free("local", port)
