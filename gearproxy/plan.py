"""The planner: descriptor + current state + hosts -> a plan.  Pure: no Docker, no sockets.

Theory of operation
-------------------
`plan()` computes the whole desired state of a deployment and diffs it
against what exists, in five steps that each only read what the previous ones
decided:

1. **Instances.**  Each container wants `Count` instances with ids
   `IdPrefix + Name + "-" + n`.  The numbers already in use come from the
   current state (and, when a saved state file is the input, from its
   `Instances`).  Scaling down keeps the lowest numbers and removes the
   highest; scaling up fills the lowest free numbers, so a gap (1 and 3 exist)
   is filled (2) instead of producing a duplicate as geard could.
2. **Placement.**  Existing instances keep their host.  New ones are placed
   round-robin over `hosts`, in descriptor order.
3. **Host ports.**  Every public port of every instance gets a host port, in
   this order of precedence: the port the current instance already has (ports
   of kept and recreated instances never change), an explicit `External`, the
   port a saved state file recorded (if still free), else the lowest port of
   PORT_RANGE_START..PORT_RANGE_END that is not in `taken[host]`, not claimed
   in this plan and not held by an instance this plan removes (so old and new
   proxies never fight over a port during a deploy).  Two instances that need
   the same host port on one host is a `DescriptorError`: an explicit External
   with `Count` > 1 works only when the instances land on different hosts.
   `taken` is what *others* hold (other deployments' reservations, ports found
   bound); the store makes the final reservation and names the owner of an
   explicit port that someone else holds.
4. **Links.**  Links are resolved per source container (all its instances see
   the same addresses) into `LinkEndpoint`s, one per source instance x target
   instance x target port.  The linked ports are `spec.link_ports`: the
   aliased ports, then `Ports`, or every public port of the target when both
   are empty (as geard).  The first target instance is reached at
   `127.0.0.1:<port>`, where `<port>` is the target's internal port or its
   alias; further instances get the next port free in the source's namespace
   (not one of the source's own public ports, not another link's address), or
   with `MatchPort` keep the port and take 127.0.0.2, .3, ...  The natural
   addresses of first instances are handed out before any fallback, so one
   link's fan-out never pushes another link off its natural port.  An aliased
   or MatchPort address that cannot be had is a `DescriptorError`.  (geard
   made an alias imply MatchPort; here an alias only moves the base port.)
   Fan-out positions follow instance numbers, so filling a gap can shift which
   port reaches which replica.  The endpoint's target is the target
   instance's host and host port.
5. **Diff.**  The lifecycle table below decides each instance's action from
   whether it exists, whether it is wanted and whether its config hash (see
   `config_hash`) changed.

Start order: instances are listed link targets before their sources
(containers sorted topologically, descriptor order breaking ties).  Mutual
links are allowed, as in geard (a link is a proxy, independent of start
order): a cycle is broken by starting the first remaining container in
descriptor order.

Instance lifecycle (`LIFECYCLE`)
--------------------------------
::

    in current | in desired | config hash equal | action
    -----------+------------+-------------------+---------
    no         | yes        | -                 | create
    yes        | yes        | yes               | keep
    yes        | yes        | no                | recreate
    yes        | no         | -                 | remove

A kept instance whose host ports change (a public port added, removed, or
its explicit External edited) keeps its container; only its proxies change
(`InstancePlan.ports_changed`, `Plan.repoint`).  Links are not part of the
current state: the executor always converges link proxies to `Plan.links`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Literal, NamedTuple

from gearproxy.errors import DescriptorError, StoreError, UsageError
from gearproxy.spec import (
    Container,
    Deployment,
    Healthcheck,
    InstanceRecord,
    RestartPolicy,
    link_ports,
)

Action = Literal["create", "keep", "recreate", "remove"]

PORT_RANGE_START = 4000
PORT_RANGE_END = 59999
LOCAL_HOST: Final = "local"
LOOPBACK: Final = "127.0.0.1"
MAX_PORT: Final = 65535

# (in current, in desired, config hash equal) -> action; "hash equal" is False
# when the instance is missing on either side.  See the module docstring.
LIFECYCLE: Final[Mapping[tuple[bool, bool, bool], Action]] = {
    (False, True, False): "create",
    (True, True, True): "keep",
    (True, True, False): "recreate",
    (True, False, False): "remove",
}

@dataclass(frozen=True, slots=True)
class PortMapping:
    """A public port of an instance: container `internal` served on host port `external`."""

    internal: int
    external: int
    explicit: bool = False


@dataclass(frozen=True, slots=True)
class LinkEndpoint:
    """One resolved link: inside `source`'s namespace, `listen_host:listen_port` reaches
    `target`'s `target_internal` port (on host `target_host`, host port `target_host_port`)."""

    source: str
    listen_host: str
    listen_port: int
    target: str
    target_container: str
    target_internal: int
    target_host: str
    target_host_port: int


