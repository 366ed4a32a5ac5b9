"""`gearproxy daemon`: the orchestrator process.

Start-up: open the store, connect to the engine, adopt running proxies and
containers (reconcile), serve the API socket, watch Docker events, tell
systemd READY=1.  SIGTERM or SIGINT: stop serving and watching; the proxy
processes keep forwarding (the data plane outlives the control plane) and the
next daemon adopts them.  `gearproxy delete` is what stops proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gearproxy import __version__, rootless, systemd
from gearproxy.engine import Engine, EngineEvent, EngineInfo
from gearproxy.errors import DaemonError, GearproxyError, UsageError
from gearproxy.log import get_logger
from gearproxy.orchestrator.api import ApiClient, ApiServer, Emit, socket_path
from gearproxy.orchestrator.lifecycle import Lifecycle
from gearproxy.orchestrator.supervisor import Supervisor
from gearproxy.store import Store

log = get_logger("gearproxy.daemon")


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    state_dir: Path
    publish_address: str = "0.0.0.0"
    proxy_busy_poll_us: int = 0       # passed to every link proxy as --busy-poll


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._stop = asyncio.Event()
        self._events_stop = threading.Event()
        self.lifecycle: Lifecycle | None = None
        self._engine: Engine | None = None
        self._rootless = False
        self.notifier: systemd.Notifier | None = None

    async def run(self) -> None:
        # First, so that no proxy spawned during reconcile inherits NOTIFY_SOCKET.
        notifier = self.notifier = systemd.Notifier(unset=True)
        state_dir = self.config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        client = ApiClient(socket_path(state_dir))
        if client.ping():
            raise DaemonError(f"a gearproxy daemon already serves {client.path}")
        store = Store.open(state_dir)
        engine = await asyncio.to_thread(Engine.connect)
        info = await asyncio.to_thread(engine.info)
        self._engine, self._rootless = engine, info.rootless
        join_ns_of = await asyncio.to_thread(rootless_pid, info) if info.rootless else None
        supervisor = Supervisor(state_dir / "proxies")
        lifecycle = Lifecycle(store, engine, supervisor, state_dir,
                              publish_address=self.config.publish_address, join_ns_of=join_ns_of,
                              busy_poll_us=self.config.proxy_busy_poll_us)
        self.lifecycle = lifecycle
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        # Events from now on: one that happens during reconcile is seen, not lost.
        events_since = time.time()
        await lifecycle.reconcile()
        server = ApiServer(socket_path(state_dir), self.handle)
        await server.start()
        events = loop.create_task(self._watch_events(engine, lifecycle, events_since))
        await notifier.start()
        notifier.ready(self._summary(lifecycle))
        log.info("daemon_ready", pid=os.getpid(), socket=str(server.path),
                 rootless=info.rootless, deployments=len(lifecycle.runtimes))
        try:
            await self._stop.wait()
        finally:
            notifier.stopping()
            await notifier.close()
            self._events_stop.set()
            events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await events
            await server.close()
            await lifecycle.close()
            await supervisor.close()
            store.close()
            log.info("daemon_stopped")

    def _summary(self, lifecycle: Lifecycle) -> str:
        proxies = len(lifecycle.supervisor.proxies)
        return f"{len(lifecycle.runtimes)} deployments, {proxies} proxies"

    async def _watch_events(self, engine: Engine, lifecycle: Lifecycle,
                            since: float | None = None) -> None:
        """Consume engine events from a thread; re-connect when the stream breaks."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()

        def pump() -> None:
            nonlocal since  # after a break, resume where the stream stopped
            while not self._events_stop.is_set():
                try:
                    for event in engine.events(since=since, stop=self._events_stop):
                        since = event.time
                        loop.call_soon_threadsafe(queue.put_nowait, event)
                except GearproxyError as exc:
                    log.warning("events_stream_broken", error=str(exc))
                self._events_stop.wait(1.0)

        thread = threading.Thread(target=pump, name="gearproxy-events", daemon=True)
        thread.start()
        while True:
            event = await queue.get()
            try:
                await lifecycle.on_event(event)
            except GearproxyError as exc:
                log.error("event_handling_failed", action=event.action,
                          instance=event.instance, error=str(exc))
            except Exception:  # a bug or an OS error must not end event handling for good
                log.exception("event_handling_crashed", action=event.action,
                              instance=event.instance)

    async def handle(self, request: dict[str, Any], emit: Emit) -> Any:
        """Serve one API request; after a change, refresh systemd's one-line STATUS."""
        try:
            return await self._dispatch(request, emit)
        finally:
            if request.get("op") not in ("ping", "status", "list") and self.notifier:
                assert self.lifecycle is not None
                self.notifier.status(self._summary(self.lifecycle))

    async def _dispatch(self, request: dict[str, Any], emit: Emit) -> Any:
        lifecycle = self.lifecycle
        assert lifecycle is not None
        op = request["op"]
        if op == "ping":
            return {"pid": os.getpid(), "version": __version__}
        if op == "deploy":
            descriptor, name = request.get("descriptor"), request.get("name")
            if not isinstance(descriptor, str) or not isinstance(name, str):
                raise UsageError("deploy needs 'descriptor' and 'name' strings")
            if self._rootless:  # again: the engine may have restarted (new pid) or changed
                lifecycle.join_ns_of = await asyncio.to_thread(self._rootless_pid)
            return await lifecycle.deploy(
                name, descriptor, timeout=float(request.get("timeout") or 120), emit=emit,
                publish_address=request.get("publish_address"))
        if op == "status":
            name = request.get("name")
            names = [name] if isinstance(name, str) else sorted(lifecycle.runtimes)
            return [await lifecycle.status(n) for n in names]
        if op == "list":
            return lifecycle.list()
        if op in ("stop", "start", "restart"):
            target = request.get("target")
            if not isinstance(target, str):
                raise UsageError(f"{op} needs a 'target' string")
            if op == "stop":
                return await lifecycle.stop(target)
            return await lifecycle.start(target, restart=op == "restart")
        if op == "delete":
            name = request.get("name")
            if not isinstance(name, str):
                raise UsageError("delete needs a 'name' string")
            return {"deleted": await lifecycle.delete(name)}
        raise UsageError(f"unknown op {op!r}")

    def _rootless_pid(self) -> int:
        assert self._engine is not None
        return rootless_pid(self._engine.info())


def rootless_pid(info: EngineInfo) -> int:
    """The pid whose user and network namespaces hold a rootless engine's containers (its
    dockerd), after `rootless.preflight` checked that the proxies will be able to join them.
    Raises EngineError/DaemonError with one line saying what is missing and how to fix it.
    Blocking (runs a probe process)."""
    return rootless.preflight(info)
