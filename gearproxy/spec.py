"""The deployment descriptor: geard's JSON, parsed into frozen dataclasses.

Theory of operation
-------------------
`load(path)` reads the file (at most 1 MiB) and hands the text to `parse`,
which decodes JSON and walks it with a small validator that always knows the
JSON path it is at (`containers[1].publicports[0].internal`).  Keys are
case-insensitive as in geard, but unknown keys are errors (geard silently
ignored typos).  The first problem found raises `DescriptorError(path, msg)`;
nothing is partially returned.

A saved state file (`Containers` plus `Instances`) is valid input: the
instances are parsed into `InstanceRecord`s so the planner can keep their
host ports.

Extensions beyond geard: `Command` (string or list), `Restart`
(`no|on-failure|always`, default `always`) and `Healthcheck`
`{Test, Interval, Timeout, Retries}` on a container.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RestartPolicy = Literal["no", "on-failure", "always"]
RESTART_POLICIES: tuple[RestartPolicy, ...] = ("no", "on-failure", "always")

MAX_DESCRIPTOR_BYTES = 1 << 20
MAX_COUNT = 1000
NAME_PATTERN = r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}"


@dataclass(frozen=True, slots=True)
class PortPair:
    """`{Internal, External}`: External 0 means "allocate a host port"."""

    internal: int
    external: int = 0


@dataclass(frozen=True, slots=True)
class Link:
    """`{To, Ports, AliasPorts, MatchPort}` on a source container.

    `ports` empty means every public port of the target.  `alias_ports` maps a
    target internal port (`internal`) to the port the source sees
    (`external`).  `match_port` keeps the target's port and spreads target
    instances over 127.0.0.2, .3, … instead of over ports.
    """

    to: str
    ports: tuple[int, ...] = ()
    alias_ports: tuple[PortPair, ...] = ()
    match_port: bool = False


@dataclass(frozen=True, slots=True)
class Healthcheck:
    """Extension: Docker's healthcheck, in seconds. `test` as Docker takes it."""

    test: tuple[str, ...]
    interval: float = 5.0
    timeout: float = 3.0
    retries: int = 3


@dataclass(frozen=True, slots=True)
class Container:
    """One entry of `Containers`."""

    name: str
    image: str
    count: int = 1
    public_ports: tuple[PortPair, ...] = ()
    links: tuple[Link, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] | None = None
    restart: RestartPolicy = "always"
    healthcheck: Healthcheck | None = None


@dataclass(frozen=True, slots=True)
class InstancePort:
    """A port of a saved instance: `{Internal, External, Target {Host, Port}}`."""

    internal: int
    external: int
    target_host: str = ""
    target_port: int = 0


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """An entry of a state file's `Instances`: `{Id, Image, From, On, Ports}`."""

    id: str
    image: str
    from_: str
    on: str = "local"
    ports: tuple[InstancePort, ...] = ()


@dataclass(frozen=True, slots=True)
class Deployment:
    """A whole descriptor (or saved state file)."""

    containers: tuple[Container, ...]
    id_prefix: str = ""
    instances: tuple[InstanceRecord, ...] = field(default=())

    def container(self, name: str) -> Container:
        """The container named `name` (names are unique after validation)."""
        for c in self.containers:
            if c.name == name:
                return c
        raise KeyError(name)
