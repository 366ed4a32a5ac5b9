"""Defects found by a review of the orchestrator, each pinned by a test.

The first group drives `Lifecycle` and `Daemon._watch_events` with a fake engine
and a fake supervisor (no Docker, no processes), so the races are deterministic.
The second group uses a real engine and daemon, the CLI as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from gearproxy_harness import Gearproxy, wait_for

from gearproxy import spec as specmod
from gearproxy.engine import ContainerInfo, EngineEvent
from gearproxy.errors import EngineError, LinkError
from gearproxy.orchestrator.daemon import Daemon, DaemonConfig
from gearproxy.orchestrator.lifecycle import Lifecycle
from gearproxy.orchestrator.supervisor import ProxySpec
from gearproxy.plan import InstancePlan, plan
from gearproxy.store import Store

# -- fakes -------------------------------------------------------------------------------


class FakeEngine:
    """The engine calls `Lifecycle` makes, over an in-memory set of containers."""

    def __init__(self) -> None:
        self.containers: dict[str, ContainerInfo] = {}
        self.starts: list[str] = []
        self.network_error: Exception | None = None
        self._next = 0

    def add(self, deployment: str, inst: InstancePlan, *, status: str = "running") -> str:
        self._next += 1
        cid = f"c{self._next}-{inst.id}"
        self.containers[cid] = ContainerInfo(
            id=cid, name=f"{deployment}-{inst.id}", deployment=deployment,
            container=inst.container, instance=inst.id, config_hash=inst.config_hash,
            status=status, pid=1000 + self._next if status == "running" else 0,
            address=f"10.0.0.{self._next}" if status == "running" else None, health=None,
            exit_code=0, restarting=False, started_at=datetime.now(UTC).isoformat())
        return cid

    def set(self, cid: str, **changes: Any) -> None:
        self.containers[cid] = replace(self.containers[cid], **changes)

    def ensure_images(self, images: list[str]) -> None:
        pass

    def ensure_network(self, name: str) -> str:
        if self.network_error is not None:
            raise self.network_error
        return "net"

    def remove_network(self, name: str) -> None:
        pass

    def owned_containers(self, deployment: str | None = None) -> list[ContainerInfo]:
        return [c for c in self.containers.values()
                if deployment is None or c.deployment == deployment]

    def inspect(self, cid: str) -> ContainerInfo | None:
        return self.containers.get(cid)

    def remove(self, cid: str) -> None:
        self.containers.pop(cid, None)

    def start(self, cid: str) -> ContainerInfo:
        self.starts.append(cid)
        self.set(cid, status="running", pid=4000 + len(self.starts),
                 address=f"10.1.0.{len(self.starts)}",
                 started_at=datetime.now(UTC).isoformat())
        return self.containers[cid]

    def stop(self, cid: str) -> None:
        self.set(cid, status="exited", pid=0, address=None)


class FakeProxy:
    def __init__(self, spec: ProxySpec) -> None:
        self.spec = spec

    def summary(self) -> dict[str, Any]:
        return {"key": self.spec.key}


class FakeSupervisor:
    """Records the desired proxies; `broken` keys fail as a proxy that cannot start."""

    def __init__(self) -> None:
        self.proxies: dict[str, FakeProxy] = {}
        self.broken: set[str] = set()

    async def adopt_existing(self) -> list[str]:
        return []

    async def ensure(self, spec: ProxySpec) -> FakeProxy:
        if spec.key in self.broken:
            raise LinkError(f"proxy {spec.key} exited at start-up: address in use")
        proxy = self.proxies.setdefault(spec.key, FakeProxy(spec))
        proxy.spec = spec
        return proxy

    async def stop(self, key: str) -> None:
        self.proxies.pop(key, None)

    async def stats(self, key: str) -> None:
        return None


def _descriptor() -> dict[str, Any]:
    return {"containers": [
        {"name": "web", "image": "img", "publicports": [{"internal": 80}],
         "links": [{"to": "db"}]},
        {"name": "db", "image": "img", "publicports": [{"internal": 27017}]},
    ]}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Store, FakeEngine, FakeSupervisor, Lifecycle]]:
    store = Store.open(tmp_path / "state")
    engine, sup = FakeEngine(), FakeSupervisor()
    lifecycle = Lifecycle(store, engine, sup, tmp_path / "state")  # type: ignore[arg-type]
    yield store, engine, sup, lifecycle
    store.close()


def _record(store: Store, engine: FakeEngine, name: str) -> dict[str, str]:
    """A deployment `name` as a previous daemon left it: stored, containers running."""
    deployment = specmod.parse(json.dumps(_descriptor()), source=name)
    the_plan = plan(deployment, store.current_state(name), ("local",), name=name,
                    taken={"local": store.taken_ports("local", exclude=name)})
    store.record_deployment(name, json.dumps(specmod.to_json(deployment)), the_plan.instances,
                            [], status="deployed")
    return {inst.id: engine.add(name, inst) for inst in the_plan.instances}


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- lifecycle, with fakes ---------------------------------------------------------------


def test_reconcile_keeps_the_proxies_of_a_deployment_whose_name_has_a_dot(world: Any) -> None:
    """A deployment named `app.prod` (the default name of `app.prod.json`; names may contain
    dots) keeps its proxies when a daemon restarts and reconciles."""
    store, engine, sup, lifecycle = world
    _record(store, engine, "app.prod")
    _run(lifecycle.reconcile())
    assert sorted(sup.proxies) == ["app.prod.db-1.27017", "app.prod.web-1.80"]


def test_deleting_app_leaves_the_proxies_of_app_v2_alone(world: Any) -> None:
    """Two deployments `app` and `app.v2`: deleting `app` stops only app's proxies."""
    store, engine, sup, lifecycle = world
    _record(store, engine, "app")
    _record(store, engine, "app.v2")

    async def scenario() -> None:
        await lifecycle.reconcile()
        assert len(sup.proxies) == 4
        await lifecycle.delete("app")

    _run(scenario())
    assert sorted(sup.proxies) == ["app.v2.db-1.27017", "app.v2.web-1.80"]


