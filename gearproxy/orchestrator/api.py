"""The daemon's local API: newline-delimited JSON over a Unix socket.

One connection carries one request.  The client sends one line,
`{"op": "deploy", ...}`; the daemon answers with zero or more progress lines
`{"progress": "local Container web-1 starting"}` and then exactly one final
line, `{"ok": true, "result": ...}` or
`{"ok": false, "error": "one line", "exit_code": 1}`.  The socket lives in
the state directory with mode 0600, so only the daemon's user may talk to it.

Requests (every field but `op` optional unless noted):

| op        | fields                                              | result                      |
|-----------|-----------------------------------------------------|-----------------------------|
| `ping`    |                                                     | `{"pid": N, "version": v}`  |
| `deploy`  | `descriptor` (text, required), `name` (required),   | the deployment's status     |
|           | `timeout` (s), `publish_address`                    |                             |
| `status`  | `name`                                              | list of deployment statuses |
| `list`    |                                                     | list of `{name, status, …}` |
| `stop`    | `target` (deployment or instance id, required)      | affected instance ids       |
| `start`   | `target`                                            | affected instance ids       |
| `restart` | `target`                                            | affected instance ids       |
| `delete`  | `name` (required)                                   | `{"deleted": bool}`         |
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gearproxy.errors import DaemonError, GearproxyError, UsageError
from gearproxy.log import get_logger
from gearproxy.orchestrator.supervisor import check_socket_path

log = get_logger("gearproxy.api")

MAX_REQUEST = 4 << 20  # a descriptor is at most 1 MiB; JSON-escaping can grow it

Emit = Callable[[str], None]
Handler = Callable[[dict[str, Any], Emit], Awaitable[Any]]


def socket_path(state_dir: Path) -> Path:
    return state_dir / "daemon.sock"


class ApiServer:
    """Serves requests on the daemon socket and dispatches them to `handler`."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        check_socket_path(self.path)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def emit(line: str) -> None:
            if not writer.is_closing():
                writer.write(json.dumps({"progress": line}).encode() + b"\n")

        try:
            raw = await reader.readline()
            reply: dict[str, Any]
            try:
                request = json.loads(raw)
                if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                    raise UsageError("request must be a JSON object with a string 'op'")
                result = await self.handler(request, emit)
                reply = {"ok": True, "result": result}
            except json.JSONDecodeError as exc:
                reply = {"ok": False, "error": f"malformed request: {exc}", "exit_code": 2}
            except GearproxyError as exc:
                reply = {"ok": False, "error": exc.message, "exit_code": exc.exit_code}
            except Exception as exc:  # a bug must not kill the daemon
                log.exception("api_request_failed")
                reply = {"ok": False, "error": f"internal error: {exc!r}", "exit_code": 1}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class ApiClient:
    """The CLI's side: blocking, one request per connection."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def request(self, op: str, *, progress: Emit | None = None,
                wait: float | None = 30.0, **fields: Any) -> Any:
        """Send a request; call `progress` per progress line; return the result or raise.

        `wait` bounds each read from the socket (the request's own fields, such as a
        deploy's `timeout`, travel in `fields`)."""
        check_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(wait)
        try:
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise DaemonError(f"gearproxy daemon does not answer on {self.path}: "
                                  f"{exc.strerror}") from exc
            except PermissionError as exc:
                raise DaemonError(f"cannot talk to the gearproxy daemon on {self.path}: "
                                  "permission denied (run as the daemon's user)") from exc
            sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
            with sock.makefile("rb") as stream:
                for raw in stream:
                    message = json.loads(raw)
                    if "progress" in message:
                        if progress is not None:
                            progress(str(message["progress"]))
                        continue
                    if message.get("ok"):
                        return message.get("result")
                    err = GearproxyError(str(message.get("error", "unknown daemon error")))
                    err.exit_code = int(message.get("exit_code", 1))
                    raise err
        except TimeoutError as exc:
            raise DaemonError(f"gearproxy daemon on {self.path} did not answer "
                              f"within {wait:g}s") from exc
        finally:
            sock.close()
        raise DaemonError(f"gearproxy daemon on {self.path} closed the connection without a reply")

    def ping(self) -> bool:
        try:
            self.request("ping", wait=2.0)
        except GearproxyError:
            return False
        return True
