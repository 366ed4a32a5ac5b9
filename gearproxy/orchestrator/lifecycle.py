"""Executes plans against the engine and the supervisor, and keeps links up.

Theory of operation
-------------------
`deploy` runs forward only, and records before it acts so that a deploy cut
short (a crash, SIGKILL) converges when run again:

    images present? -> plan + reserve ports (one store transaction) -> network
      -> remove dropped instances -> per instance, targets before sources:
         recreate? remove old -> create (idempotent by name) -> start
      -> proxies (start / re-point live) -> wait until running, healthy and
         every listener accepts -> status "deployed" + state file

A deploy that fails removes the containers it created and gives their ports
back; a first deploy that fails leaves nothing behind at all.

Docker events keep links up.  Instance life cycle as the daemon sees it:

    | event        | instance becomes | then                                      |
    |--------------|------------------|-------------------------------------------|
    | start        | running          | re-point its proxies (new address) and    |
    |              |                  | re-create its consumers' listeners in its |
    |              |                  | new namespace (no consumer restart)       |
    | die          | exited           | empty its proxies' pools; restart per the |
    |              |                  | Restart policy unless stopped on purpose  |
    | destroy      | missing          | as die; a redeploy re-creates it          |
    | health_status| (health updated) |                                           |

Every engine call blocks, so it runs in a worker thread (`asyncio.to_thread`).
One lock per deployment serialises deploys, verbs and event handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from gearproxy import spec as specmod
from gearproxy import statefile
from gearproxy.engine import ContainerInfo, Engine, EngineEvent
from gearproxy.errors import DaemonError, GearproxyError, PortConflictError, UsageError
from gearproxy.log import get_logger
from gearproxy.orchestrator.supervisor import Supervisor
from gearproxy.orchestrator.wiring import Running, host_address, proxy_specs
from gearproxy.plan import InstancePlan, Plan, plan, start_levels
from gearproxy.planview import describe
from gearproxy.ports import port_is_free
from gearproxy.spec import Deployment
from gearproxy.store import Store

log = get_logger("gearproxy.lifecycle")

T = TypeVar("T")
HOSTS = ("local",)
RESTART_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
PROXY_STARTS_AT_ONCE = 8
CONTAINER_STARTS_AT_ONCE = 4
RESTART_STABLE_AFTER = 10.0  # seconds of run time after which the back-off starts again
Emit = Callable[[str], None]


@dataclass(slots=True)
class Runtime:
    """The daemon's working knowledge of one deployment."""

    name: str
    deployment: Deployment
    instances: tuple[InstancePlan, ...]
    publish_address: str = "0.0.0.0"
    containers: dict[str, ContainerInfo] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)  # stopped on purpose: not restarted
    restarts: dict[str, int] = field(default_factory=dict)

    def instance(self, instance_id: str) -> InstancePlan | None:
        return next((i for i in self.instances if i.id == instance_id), None)

    def running(self) -> dict[str, Running]:
        return {iid: Running(c.pid, c.address) for iid, c in self.containers.items()
                if c.status == "running" and c.pid > 0 and c.address}


