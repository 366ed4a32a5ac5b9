"""Which proxy processes a deployment needs, derived from its plan and its containers.  Pure.

One proxy serves each public port of each instance (key
`<deployment>.<instance>.<internal port>`):

- it listens on the host at `publish_address:external`;
- it listens inside the network namespace of every running instance that
  links to this port, at the link's listen address (`127.0.0.1:27017`);
- it forwards to the instance's container address and internal port.

A stopped target has no address: its proxy gets an empty pool, so clients
are closed at once instead of waiting on a dead address.  A stopped consumer
has no namespace: its listeners are dropped until it runs again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gearproxy.orchestrator.supervisor import ProxySpec
from gearproxy.plan import InstancePlan


@dataclass(frozen=True, slots=True)
class Running:
    """What wiring needs to know of a running container."""

    pid: int
    address: str


def proxy_key(deployment: str, instance: str, internal: int) -> str:
    return f"{deployment}.{instance}.{internal}"


def host_address(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def proxy_specs(deployment: str, instances: tuple[InstancePlan, ...],
                running: Mapping[str, Running], *, publish_address: str = "0.0.0.0",
                join_ns_of: int | None = None, mode: str = "auto",
                busy_poll_us: int = 0) -> dict[str, ProxySpec]:
    """Every proxy the deployment needs, keyed by proxy key."""
    consumers: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for source in instances:
        where = running.get(source.id)
        if where is None:
            continue
        for link in source.links:
            consumers.setdefault((link.target, link.target_internal), []).append(
                (f"/proc/{where.pid}/ns/net", host_address(link.listen_host, link.listen_port)))
    specs: dict[str, ProxySpec] = {}
    for inst in instances:
        target = running.get(inst.id)
        for port in inst.ports:
            key = proxy_key(deployment, inst.id, port.internal)
            specs[key] = ProxySpec(
                key=key,
                listen=(host_address(publish_address, port.external),),
                targets=(host_address(target.address, port.internal),) if target else (),
                netns_listen=tuple(sorted(consumers.get((inst.id, port.internal), ()))),
                join_ns_of=join_ns_of,
                mode=mode,
                deployment=deployment,
                busy_poll_us=busy_poll_us,
            )
    return specs
