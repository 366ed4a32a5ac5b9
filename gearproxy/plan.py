"""The planner: descriptor + current state + hosts -> a plan.  Pure: no Docker, no sockets.

(Types only in this revision: `plan()` and its theory of operation land next.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gearproxy.spec import Healthcheck, RestartPolicy

Action = Literal["create", "keep", "recreate", "remove"]

PORT_RANGE_START = 4000
PORT_RANGE_END = 59999


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
    """The desired state of one instance."""

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