class Lifecycle:
    """Owns deployments at run time: deploy, verbs, events, reconcile."""

    def __init__(self, store: Store, engine: Engine, supervisor: Supervisor,
                 state_dir: Path, *, publish_address: str = "0.0.0.0",
                 join_ns_of: int | None = None, busy_poll_us: int = 0) -> None:
        self.store = store
        self.engine = engine
        self.supervisor = supervisor
        self.state_dir = state_dir
        self.publish_address = publish_address
        self.join_ns_of = join_ns_of
        self.busy_poll_us = busy_poll_us
        self.runtimes: dict[str, Runtime] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # -- deploy ------------------------------------------------------------

    async def deploy(self, name: str, descriptor: str, *, timeout: float, emit: Emit,
                     publish_address: str | None = None) -> dict[str, Any]:
        deployment = specmod.parse(descriptor, source=name)
        async with self.lock(name):
            previous = self.store.get_deployment(name)
            images = sorted({c.image for c in deployment.containers if c.count > 0})
            await self._call(self.engine.ensure_images, images)
            address = publish_address or (self.runtimes[name].publish_address
                                          if name in self.runtimes else self.publish_address)
            the_plan = self._reserve(name, deployment, address)
            for line in describe(the_plan):
                emit(line)
            created: list[ContainerInfo] = []
            try:
                await self._execute(name, deployment, the_plan, address, emit, created,
                                    timeout=timeout)
            except BaseException:  # the CLI prints the error itself, once
                await self._roll_back(name, previous, created)
                raise
            self.store.set_status(name, "deployed")
            self._write_state_file(name, the_plan, deployment)
            if the_plan.is_empty:
                emit(f"deployment {name} unchanged")
            return await self.status(name)

    def _reserve(self, name: str, deployment: Deployment, publish_address: str) -> Plan:
        """Plan, probe newly allocated ports on the host, reserve them in one transaction.

        A port bound by a foreign process, or reserved by a racing gearproxy
        between our plan and our write, is added to `busy` and we plan again."""
        busy: set[int] = set()
        descriptor = json.dumps(specmod.to_json(deployment))
        for _ in range(64):
            current = self.store.current_state(name)
            taken = {h: self.store.taken_ports(h, exclude=name) | busy for h in HOSTS}
            the_plan = plan(deployment, current, HOSTS, name=name, taken=taken)
            explicit = {p.external for i in the_plan.instances for p in i.ports if p.explicit}
            kept = {p.external for c in current.instances for p in c.ports}
            for port in sorted(explicit - kept):
                owner = self.store.port_owner("local", port)
                if owner is not None and owner != name:
                    raise PortConflictError("local", port, owner)
                if not port_is_free("local", port):
                    raise PortConflictError("local", port, None)
            fresh = [port for _, port in the_plan.new_ports() if not port_is_free("local", port)]
            if fresh:
                busy.update(fresh)
                continue
            try:
                self.store.record_deployment(name, descriptor, the_plan.instances,
                                             [r.id for r in the_plan.remove], status="deploying",
                                             publish_address=publish_address)
            except PortConflictError as exc:
                if exc.port in explicit or exc.owner is None:
                    raise
                busy.add(exc.port)
                continue
            return the_plan
        raise DaemonError(f"could not reserve host ports for {name}: too many conflicts")

    async def _execute(self, name: str, deployment: Deployment, the_plan: Plan,
                       publish_address: str, emit: Emit, created: list[ContainerInfo], *,
                       timeout: float) -> None:
        runtime = self.runtimes.get(name)
        if runtime is None:
            runtime = Runtime(name, deployment, the_plan.instances, publish_address)
            self.runtimes[name] = runtime
        runtime.deployment, runtime.publish_address = deployment, publish_address
        await self._call(self.engine.ensure_network, name)
        existing = {c.instance: c for c in await self._call(self.engine.owned_containers, name)}
        for gone in the_plan.remove:
            runtime.held.add(gone.id)
            await self._remove_instance(runtime, gone.id, existing.get(gone.id))
            emit(f"local Container {gone.id} removed")
        desired = {i.id for i in the_plan.instances}
        for iid, orphan in existing.items():  # left by a crash mid-deploy, or by hand
            if iid not in desired:
                await self._call(self.engine.remove, orphan.id)
        runtime.instances = the_plan.instances
        # Proxies of removed instances stop first (a new one may take their port); the
        # new ones start while the containers are created, as they need nothing of them.
        proxies = asyncio.get_running_loop().create_task(self._apply_proxies(runtime))
        try:
            await self._create_and_start(name, the_plan, runtime, existing, emit, created)
        except BaseException:
            await asyncio.wait([proxies])  # let it finish; the container error is the one told
            if not proxies.cancelled():
                proxies.exception()  # retrieved, so asyncio does not log it as lost
            raise
        await proxies
        await self._wait_ready(runtime, timeout)

    async def _create_and_start(self, name: str, the_plan: Plan, runtime: Runtime,
                                existing: dict[str, ContainerInfo], emit: Emit,
                                created: list[ContainerInfo]) -> None:
        """Containers wave by wave (link targets before their sources), each wave's
        instances created and started together, a few at a time: `docker start` is
        ~0.3 s of mostly waiting, so one at a time made a 40-link deploy 30 s long."""
        for wave in start_levels(the_plan):
            await _together((self._create_and_start_one(name, the_plan, runtime,
                                                        existing.get(i.id), i, emit, created)
                             for i in wave), CONTAINER_STARTS_AT_ONCE)

    async def _create_and_start_one(self, name: str, the_plan: Plan, runtime: Runtime,
                                    info: ContainerInfo | None, inst: InstancePlan, emit: Emit,
                                    created: list[ContainerInfo]) -> None:
        """Recreate (when its configuration changed), create, start one instance."""
        if info is not None and (inst.id in the_plan.recreate
                                 or info.config_hash != inst.config_hash):
            runtime.held.add(inst.id)
            await self._call(self.engine.remove, info.id)
            info = None
        if info is None:
            info = await self._call(self.engine.create_container, name, inst)
            created.append(info)
            emit(f"local Container {inst.id} is installed")
        if info.status != "running":
            emit(f"local Container {inst.id} starting")
            runtime.held.discard(inst.id)
            info = await self._call(self.engine.start, info.id)
        runtime.held.discard(inst.id)
        runtime.containers[inst.id] = info
        self.store.set_instance_state(name, inst.id, state="running", docker_id=info.id)

    async def _wait_ready(self, runtime: Runtime, timeout: float) -> None:
        """Until every instance runs (healthy where checked) and every listener accepts."""
        deadline = time.monotonic() + timeout
        pending: list[str] = []
        restart_due: dict[str, float] = {}
        while True:
            for inst in runtime.instances:
                info = await self._call(self.engine.inspect, runtime.containers[inst.id].id)
                if info is not None:
                    runtime.containers[inst.id] = info
                    await self._restart_while_deploying(runtime, inst, info, restart_due)
            await self._apply_proxies(runtime)
            pending = []
            for inst in runtime.instances:
                info = runtime.containers.get(inst.id)
                if info is None or info.status != "running":
                    pending.append(f"{inst.id} is {info.status if info else 'missing'}")
                elif inst.healthcheck is not None and info.health != "healthy":
                    pending.append(f"{inst.id} is {info.health or 'starting'} (health)")
            if not pending:
                pending = await self._listeners_not_accepting(runtime)
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise DaemonError(f"deployment {runtime.name} not ready after {timeout:g}s: "
                                  + "; ".join(pending))
            await asyncio.sleep(0.2)

    async def _restart_while_deploying(self, runtime: Runtime, inst: InstancePlan,
                                       info: ContainerInfo, due: dict[str, float]) -> None:
        """Apply the Restart policy to an instance that exited during the wait: the deploy
        holds the lock, so its "die" event waits, and a consumer that gave up because its
        link was not up yet would otherwise stay down until --timeout."""
        if info.status not in ("exited", "dead") or not _wants_restart(inst, info):
            return
        now = time.monotonic()
        attempt = runtime.restarts.get(inst.id, 0)
        delay = RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)]
        when = due.setdefault(inst.id, now + delay)
        if now < when:
            return
        del due[inst.id]
        runtime.restarts[inst.id] = attempt + 1
        with contextlib.suppress(GearproxyError):  # still exited: reported as not ready
            runtime.containers[inst.id] = await self._call(self.engine.start, info.id)

    async def _listeners_not_accepting(self, runtime: Runtime) -> list[str]:
        problems = []
        for inst in runtime.instances:
            for port in inst.ports:
                # A wildcard is probed on its loopback (a [::] listener is IPv6-only).
                address = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(
                    runtime.publish_address, runtime.publish_address)
                try:
                    async with asyncio.timeout(2):
                        _, writer = await asyncio.open_connection(address, port.external)
                    writer.close()
                except (OSError, TimeoutError):
                    problems.append(f"listener {address}:{port.external} of {inst.id} "
                                    "does not accept")
        return problems

    def _proxy_keys(self, name: str) -> list[str]:
        """The keys of deployment `name`'s proxies (not a key prefix: `app.v2` starts `app.`)."""
        return sorted(k for k, p in self.supervisor.proxies.items() if p.spec.deployment == name)

    async def _apply_proxies(self, runtime: Runtime) -> None:
        specs = proxy_specs(runtime.name, runtime.instances, runtime.running(),
                            publish_address=runtime.publish_address, join_ns_of=self.join_ns_of,
                            busy_poll_us=self.busy_poll_us)
        for key in self._proxy_keys(runtime.name):
            if key not in specs:
                await self.supervisor.stop(key)
        # Concurrently: each new proxy is a Python start-up (~0.2 s CPU) and a ready
        # wait; one at a time they cost 10 s of a 40-link deploy.  Bounded, so that a
        # large deploy does not start a hundred interpreters at once.
        await _together((self.supervisor.ensure(spec) for spec in specs.values()),
                        PROXY_STARTS_AT_ONCE)

    async def _remove_instance(self, runtime: Runtime, instance_id: str,
                               info: ContainerInfo | None) -> None:
        if info is not None:
            await self._call(self.engine.remove, info.id)
        runtime.containers.pop(instance_id, None)

    async def _roll_back(self, name: str, previous: Any, created: list[ContainerInfo]) -> None:
        """Undo a failed deploy: remove what it created and give its ports back."""
        with contextlib.suppress(GearproxyError):
            for info in created:
                await self._call(self.engine.remove, info.id)
        runtime = self.runtimes.get(name)
        if previous is None:
            if runtime is not None:
                runtime.instances = ()
                runtime.containers.clear()
                await self._apply_proxies(runtime)
            self.runtimes.pop(name, None)
            self.store.delete_deployment(name)
            with contextlib.suppress(GearproxyError):
                await self._call(self.engine.remove_network, name)
            return
        # An update failed: go back to the previous descriptor's record, which
        # releases the ports of instances this deploy added.
        with contextlib.suppress(GearproxyError):
            old = specmod.parse(previous.descriptor, source=name)
            old_plan = plan(old, self.store.current_state(name), HOSTS, name=name,
                            taken={h: self.store.taken_ports(h, exclude=name) for h in HOSTS})
            self.store.record_deployment(name, previous.descriptor, old_plan.instances,
                                         [r.id for r in old_plan.remove], status="failed")
            if runtime is not None:
                created_ids = {c.instance for c in created}
                for iid in created_ids:
                    runtime.containers.pop(iid, None)
                runtime.instances = old_plan.instances
                await self._restore_previous(runtime)
                await self._apply_proxies(runtime)

    async def _restore_previous(self, runtime: Runtime) -> None:
        """Bring back the previous containers a failed update removed (the old container of
        a recreated instance, an instance it scaled away), so the update does not leave an
        instance with no container at all and its consumers with a dead link."""
        existing = {c.instance for c in await self._call(self.engine.owned_containers,
                                                         runtime.name)}
        for inst in runtime.instances:
            if inst.id in existing:
                continue
            try:
                info = await self._call(self.engine.create_container, runtime.name, inst)
                runtime.containers[inst.id] = await self._call(self.engine.start, info.id)
            except GearproxyError as exc:
                log.error("rollback_restore_failed", instance=inst.id, error=str(exc))
                continue
            runtime.held.discard(inst.id)
            self.store.set_instance_state(runtime.name, inst.id, state="running",
                                          docker_id=info.id)

    def _write_state_file(self, name: str, the_plan: Plan, deployment: Deployment) -> None:
        directory = self.state_dir / "deployments"
        directory.mkdir(parents=True, exist_ok=True)
        statefile.write(directory / f"{name}.json", the_plan, deployment)

    # -- verbs -------------------------------------------------------------

    def _resolve(self, target: str) -> tuple[Runtime, list[str]]:
        if target in self.runtimes:
            runtime = self.runtimes[target]
            return runtime, [i.id for i in runtime.instances]
        for runtime in self.runtimes.values():
            if runtime.instance(target) is not None:
                return runtime, [target]
        raise UsageError(f"no deployment or instance named {target!r} (see `gearproxy list`)")

    async def stop(self, target: str) -> list[str]:
        runtime, ids = self._resolve(target)
        async with self.lock(runtime.name):
            for iid in ids:
                runtime.held.add(iid)
                info = runtime.containers.get(iid)
                if info is not None:
                    await self._call(self.engine.stop, info.id)
                    runtime.containers[iid] = await self._refresh(info)
                self.store.set_instance_state(runtime.name, iid, state="stopped")
            await self._apply_proxies(runtime)
        return ids

    async def start(self, target: str, *, restart: bool = False) -> list[str]:
        runtime, ids = self._resolve(target)
        async with self.lock(runtime.name):
            for iid in ids:
                info = runtime.containers.get(iid)
                if info is None:
                    raise DaemonError(f"instance {iid} has no container: run `gearproxy deploy` "
                                      "again to re-create it")
                runtime.held.add(iid)
                if restart:
                    await self._call(self.engine.stop, info.id)
                runtime.containers[iid] = await self._call(self.engine.start, info.id)
                runtime.held.discard(iid)
                self.store.set_instance_state(runtime.name, iid, state="running")
            await self._apply_proxies(runtime)
        return ids

    async def _refresh(self, info: ContainerInfo) -> ContainerInfo:
        fresh = await self._call(self.engine.inspect, info.id)
        return fresh if fresh is not None else info

    async def delete(self, name: str) -> bool:
        async with self.lock(name):
            runtime = self.runtimes.pop(name, None)
            if runtime is not None:
                runtime.held.update(i.id for i in runtime.instances)
            await _together((self.supervisor.stop(k) for k in self._proxy_keys(name)),
                            PROXY_STARTS_AT_ONCE)
            await _together((self._call(self.engine.remove, c.id) for c in
                             await self._call(self.engine.owned_containers, name)),
                            CONTAINER_STARTS_AT_ONCE)
            await self._call(self.engine.remove_network, name)
            existed = self.store.delete_deployment(name) or runtime is not None
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / "deployments" / f"{name}.json").unlink()
            return existed

    # -- status ------------------------------------------------------------

    async def status(self, name: str) -> dict[str, Any]:
        runtime = self.runtimes.get(name)
        record = self.store.get_deployment(name)
        if runtime is None or record is None:
            raise UsageError(f"no deployment named {name!r} (see `gearproxy list`)")
        instances = []
        for inst in runtime.instances:
            info = runtime.containers.get(inst.id)
            instances.append({
                "id": inst.id, "container": inst.container, "image": inst.image,
                "state": info.status if info else "missing",
                "health": info.health if info else None,
                "address": info.address if info else None,
                "held": inst.id in runtime.held,
                "ports": [{"internal": p.internal, "external": p.external} for p in inst.ports],
            })
        proxies, links = [], []
        for key in self._proxy_keys(name):
            proxy = self.supervisor.proxies.get(key)
            if proxy is None:  # stopped while an earlier one answered
                continue
            summary = proxy.summary()
            summary["stats"] = await self.supervisor.stats(key)
            proxies.append(summary)
        running = runtime.running()
        for inst in runtime.instances:
            for link in inst.links:
                up = link.source in running and link.target in running
                links.append({
                    "source": link.source, "target": link.target,
                    "listen": host_address(link.listen_host, link.listen_port),
                    "target_port": link.target_internal,
                    "host_port": link.target_host_port,
                    "state": "up" if up else "down",
                })
        return {"name": name, "status": record.status, "instances": instances,
                "links": links, "proxies": proxies}

    def list(self) -> list[dict[str, Any]]:
        out = []
        for name in self.store.deployment_names():
            record = self.store.get_deployment(name)
            runtime = self.runtimes.get(name)
            out.append({"name": name, "status": record.status if record else "unknown",
                        "instances": len(runtime.instances) if runtime else 0,
                        "running": len(runtime.running()) if runtime else 0})
        return out

    # -- reconcile and events ---------------------------------------------

    async def reconcile(self) -> None:
        """Adopt what a previous daemon left: proxies, containers, deployments."""
        await self.supervisor.adopt_existing()
        known = set()
        for name in self.store.deployment_names():
            record = self.store.get_deployment(name)
            if record is None:
                continue
            known.add(name)
            try:
                deployment = specmod.parse(record.descriptor, source=name)
                the_plan = plan(deployment, self.store.current_state(name), HOSTS, name=name,
                                taken={h: self.store.taken_ports(h, exclude=name) for h in HOSTS})
            except GearproxyError as exc:
                log.error("reconcile_failed", deployment=name, error=str(exc))
                continue
            runtime = Runtime(name, deployment, the_plan.instances,
                              record.publish_address or self.publish_address)
            self.runtimes[name] = runtime
            stopped = {r.id for r in self.store.instances(name) if r.state == "stopped"}
            runtime.held.update(stopped)
            for owned in await self._call(self.engine.owned_containers, name):
                runtime.containers[owned.instance] = owned
            async with self.lock(name):
                for inst in runtime.instances:
                    info = runtime.containers.get(inst.id)
                    if (info is not None and info.status != "running"
                            and inst.id not in stopped and _wants_restart(inst, info)):
                        with contextlib.suppress(GearproxyError):
                            runtime.containers[inst.id] = await self._call(
                                self.engine.start, info.id)
                await self._apply_proxies(runtime)
        for key, proxy in list(self.supervisor.proxies.items()):
            if proxy.spec.deployment not in known:
                await self.supervisor.stop(key)

    async def on_event(self, event: EngineEvent) -> None:
        runtime = self.runtimes.get(event.deployment)
        if runtime is None or runtime.instance(event.instance) is None:
            return
        async with self.lock(runtime.name):
            if self.runtimes.get(runtime.name) is not runtime:
                return  # deleted (or re-adopted) while this event waited for the lock
            iid = event.instance
            info = await self._call(self.engine.inspect, event.container_id)
            current = runtime.containers.get(iid)
            if current is not None and current.id != event.container_id:
                return  # an event of a container this instance no longer uses
            if info is None:
                runtime.containers.pop(iid, None)
            else:
                runtime.containers[iid] = info
            # The Restart policy first: a proxy that cannot be applied must not keep the
            # container down.
            if event.action == "die" and info is not None and info.status != "running":
                self._maybe_restart(runtime, iid, info, died_at=event.time)
            await self._apply_proxies(runtime)

    def _maybe_restart(self, runtime: Runtime, iid: str, info: ContainerInfo, *,
                       died_at: float) -> None:
        inst = runtime.instance(iid)
        if inst is None or iid in runtime.held:
            return
        if not _wants_restart(inst, info):
            return
        if _run_time(info, died_at) > RESTART_STABLE_AFTER:
            runtime.restarts[iid] = 0  # not crash-looping: back-off only for quick deaths
        attempt = runtime.restarts.get(iid, 0)
        runtime.restarts[iid] = attempt + 1
        delay = RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)]
        log.info("instance_restarting", deployment=runtime.name, instance=iid, delay=delay)
        task = asyncio.get_running_loop().create_task(self._restart_later(runtime, iid, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart_later(self, runtime: Runtime, iid: str, delay: float) -> None:
        await asyncio.sleep(delay)
        async with self.lock(runtime.name):
            info = runtime.containers.get(iid)
            current = self.runtimes.get(runtime.name)
            if info is None or iid in runtime.held or current is not runtime:
                return
            try:
                runtime.containers[iid] = await self._call(self.engine.start, info.id)
            except GearproxyError as exc:
                log.error("instance_restart_failed", instance=iid, error=str(exc))
                return
            try:
                await self._apply_proxies(runtime)
            except GearproxyError as exc:  # a task: nobody else would see it
                log.error("relink_failed", deployment=runtime.name, instance=iid, error=str(exc))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


async def _together(calls: Iterable[Awaitable[Any]], at_once: int) -> None:
    """Await `calls` concurrently, at most `at_once` at a time; when some fail, raise the
    first failure once all have finished (none is left running behind the error)."""
    limit = asyncio.Semaphore(at_once)

    async def bounded(call: Awaitable[Any]) -> None:
        async with limit:
            await call

    results = await asyncio.gather(*(bounded(c) for c in calls), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _run_time(info: ContainerInfo, died_at: float) -> float:
    """Seconds the container ran before it died (0 when its start time is unknown)."""
    try:
        started = datetime.fromisoformat(info.started_at).timestamp()
    except ValueError:
        return 0.0
    return died_at - started


def _wants_restart(inst: InstancePlan, info: ContainerInfo) -> bool:
    """Whether the descriptor's Restart policy restarts `inst` after it exited as `info` says."""
    return inst.restart == "always" or (inst.restart == "on-failure" and info.exit_code != 0)