def test_an_event_queued_behind_delete_does_not_resurrect_proxies(world: Any) -> None:
    """A Docker event that was waiting for the deployment's lock while `delete` ran must not
    start the deleted deployment's proxies again (they would hold released host ports)."""
    store, engine, sup, lifecycle = world
    ids = _record(store, engine, "gone")

    async def scenario() -> None:
        await lifecycle.reconcile()
        event = EngineEvent("die", ids["web-1"], "gone", "web-1", 0, time.time())
        async with lifecycle.lock("gone"):  # e.g. a deploy holds it
            deleting = asyncio.create_task(lifecycle.delete("gone"))
            await asyncio.sleep(0)
            handling = asyncio.create_task(lifecycle.on_event(event))
            await asyncio.sleep(0)
        await deleting
        await handling

    _run(scenario())
    assert sup.proxies == {}


def test_a_dead_container_is_restarted_even_when_a_proxy_cannot_be_applied(world: Any) -> None:
    """One proxy that cannot start (its host port taken meanwhile) must not stop the Restart
    policy of every container of the deployment: a dead web-1 still comes back."""
    store, engine, sup, lifecycle = world
    ids = _record(store, engine, "pol")

    async def scenario() -> None:
        await lifecycle.reconcile()
        sup.broken.add("pol.db-1.27017")
        sup.proxies.pop("pol.db-1.27017")
        engine.set(ids["web-1"], status="exited", pid=0, address=None, exit_code=1)
        event = EngineEvent("die", ids["web-1"], "pol", "web-1", 1, time.time())
        with contextlib.suppress(LinkError):
            await lifecycle.on_event(event)
        with contextlib.suppress(TimeoutError):  # the restart is due after 0.2 s
            async with asyncio.timeout(3):
                await asyncio.gather(*lifecycle._tasks, return_exceptions=True)
        await lifecycle.close()

    _run(scenario())
    assert ids["web-1"] in engine.starts


def test_restart_back_off_resets_after_a_container_ran_stably(world: Any) -> None:
    """A container that dies once an hour is restarted after the first back-off step every
    time; only quick crashes in a row grow the delay (as the proxy supervisor does)."""
    store, engine, _sup, lifecycle = world
    ids = _record(store, engine, "bo")
    delays: list[float] = []

    async def record_delay(runtime: Any, iid: str, delay: float) -> None:
        delays.append(delay)

    lifecycle._restart_later = record_delay  # type: ignore[method-assign]
    an_hour_ago = datetime.fromtimestamp(time.time() - 3600, UTC).isoformat()

    async def scenario() -> None:
        await lifecycle.reconcile()
        for _ in range(8):
            engine.set(ids["db-1"], status="exited", pid=0, address=None, exit_code=1,
                       started_at=an_hour_ago)
            await lifecycle.on_event(EngineEvent("die", ids["db-1"], "bo", "db-1", 1,
                                                 time.time()))
        await asyncio.sleep(0)

    _run(scenario())
    assert delays == [delays[0]] * 8


