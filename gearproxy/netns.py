"""setns(2) helpers: listen inside another network namespace; join a rootless engine's.

A socket keeps the network namespace it was created in, whatever thread or
namespace later uses it.  So a proxy that must listen on `127.0.0.1:27017`
inside a consumer container creates that one socket from a short-lived helper
thread that joins the container's namespace (setns affects only the calling
thread), and the event loop serves it from the proxy's own namespace.

On a rootless engine, container namespaces belong to RootlessKit's user
namespace.  The proxy first binds its host-side listeners, then joins
RootlessKit's user and network namespaces while it is still single-threaded
(the kernel refuses to move a multi-threaded process into a user namespace,
EINVAL), and only then starts its loop and helper threads.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from typing import Any

from gearproxy.errors import LinkError

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000

_libc: Any = None


def setns(fd: int, nstype: int) -> None:
    """Join the namespace open at `fd` (os.setns on 3.12+, libc through ctypes on 3.11)."""
    native = getattr(os, "setns", None)
    if native is not None:
        native(fd, nstype)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_namespace(path: str, what: str = "network namespace") -> int:
    """Open a namespace file; a missing or unreadable path raises LinkError saying which and why."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LinkError(f"{what} {path}: missing (no such file)") from None
    except PermissionError as err:
        raise LinkError(f"{what} {path}: not permitted ({err.strerror})") from None
    except OSError as err:
        raise LinkError(f"{what} {path}: cannot open ({err.strerror})") from None


def _setns_error(path: str, err: OSError) -> LinkError:
    if err.errno in (errno.EPERM, errno.EACCES):
        return LinkError(f"network namespace {path}: not permitted ({err.strerror}; "
                         "joining needs CAP_SYS_ADMIN over the namespace)")
    if err.errno == errno.EINVAL:
        return LinkError(f"network namespace {path}: not a network namespace ({err.strerror})")
    return LinkError(f"network namespace {path}: cannot join ({err.strerror})")


def make_listener(family: socket.AddressFamily, sockaddr: tuple[str, int],
                  backlog: int = 4096) -> socket.socket:
    """A non-blocking listening TCP socket (SO_REUSEADDR; IPv6 sockets are v6-only)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_in_netns(path: str, family: socket.AddressFamily, sockaddr: tuple[str, int],
                    label: str, backlog: int = 4096) -> socket.socket:
    """Create a listening socket inside the network namespace at `path`.

    Runs the namespace switch in a fresh helper thread that ends afterwards,
    so no thread of the process is left in a foreign namespace.  `label` is
    the `HOST:PORT` text used in error messages.  Blocks for about a
    millisecond (thread start plus a few syscalls).
    """
    ns_fd = open_namespace(path)
    result: list[socket.socket] = []
    failure: list[LinkError] = []

    def helper() -> None:
        try:
            setns(ns_fd, CLONE_NEWNET)
        except OSError as err:
            failure.append(_setns_error(path, err))
            return
        try:
            result.append(make_listener(family, sockaddr, backlog))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                failure.append(LinkError(f"address in use: {label} in {path}"))
            else:
                failure.append(LinkError(f"cannot listen on {label} in {path}: {err.strerror}"))

    try:
        thread = threading.Thread(target=helper, name="gearproxy-netns", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(ns_fd)
    if failure:
        raise failure[0]
    return result[0]


def join_namespaces(pid: int) -> None:
    """Move this whole process into the user, then network, namespace of `pid`.

    Must run before any thread exists: the kernel refuses setns into a user
    namespace for a multi-threaded process.  Joining the user namespace we are
    already in is skipped (the kernel would refuse that too).
    """
    if threading.active_count() != 1:
        raise LinkError(f"--join-ns-of {pid}: the process already has threads; "
                        "namespaces must be joined before any thread starts")
    base = f"/proc/{pid}/ns"
    user_fd = open_namespace(f"{base}/user", "user namespace")
    try:
        net_fd = open_namespace(f"{base}/net")
    except LinkError:
        os.close(user_fd)
        raise
    try:
        if os.fstat(user_fd).st_ino != os.stat("/proc/self/ns/user").st_ino:
            try:
                setns(user_fd, CLONE_NEWUSER)
            except OSError as err:
                raise LinkError(f"user namespace {base}/user: cannot join ({err.strerror}); "
                                "the process must be single-threaded and own the namespace"
                                ) from None
        try:
            setns(net_fd, CLONE_NEWNET)
        except OSError as err:
            raise _setns_error(f"{base}/net", err) from None
    finally:
        os.close(user_fd)
        os.close(net_fd)