@dataclass(frozen=True, slots=True)
class InstancePlan:
    """The desired state of one instance, and what the plan does to it (`action`)."""

    id: str
    container: str
    index: int
    host: str
    image: str
    ports: tuple[PortMapping, ...]
    environment: tuple[tuple[str, str], ...]
    command: tuple[str, ...] | None
    restart: RestartPolicy
    healthcheck: Healthcheck | None
    config_hash: str
    links: tuple[LinkEndpoint, ...]
    action: Action = "create"
    ports_changed: bool = False
    fresh_ports: frozenset[int] = frozenset()  # internal ports whose host port is new

    def port(self, internal: int) -> int:
        """The host port serving container port `internal` (KeyError if not public)."""
        for m in self.ports:
            if m.internal == internal:
                return m.external
        raise KeyError(internal)


@dataclass(frozen=True, slots=True)
class CurrentInstance:
    """What the store knows of an existing instance."""

    id: str
    container: str
    host: str
    config_hash: str
    ports: tuple[PortMapping, ...]


@dataclass(frozen=True, slots=True)
class CurrentState:
    """The deployment as it stands (empty for a first deploy)."""

    instances: tuple[CurrentInstance, ...] = ()


class PortClaim(NamedTuple):
    """One host port the desired state uses."""

    host: str
    port: int
    instance: str
    internal: int
    explicit: bool