def test_a_failed_deploy_reports_its_error_once(world: Any) -> None:
    """The error of a deploy that fails part way reaches the user once (the CLI prints it as
    `gearproxy: error: ...`), not a second time as a progress line."""
    _, engine, _, lifecycle = world
    engine.network_error = EngineError("cannot create network gearproxy-x: boom")
    lines: list[str] = []
    with pytest.raises(EngineError):
        _run(lifecycle.deploy("x", json.dumps(_descriptor()), timeout=5, emit=lines.append))
    assert not [line for line in lines if "boom" in line]


def test_the_event_watcher_survives_an_unexpected_error(tmp_path: Path) -> None:
    """A bug or an OS error (EMFILE from posix_spawn...) while handling one event must not
    end event handling for the rest of the daemon's life."""
    events = [EngineEvent("die", f"c{n}", "d", "web-1", 1, time.time()) for n in (1, 2)]
    handled: list[str] = []
    both = asyncio.Event()

    class Engine:
        def __init__(self) -> None:
            self.calls = 0

        def events(self, *, since: float | None, stop: threading.Event) -> Iterator[EngineEvent]:
            self.calls += 1
            if self.calls == 1:
                yield from events
            stop.wait(5)

    class Handler:
        async def on_event(self, event: EngineEvent) -> None:
            handled.append(event.container_id)
            if len(handled) == 2:
                both.set()
            if event.container_id == "c1":
                raise OSError(24, "Too many open files")

    async def scenario() -> None:
        daemon = Daemon(DaemonConfig(tmp_path))
        task = asyncio.create_task(daemon._watch_events(Engine(), Handler()))  # type: ignore[arg-type]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                await both.wait()
        daemon._events_stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await task

    _run(scenario())
    assert handled == ["c1", "c2"]


def test_a_consumer_namespace_that_vanished_is_not_a_reconfigure_error(tmp_path: Path) -> None:
    """Adding a link listener in the namespace of a consumer that has just died (its die
    event is on its way) does not fail the whole re-configuration, so a deploy or an event
    does not fail on a consumer that is restarting."""
    import socket
    import subprocess
    import sys

    from gearproxy.orchestrator.supervisor import Supervisor

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def scenario() -> None:
        sup = Supervisor(tmp_path / "proxies")
        spec = ProxySpec("d.db-1.1", (f"127.0.0.1:{port}",), ())
        try:
            await sup.ensure(spec)
            await sup.ensure(replace(spec, netns_listen=(
                (f"/proc/{gone.pid}/ns/net", "127.0.0.1:27017"),)))
        finally:
            await sup.close(stop_proxies=True)

    _run(scenario())


# -- with a real engine ------------------------------------------------------------------

DB_COMMAND = ["nc", "-ll", "-p", "27017", "-e", "cat"]


def _write(tmp_path: Path, name: str, containers: list[dict[str, Any]]) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"containers": containers}))
    return path


def _in_web(client: Any, deployment: str, port: int = 27017) -> str:
    web = client.containers.get(f"{deployment}-web-1")
    out = web.exec_run(["sh", "-c", f"echo ping | nc -w 3 127.0.0.1 {port}"]).output
    return str(out.decode(errors="replace").strip())


@pytest.mark.docker
def test_publish_address_survives_a_daemon_restart(
        gp: Gearproxy, tmp_path: Path, busybox_image: str) -> None:
    """`deploy --publish-address 127.0.0.1`, then the daemon restarts (systemd, upgrade):
    the proxies are adopted as they are, still local only, not re-bound on 0.0.0.0."""
    path = _write(tmp_path, "loc", [{"name": "db", "image": busybox_image,
                                     "publicports": [{"internal": 27017}],
                                     "command": DB_COMMAND}])
    proc = gp.run("deploy", str(path), "--publish-address", "127.0.0.1")
    assert proc.returncode == 0, proc.stderr
    before = gp.proxy_pids()
    gp.stop_daemon()
    gp.start_daemon()
    [dep] = gp.json("status", "loc")
    [proxy] = dep["proxies"]
    assert proxy["listen"][0].startswith("127.0.0.1:")
    assert gp.proxy_pids() == before  # adopted, not restarted


