"""The daemon's local API: NDJSON over a 0600 Unix socket, progress lines then one reply."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gearproxy.errors import DaemonError, DescriptorError, GearproxyError
from gearproxy.orchestrator.api import ApiClient, ApiServer, Emit


async def _handler(request: dict[str, Any], emit: Emit) -> Any:
    if request["op"] == "echo":
        emit("local Container web-1 starting")
        emit("local Container web-1 is installed")
        return {"echo": request.get("value")}
    if request["op"] == "bad":
        raise DescriptorError("containers[0].image", "must be a non-empty string")
    if request["op"] == "crash":
        raise RuntimeError("boom")
    return None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "daemon.sock"
    loop = asyncio.new_event_loop()
    api = ApiServer(path, _handler)
    loop.run_until_complete(api.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield path
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.run_until_complete(api.close())
    loop.close()


def test_socket_is_private_to_the_daemon_user(server: Path) -> None:
    assert stat.S_IMODE(server.stat().st_mode) == 0o600


def test_progress_lines_arrive_before_the_result(server: Path) -> None:
    lines: list[str] = []
    result = ApiClient(server).request("echo", progress=lines.append, value=42)
    assert result == {"echo": 42}
    assert lines == ["local Container web-1 starting", "local Container web-1 is installed"]


def test_errors_keep_their_message_and_exit_code(server: Path) -> None:
    with pytest.raises(GearproxyError) as info:
        ApiClient(server).request("bad")
    assert info.value.exit_code == 2
    assert str(info.value) == "containers[0].image: must be a non-empty string"


def test_a_handler_bug_is_an_error_reply_and_the_server_keeps_serving(server: Path) -> None:
    with pytest.raises(GearproxyError, match="internal error"):
        ApiClient(server).request("crash")
    assert ApiClient(server).ping()


def test_malformed_request_gets_an_error_reply(server: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(server))
        sock.sendall(b"{not json\n")
        reply = json.loads(sock.makefile("rb").readline())
    assert reply["ok"] is False and reply["exit_code"] == 2
    assert ApiClient(server).ping()


def test_no_daemon_is_a_one_line_daemon_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonError, match="does not answer"):
        ApiClient(tmp_path / "missing.sock").request("ping")