@dataclass(frozen=True, slots=True)
class Plan:
    """The desired state of deployment `name` and the steps from the current state to it.

    `instances` is the whole desired state in start order (link targets before
    their sources); `create`, `keep` and `recreate` partition their ids (in
    start order); `remove` lists the current instances that are not wanted.
    """

    name: str
    instances: tuple[InstancePlan, ...]
    create: tuple[str, ...]
    keep: tuple[str, ...]
    recreate: tuple[str, ...]
    remove: tuple[CurrentInstance, ...]

    @property
    def repoint(self) -> tuple[str, ...]:
        """Kept instances whose host ports change: their proxies change, the container stays."""
        return tuple(i.id for i in self.instances if i.action == "keep" and i.ports_changed)

    @property
    def is_empty(self) -> bool:
        """True when executing the plan changes no container and no host port."""
        return not (self.create or self.recreate or self.remove or self.repoint)

    @property
    def links(self) -> tuple[LinkEndpoint, ...]:
        """Every link endpoint of the desired state, in start order of the sources."""
        return tuple(e for i in self.instances for e in i.links)

    def instance(self, id: str) -> InstancePlan:
        """The desired instance `id` (KeyError if the plan does not want it)."""
        for i in self.instances:
            if i.id == id:
                return i
        raise KeyError(id)

    def port_claims(self) -> tuple[PortClaim, ...]:
        """Every host port of the desired state, with its instance and internal port."""
        return tuple(
            PortClaim(i.host, m.external, i.id, m.internal, m.explicit)
            for i in self.instances
            for m in i.ports
        )

    def new_ports(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of allocated (not explicit) host ports that instances did not
        hold before this plan: what the store must newly reserve."""
        return tuple(
            (i.host, m.external)
            for i in self.instances
            for m in i.ports
            if not m.explicit and m.internal in i.fresh_ports
        )

    def as_current(self) -> CurrentState:
        """The current state once this plan has been executed (for re-planning)."""
        return CurrentState(
            tuple(
                CurrentInstance(i.id, i.container, i.host, i.config_hash, i.ports)
                for i in self.instances
            )
        )


def config_hash(container: Container) -> str:
    """sha256 (hex) of an instance's effective container configuration.

    In it: the image, the environment (as a name -> value mapping, so order and
    overridden duplicates do not matter), the command and the healthcheck:
    what Docker bakes into a container, so a change needs a new one.  Not in
    it: ports and links (proxies outside the container serve them, so a change
    re-points proxies instead of recreating the container), the count (it adds
    or removes instances) and the restart policy (the daemon applies it when it
    sees a container die; Docker's own restart policy is not used).
    """
    hc = container.healthcheck
    doc = {
        "v": 1,
        "image": container.image,
        "environment": sorted(dict(container.environment).items()),
        "command": list(container.command) if container.command is not None else None,
        "healthcheck": None if hc is None else [list(hc.test), hc.interval, hc.timeout, hc.retries],
    }
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()


def instance_id(deployment: Deployment, container: str, n: int) -> str:
    """geard's instance id: `IdPrefix + Name + "-" + n`."""
    return f"{deployment.id_prefix}{container}-{n}"


def _instance_number(id_: str, prefix: str) -> int | None:
    """n of an id `prefix + "-" + n`, or None when the id is not of that form."""
    head, sep, tail = id_.rpartition("-")
    if not sep or head != prefix or not tail.isdigit() or tail.startswith("0"):
        return None
    return int(tail)


@dataclass(slots=True)
class _Slot:
    """Working record of one desired instance while the planner fills it in."""

    ci: int  # index of its container in the descriptor
    n: int
    id: str
    current: CurrentInstance | None
    record: InstanceRecord | None
    host: str = ""
    ports: dict[int, PortMapping] = field(default_factory=dict)


def plan(
    deployment: Deployment,
    current: CurrentState = CurrentState(),
    hosts: Sequence[str] = (LOCAL_HOST,),
    *,
    name: str,
    taken: Mapping[str, frozenset[int]] | None = None,
) -> Plan:
    """Plan deployment `name`: the desired state of `deployment` and the diff from `current`.

    Pure and deterministic.  `hosts` are the placement hosts for new
    instances; `taken[host]` are host ports others hold there.  Raises
    `DescriptorError` for what only the planner can see (two instances needing
    one host port, an unresolvable link address), `StoreError` when the port
    range is exhausted, `UsageError` when new instances have no host.
    """
    taken = taken or {}
    containers = deployment.containers
    slots, remove = _number_instances(deployment, current)
    _place(slots, hosts)
    _assign_ports(deployment, slots, remove, taken)
    by_container: dict[int, list[_Slot]] = {i: [] for i in range(len(containers))}
    for s in slots:
        by_container[s.ci].append(s)
    links = {ci: _resolve_links(deployment, ci, by_container) for ci in by_container}

    instances = [
        _instance_plan(containers[ci], s, links[ci])
        for ci in _start_order(deployment)
        for s in by_container[ci]
    ]

    def ids(action: Action) -> tuple[str, ...]:
        return tuple(i.id for i in instances if i.action == action)

    return Plan(name, tuple(instances), ids("create"), ids("keep"), ids("recreate"), tuple(remove))


def _instance_plan(c: Container, s: _Slot, links: tuple[LinkEndpoint, ...]) -> InstancePlan:
    """Step 5: the desired instance and its action (`LIFECYCLE`)."""
    digest = config_hash(c)
    ports = tuple(s.ports[p.internal] for p in c.public_ports)
    held = {(m.internal, m.external) for m in s.current.ports} if s.current else set()
    same = s.current is not None and s.current.config_hash == digest
    return InstancePlan(
        id=s.id,
        container=c.name,
        index=s.n,
        host=s.host,
        image=c.image,
        ports=ports,
        environment=c.environment,
        command=c.command,
        restart=c.restart,
        healthcheck=c.healthcheck,
        config_hash=digest,
        links=tuple(replace(e, source=s.id) for e in links),
        action=LIFECYCLE[(s.current is not None, True, same)],
        ports_changed=s.current is not None and held != {(m.internal, m.external) for m in ports},
        fresh_ports=frozenset(m.internal for m in ports if (m.internal, m.external) not in held),
    )


def _number_instances(
    deployment: Deployment, current: CurrentState
) -> tuple[list[_Slot], list[CurrentInstance]]:
    """Step 1: the desired instances (descriptor order, then n) and the current ones to remove."""
    names = {c.name: i for i, c in enumerate(deployment.containers)}
    prefix = deployment.id_prefix
    existing: dict[int, dict[int, CurrentInstance | InstanceRecord]] = {
        i: {} for i in names.values()
    }
    remove: list[CurrentInstance] = []
    current_ids = {c.id for c in current.instances}
    for cur in current.instances:
        ci = names.get(cur.container)
        n = None if ci is None else _instance_number(cur.id, prefix + cur.container)
        if ci is None or n is None or n in existing[ci]:
            remove.append(cur)
        else:
            existing[ci][n] = cur
    for rec in deployment.instances:  # a saved state file: reuse its ids, hosts and ports
        ci = names.get(rec.from_)
        n = None if ci is None else _instance_number(rec.id, prefix + rec.from_)
        if ci is not None and n is not None and rec.id not in current_ids:
            existing[ci].setdefault(n, rec)

    slots: list[_Slot] = []
    for ci, c in enumerate(deployment.containers):
        have = sorted(existing[ci])
        wanted = have[: c.count]
        for n in have[c.count :]:
            old = existing[ci][n]
            if isinstance(old, CurrentInstance):
                remove.append(old)
        n = 1
        while len(wanted) < c.count:
            if n not in existing[ci]:
                wanted.append(n)
            n += 1
        for n in sorted(wanted):
            prior = existing[ci].get(n)
            slots.append(
                _Slot(
                    ci,
                    n,
                    instance_id(deployment, c.name, n),
                    prior if isinstance(prior, CurrentInstance) else None,
                    prior if isinstance(prior, InstanceRecord) else None,
                )
            )
    remove.sort(key=_removal_key)
    return slots, remove


def _removal_key(cur: CurrentInstance) -> tuple[str, int, str]:
    """Removals in a stable order: by container, then instance number."""
    tail = cur.id.rpartition("-")[2]
    return (cur.container, int(tail) if tail.isdigit() else 0, cur.id)


def _place(slots: list[_Slot], hosts: Sequence[str]) -> None:
    """Step 2: current instances keep their host; the others go round-robin over `hosts`."""
    turn = 0
    for s in slots:
        if s.current is not None:
            s.host = s.current.host
        elif s.record is not None and s.record.on in hosts:
            s.host = s.record.on
        elif not hosts:
            raise UsageError(f"no host to place instance {s.id} on")
        else:
            s.host = hosts[turn % len(hosts)]
            turn += 1


def _assign_ports(
    deployment: Deployment,
    slots: list[_Slot],
    remove: list[CurrentInstance],
    taken: Mapping[str, frozenset[int]],
) -> None:
    """Step 3: a host port for every public port of every desired instance."""
    claimed: dict[tuple[str, int], tuple[str, int]] = {}  # (host, port) -> (instance, internal)
    fixed: list[tuple[int, _Slot, int, int, bool, str]] = []  # (rank, slot, internal, port, …)
    later: list[tuple[_Slot, int, int]] = []  # (slot, internal, recorded port or 0)
    for s in slots:
        c = deployment.containers[s.ci]
        held = {m.internal: m.external for m in s.current.ports} if s.current else {}
        recorded = {p.internal: p.external for p in s.record.ports} if s.record else {}
        for pi, pp in enumerate(c.public_ports):
            path = f"containers[{s.ci}].publicports[{pi}].external"
            if pp.external:
                fixed.append((1, s, pp.internal, pp.external, True, path))
            elif pp.internal in held:
                fixed.append((0, s, pp.internal, held[pp.internal], False, path))
            else:
                later.append((s, pp.internal, recorded.get(pp.internal, 0)))

    # Ports current instances hold are registered first, so a clash with a newly
    # explicit External is reported at the descriptor field that caused it.
    for rank, s, internal, port, explicit, path in sorted(fixed, key=lambda f: f[0]):
        owner = claimed.setdefault((s.host, port), (s.id, internal))
        if owner != (s.id, internal):
            msg = f"host port {port} on {s.host} is needed by both {owner[0]} and {s.id}"
            if rank == 0:
                raise StoreError(f"current state is inconsistent: {msg}")
            raise DescriptorError(path, msg + "; use External 0 (allocate) or Count 1")
        s.ports[internal] = PortMapping(internal, port, explicit)

    removing = {(c.host, m.external) for c in remove for m in c.ports}
    cursor: dict[str, int] = {}

    def blocked(host: str, port: int) -> bool:
        return (host, port) in claimed or (host, port) in removing or port in taken.get(host, ())

    for s, internal, recorded_port in later:
        port = recorded_port
        if not (0 < port <= MAX_PORT) or blocked(s.host, port):
            port = cursor.get(s.host, PORT_RANGE_START)
            while port <= PORT_RANGE_END and blocked(s.host, port):
                port += 1
            if port > PORT_RANGE_END:
                raise StoreError(
                    f"no free host port left in {PORT_RANGE_START}..{PORT_RANGE_END} on "
                    f"{s.host} for {s.id} port {internal}; delete unused deployments"
                )
            cursor[s.host] = port + 1  # blocked only grows, so the lowest free only rises
        claimed[(s.host, port)] = (s.id, internal)
        s.ports[internal] = PortMapping(internal, port, False)


def _resolve_links(
    deployment: Deployment, ci: int, by_container: Mapping[int, list[_Slot]]
) -> tuple[LinkEndpoint, ...]:
    """Step 4: the link endpoints of container `ci`, the same for each of its instances
    (`source` is left empty for the caller to fill in)."""
    containers = deployment.containers
    names = {c.name: i for i, c in enumerate(containers)}
    source = containers[ci]
    own = {p.internal for p in source.public_ports}
    used: set[tuple[str, int]] = set()
    # One request per (link, target port): (path, base port, pinned?, match?, targets, internal)
    requests: list[tuple[str, int, bool, bool, list[_Slot], int]] = []
    for li, link in enumerate(source.links):
        path = f"containers[{ci}].links[{li}]"
        ti = names.get(link.to)
        if ti is None:
            raise DescriptorError(f"{path}.to", f"no container named {link.to!r}")
        published = {p.internal for p in containers[ti].public_ports}
        aliased = {a.internal for a in link.alias_ports if a.external}
        for pair in link_ports(link, containers[ti]):
            if pair.internal not in published:
                raise DescriptorError(
                    f"{path}.ports", f"{link.to} does not publish port {pair.internal}"
                )
            requests.append(
                (
                    path,
                    pair.external,
                    pair.internal in aliased,
                    link.match_port,
                    by_container[ti],
                    pair.internal,
                )
            )

    slots: dict[tuple[int, int], tuple[str, int]] = {}
    pending: list[tuple[int, int]] = []
    # First pass: the natural address of each first target instance; MatchPort
    # spreads the further ones over 127.0.0.2, .3, ... on the same port.
    for ri, (path, base, pinned, match, targets, _) in enumerate(requests):
        for j in range(len(targets) if match else min(1, len(targets))):
            if base in own and (pinned or match):
                raise DescriptorError(
                    path,
                    f"{source.name} publishes port {base} itself, so "
                    "a link cannot listen on it there; use AliasPorts",
                )
            if base in own:
                pending.append((ri, 0))
                continue
            if j == 0 and (LOOPBACK, base) not in used:
                host = LOOPBACK
            elif match:
                host = _match_host(base, used, path, source.name)
            elif pinned:
                raise DescriptorError(
                    path,
                    f"127.0.0.1:{base} inside {source.name} is already "
                    "used by another link; choose another alias port",
                )
            else:
                pending.append((ri, 0))
                continue
            used.add((host, base))
            slots[(ri, j)] = (host, base)
        if not match:
            pending.extend((ri, j) for j in range(1, len(targets)))
    # Second pass: everything else takes the next port free in the source's namespace.
    for ri, j in sorted(pending):
        path, base = requests[ri][0], requests[ri][1]
        port = base + 1
        while port in own or (LOOPBACK, port) in used:
            port += 1
        if port > MAX_PORT:
            raise DescriptorError(path, f"no free port left inside {source.name} for this link")
        used.add((LOOPBACK, port))
        slots[(ri, j)] = (LOOPBACK, port)

    return tuple(
        LinkEndpoint(
            "",
            *slots[(ri, j)],
            t.id,
            containers[t.ci].name,
            internal,
            t.host,
            t.ports[internal].external,
        )
        for ri, (_, _, _, _, targets, internal) in enumerate(requests)
        for j, t in enumerate(targets)
    )


def _match_host(port: int, used: set[tuple[str, int]], path: str, source: str) -> str:
    """The lowest 127.0.0.k free for `port` inside the source (MatchPort links)."""
    for k in range(1, 255):
        if (f"127.0.0.{k}", port) not in used:
            return f"127.0.0.{k}"
    raise DescriptorError(path, f"no loopback address left for port {port} inside {source}")


def _start_order(deployment: Deployment) -> list[int]:
    """Container indexes, link targets before their sources; cycles broken in descriptor order."""
    containers = deployment.containers
    names = {c.name: i for i, c in enumerate(containers)}
    needs = {
        i: {names[lk.to] for lk in c.links if lk.to in names} - {i}
        for i, c in enumerate(containers)
    }
    order: list[int] = []
    left = list(range(len(containers)))
    while left:
        ready = next((i for i in left if needs[i] <= set(order)), left[0])
        order.append(ready)
        left.remove(ready)
    return order


def display_host(host: str) -> str:
    """How a placement host is written in link targets (`local` -> `localhost`, as geard)."""
    return "localhost" if host == LOCAL_HOST else host


def start_levels(plan: Plan) -> list[tuple[InstancePlan, ...]]:
    """The desired instances in waves that may start together.

    An instance starts in the wave after the latest of its link targets that
    comes before it in start order; a link to a later instance (a cycle, broken
    by start order) does not hold it back.  Wave 0 has no earlier targets.
    """
    position = {i.id: n for n, i in enumerate(plan.instances)}
    level: dict[str, int] = {}
    for n, inst in enumerate(plan.instances):
        earlier = [level[e.target] for e in inst.links if position[e.target] < n]
        level[inst.id] = 1 + max(earlier) if earlier else 0
    waves: list[list[InstancePlan]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for inst in plan.instances:
        waves[level[inst.id]].append(inst)
    return [tuple(w) for w in waves]