@pytest.mark.docker
def test_a_consumer_that_exits_before_its_link_is_up_is_restarted_during_deploy(
        gp: Gearproxy, tmp_path: Path, docker_client: Any, busybox_image: str) -> None:
    """A web app that exits when its database does not answer yet (the database takes a few
    seconds to start serving) is restarted by its Restart policy (`always`, the default)
    while the deploy waits, and the deploy succeeds, as `docker compose up` with
    `restart: always` does; it is not left exited until --timeout and then rolled back."""
    fetch = '[ "$(nc -w 2 127.0.0.1 27017 </dev/null)" = db-ok ]'
    web = {"name": "web", "image": busybox_image, "links": [{"to": "db"}],
           "command": ["sh", "-c", f"sleep 1; {fetch} || exit 3; exec sleep 3600"]}
    db = {"name": "db", "image": busybox_image, "publicports": [{"internal": 27017}],
          "command": ["sh", "-c", "sleep 4; exec nc -ll -p 27017 -e echo db-ok"],
          "healthcheck": {"test": fetch, "interval": 0.5, "timeout": 2, "retries": 100}}
    proc = gp.run("deploy", str(_write(tmp_path, "early", [web, db])),
                  "--publish-address", "127.0.0.1", "--timeout", "20")
    assert proc.returncode == 0, proc.stderr
    web1 = docker_client.containers.get("early-web-1")
    assert web1.exec_run(["sh", "-c", f"{fetch} && echo linked"]).output.decode().strip() \
        == "linked"


@pytest.mark.docker
def test_a_failed_redeploy_leaves_the_previous_instance_serving(
        gp: Gearproxy, tmp_path: Path, docker_client: Any, busybox_image: str) -> None:
    """A redeploy that changes db and fails (never healthy): db-1 is not left without any
    container: the previous configuration serves again and web's link answers."""
    web = {"name": "web", "image": busybox_image, "links": [{"to": "db"}],
           "command": ["sleep", "3600"]}
    db = {"name": "db", "image": busybox_image, "publicports": [{"internal": 27017}],
          "command": DB_COMMAND}
    path = _write(tmp_path, "rb", [web, db])
    assert gp.run("deploy", str(path), "--publish-address", "127.0.0.1").returncode == 0
    assert wait_for("link works", lambda: _in_web(docker_client, "rb") == "ping")
    sick = {**db, "healthcheck": {"test": "false", "interval": 0.2, "timeout": 1,
                                  "retries": 1000}}
    _write(tmp_path, "rb", [web, sick])
    proc = gp.run("deploy", str(path), "--publish-address", "127.0.0.1", "--timeout", "4")
    assert proc.returncode == 1
    [dep] = gp.json("status", "rb")
    states = {i["id"]: i["state"] for i in dep["instances"]}
    assert states == {"web-1": "running", "db-1": "running"}
    assert wait_for("link works again", lambda: _in_web(docker_client, "rb") == "ping",
                    timeout=15)


@pytest.mark.docker
def test_scale_down_closes_the_consumer_listener_of_the_removed_target(
        gp: Gearproxy, tmp_path: Path, docker_client: Any, busybox_image: str) -> None:
    """(A check that passes.) db 2 -> 1: 127.0.0.1:27018 inside web-1, which reached db-2,
    no longer accepts; 27017 still answers."""
    web = {"name": "web", "image": busybox_image, "links": [{"to": "db"}],
           "command": ["sleep", "3600"]}
    db = {"name": "db", "image": busybox_image, "publicports": [{"internal": 27017}],
          "command": DB_COMMAND, "count": 2}
    path = _write(tmp_path, "sd", [web, db])
    assert gp.run("deploy", str(path), "--publish-address", "127.0.0.1").returncode == 0
    assert wait_for("27018 answers", lambda: _in_web(docker_client, "sd", 27018) == "ping")
    _write(tmp_path, "sd", [web, {**db, "count": 1}])
    assert gp.run("deploy", str(path), "--publish-address", "127.0.0.1").returncode == 0
    web1 = docker_client.containers.get("sd-web-1")
    refused = web1.exec_run(["sh", "-c", "echo x | nc -w 2 127.0.0.1 27018; echo rc=$?"])
    assert "rc=1" in refused.output.decode()
    assert _in_web(docker_client, "sd", 27017) == "ping"

