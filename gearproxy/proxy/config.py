"""The link proxy's frozen configuration, built once from the command line.

Addresses are IP literals (IPv6 in brackets, `[::1]:5000`) or `localhost`:
the orchestrator hands the proxy container addresses, never names, and a
proxy that resolved names would block its event loop doing so.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gearproxy.errors import UsageError

Balance = Literal["roundrobin", "leastconn", "first"]
Mode = Literal["auto", "splice", "copy"]
Engine = Literal["splice", "copy"]
LogLevel = Literal["debug", "info", "warning", "error"]

BALANCES: tuple[Balance, ...] = ("roundrobin", "leastconn", "first")
MODES: tuple[Mode, ...] = ("auto", "splice", "copy")
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint: an IP literal and a port."""

    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class NetnsListen:
    """A listener to create inside the network namespace at `netns` (a path)."""

    netns: str
    address: Address


def parse_address(text: str, option: str, *, allow_port_zero: bool = True) -> Address:
    """Parse `HOST:PORT` or `[V6]:PORT`; a malformed value raises UsageError naming `option`."""
    raw = text.strip()
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise UsageError(f"{option}: {text!r} is not [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep or not host:
            raise UsageError(f"{option}: {text!r} is not HOST:PORT")
        if ":" in host:
            raise UsageError(f"{option}: {text!r}: write IPv6 addresses as [ADDR]:PORT")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{option}: {host!r} in {text!r} is not an IP address") from None
    if not port_text.isdigit() or not (0 if allow_port_zero else 1) <= int(port_text) <= 65535:
        raise UsageError(f"{option}: port {port_text!r} in {text!r} is not 0-65535"
                         if allow_port_zero else
                         f"{option}: port {port_text!r} in {text!r} is not 1-65535")
    return Address(ip.compressed, int(port_text))


def parse_netns_listen(text: str, option: str = "--listen-netns") -> NetnsListen:
    """Parse `NSPATH=HOST:PORT`."""
    path, sep, addr = text.rpartition("=")
    if not sep or not path or not addr:
        raise UsageError(f"{option}: {text!r} is not NSPATH=HOST:PORT")
    return NetnsListen(path, parse_address(addr, option))


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything one proxy process needs, decided at start-up."""

    listen: tuple[Address, ...] = ()
    listen_netns: tuple[NetnsListen, ...] = ()
    targets: tuple[Address, ...] = ()
    balance: Balance = "roundrobin"
    connect_timeout: float = 3.0
    control: Path | None = None
    max_conns: int = 0
    idle_timeout: float = 0.0
    drain_timeout: float = 10.0
    mode: Mode = "auto"
    metrics: Address | None = None
    join_ns_of: int | None = None
    log_level: LogLevel = "info"
    busy_poll: float = 0.0             # seconds the loop keeps polling after I/O (0 = sleep)
    # Limits that are not command-line options (the defaults suit every link):
    copy_buffer: int = 256 * 1024      # copy engine: per-leg write buffer high-water mark
    pipe_size: int = 1024 * 1024       # splice engine: wanted pipe size (capped by the kernel)
    pipe_pool: int = 32                # splice engine: idle pipe pairs kept for reuse
    backoff_base: float = 0.5          # first down period of a failed backend, doubled per failure
    backoff_max: float = 15.0          # longest down period
    control_line_limit: int = 1024 * 1024

    def __post_init__(self) -> None:
        if self.connect_timeout <= 0:
            raise UsageError("--connect-timeout: must be > 0 seconds")
        if self.idle_timeout < 0:
            raise UsageError("--idle-timeout: must be >= 0 seconds (0 = no timeout)")
        if self.drain_timeout < 0:
            raise UsageError("--drain-timeout: must be >= 0 seconds")
        if not 0 <= self.busy_poll <= 1.0:
            raise UsageError("--busy-poll: must be 0-1000000 microseconds (0 = off)")
        if self.max_conns < 0:
            raise UsageError("--max-conns: must be >= 0 (0 = unlimited)")
        if self.join_ns_of is not None and self.join_ns_of <= 0:
            raise UsageError("--join-ns-of: must be a process id > 0")
        if not self.listen and not self.listen_netns and self.control is None:
            raise UsageError("--listen: give at least one --listen, --listen-netns or --control")
        for target in self.targets:
            if target.port == 0:
                raise UsageError(f"--target: {target}: port 0 cannot be connected to")
