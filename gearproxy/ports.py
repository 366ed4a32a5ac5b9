"""Host-side port probing: is a TCP port free for a listener we are about to start?

A port handed out by the store must not already be bound by a process that
gearproxy does not know about (a database someone started by hand, another
tool's proxy).  The only reliable test is the one the listener will face
later: bind the port.  The probe binds the same way the proxy's listener
will (`SO_REUSEADDR` set, as asyncio's `create_server` does on Unix), so

- a port with a LISTEN socket of any process is taken (Linux refuses the bind
  even with `SO_REUSEADDR` on both sides), on the probed address or on a
  wildcard address covering it;
- a port that only has connections lingering in TIME_WAIT is free, because
  the listener will be able to bind it too.

`SO_REUSEPORT` is deliberately not set: with it a probe could share a port
with a foreign listener of the same user and call it free.

The probe answers for this moment only; the store's reservation is what stops
two gearproxy processes from racing, the probe only skips foreign processes.

Only the placement host `local` can be probed from here.  For any other host
name the answer is `True` (free): multi-host placement will probe through the
remote host's agent, which does not exist yet.
"""

from __future__ import annotations

import errno
import socket

LOCAL_HOST = "local"

# The errors that mean "this address family or address does not exist here",
# as opposed to "somebody holds the port".
_UNAVAILABLE = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})


def _bind_probe(family: socket.AddressFamily, address: str, port: int) -> bool | None:
    """Try to bind `address:port`; True if free, False if taken, None if `address` is unusable."""
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno in _UNAVAILABLE:
            return None
        raise
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Probe the IPv6 side on its own; the IPv4 side is probed separately, and a
            # dual-stack foreign listener on `::` already makes the IPv4 bind fail.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            if exc.errno in _UNAVAILABLE:
                return None
            # EADDRINUSE is the usual answer; EACCES (a privileged port for an
            # unprivileged user) also means a listener could not use it.
            return False
    return True


def port_is_free(host: str, port: int, address: str = "") -> bool:
    """Whether a TCP listener could bind `port` on placement host `host` right now.

    `address` is the listen address the port will be used on; empty means
    every address of the host, as public ports are published: then `0.0.0.0`
    is probed and, where the host has IPv6, `::` as well (a foreign listener
    on either would stop ours).  A host without IPv6 is judged on IPv4 alone.
    A specific `address` that does not exist on this host counts as not free.

    Hosts other than `local` cannot be probed yet and are reported free.
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1..65535")
    if host != LOCAL_HOST:
        return True
    if address:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return _bind_probe(family, address, port) is True
    if _bind_probe(socket.AF_INET, "0.0.0.0", port) is False:
        return False
    return _bind_probe(socket.AF_INET6, "::", port) is not False
