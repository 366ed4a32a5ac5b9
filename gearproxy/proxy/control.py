"""The control socket: newline-delimited JSON, one request line -> one reply line.

Requests (`op` selects):
  {"op": "ping"}                                   -> {"ok": true, "pong": true}
  {"op": "stats"}                                  -> {"ok": true, "stats": {...}}
  {"op": "set_targets", "targets": ["H:P", ...]}   -> {"ok": true, "targets": [...]}
  {"op": "add_listener", "listen": "H:P", "netns": "/proc/PID/ns/net"?}
                                                   -> {"ok": true, "listen": "H:P", "existed": b}
  {"op": "remove_listener", "listen": "H:P", "netns": ...?}
                                                   -> {"ok": true, "removed": b}
Any failure -> {"ok": false, "error": "<one line>"}; the connection and the
proxy keep serving.  A request line longer than the limit gets an error reply
and that connection is closed (the stream cannot be re-synchronised).
The socket is created with mode 0600: it can re-point the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gearproxy.errors import GearproxyError, LinkError
from gearproxy.proxy.config import Address, parse_address

if TYPE_CHECKING:
    from gearproxy.proxy.server import Proxy

Reply = dict[str, Any]


def _error(message: str) -> Reply:
    return {"ok": False, "error": message}


def _listen_args(req: dict[str, Any]) -> tuple[Address, str | None]:
    listen = req.get("listen")
    if not isinstance(listen, str):
        raise LinkError("listen: expected a string HOST:PORT")
    netns = req.get("netns")
    if netns is not None and (not isinstance(netns, str) or not netns):
        raise LinkError("netns: expected a namespace path string or null")
    return parse_address(listen, "listen"), netns


async def _ping(proxy: Proxy, req: dict[str, Any]) -> Reply:
    return {"ok": True, "pong": True}


async def _stats(proxy: Proxy, req: dict[str, Any]) -> Reply:
    return {"ok": True, "stats": proxy.stats()}


async def _set_targets(proxy: Proxy, req: dict[str, Any]) -> Reply:
    targets = req.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise LinkError("targets: expected a list of HOST:PORT strings")
    parsed = tuple(parse_address(t, "targets", allow_port_zero=False) for t in targets)
    proxy.set_targets(parsed)
    return {"ok": True, "targets": [str(t) for t in parsed]}


async def _add_listener(proxy: Proxy, req: dict[str, Any]) -> Reply:
    address, netns = _listen_args(req)
    bound, existed = proxy.add_listener(address, netns)
    return {"ok": True, "listen": bound, "existed": existed}


async def _remove_listener(proxy: Proxy, req: dict[str, Any]) -> Reply:
    address, netns = _listen_args(req)
    return {"ok": True, "removed": proxy.remove_listener(address, netns)}


OPS: dict[str, Callable[[Proxy, dict[str, Any]], Awaitable[Reply]]] = {
    "ping": _ping,
    "stats": _stats,
    "set_targets": _set_targets,
    "add_listener": _add_listener,
    "remove_listener": _remove_listener,
}


async def dispatch(proxy: Proxy, line: bytes) -> Reply:
    """Answer one request line; never raises for bad input."""
    try:
        req = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return _error(f"malformed request: not JSON ({err})")
    if not isinstance(req, dict):
        return _error("malformed request: expected a JSON object with an \"op\"")
    op = req.get("op")
    handler = OPS.get(op) if isinstance(op, str) else None
    if handler is None:
        return _error(f"unknown op {op!r}; expected one of {', '.join(sorted(OPS))}")
    try:
        return await handler(proxy, req)
    except GearproxyError as err:
        return _error(err.message)


async def _serve_client(proxy: Proxy, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, limit: int) -> None:
    try:
        while True:
            try:
                line = await reader.readline()
            except ValueError:
                writer.write(json.dumps(_error(f"request line longer than {limit} bytes"))
                             .encode() + b"\n")
                await writer.drain()
                return
            if not line:
                return
            if not line.strip():
                continue
            reply = await dispatch(proxy, line)
            writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    except asyncio.CancelledError:
        # Process shutdown cancels client handlers; ending quietly avoids asyncio's
        # "exception in callback" noise for a cancelled stream task.
        pass
    finally:
        writer.close()


def _clear_stale(path: Path) -> None:
    """Remove a leftover socket file nobody answers on; refuse to take over a live one."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise LinkError(f"--control {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise LinkError(f"--control {path}: another process answers on this socket")


async def serve_control(proxy: Proxy, path: Path, limit: int) -> asyncio.AbstractServer:
    """Open the control socket at `path` (mode 0600)."""
    _clear_stale(path)
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(
            lambda r, w: _serve_client(proxy, r, w, limit), path=str(path), limit=limit)
    except OSError as err:
        raise LinkError(f"--control {path}: cannot listen ({err.strerror})") from None
    finally:
        os.umask(old)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)
    return server
