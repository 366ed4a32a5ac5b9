"""The deployment descriptor: geard's JSON, parsed into frozen dataclasses.

Theory of operation
-------------------
`load(path)` reads the file (at most 1 MiB, UTF-8) and hands the text to
`parse`, which decodes JSON and hands the result to `from_json`; that walks it
with a small validator (`gearproxy._validate`) that always knows the JSON path
it is at (`containers[1].publicports[0].internal`).  Paths use lowercase
canonical keys whatever case the user wrote.  Keys are case-insensitive as in
geard, but unknown keys are errors (geard silently ignored typos), and so is a
key given twice in any spelling.  The first problem found raises
`DescriptorError(path, msg)`; nothing is partially returned.

Checks run in two passes: each container on its own (types, names, ports,
environment, extensions), then the cross-references (duplicate names,
explicit host ports, links and the local ports they occupy in the source).

A saved state file (`Containers` plus `Instances`) is valid input: the
instances are parsed into `InstanceRecord`s so the planner can keep their
host ports.  The keys geard writes into every state file but gearproxy does
not implement (`RandomizeIds`, `Notify`, `Affinity`, `NonLocal`) are accepted
only with their neutral value.  `to_json` writes a `Deployment` back in
geard's spelling, so that `parse(json.dumps(to_json(d))) == d`.

Extensions beyond geard: `Command` (string, split like a shell, or list),
`Restart` (`no|on-failure|always`, default `always`) and `Healthcheck`
`{Test, Interval, Timeout, Retries}` on a container.

Decisions (where geard was silent or lax):
- Container names are unique ignoring case (`db` and `DB` clash: they would
  give instance ids that differ only in case); a link's `To` must match the
  name exactly.
- A container may not link to itself: geard allowed it for clusters, but the
  in-namespace listener would take the container's own port.
- `Count` defaults to 1 and may be 0 ("scaled to zero").  An explicit
  `External` appears once in a descriptor; whether `Count` > 1 instances can
  share it depends on their hosts, which the planner checks.
- Environment values must be JSON strings (`"5432"`, not `5432`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gearproxy import _validate as v
from gearproxy.errors import DescriptorError

RestartPolicy = Literal["no", "on-failure", "always"]
RESTART_POLICIES: tuple[RestartPolicy, ...] = ("no", "on-failure", "always")

MAX_DESCRIPTOR_BYTES = 1 << 20
MAX_COUNT = 1000
NAME_PATTERN = r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}"
INSTANCE_ID_PATTERN = r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,199}"
MIN_HEALTHCHECK_SECONDS = 0.001  # Docker takes 0 (its default) or at least 1 ms
MAX_HEALTHCHECK_SECONDS = 86400.0
MAX_RETRIES = 1000


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


# --- reading -----------------------------------------------------------------------------------

TOP_KEYS = ("Containers", "IdPrefix", "Instances")
CONTAINER_KEYS = (
    "Name", "Image", "Count", "PublicPorts", "Links",
    "Environment", "Command", "Restart", "Healthcheck",
)  # fmt: skip
PORT_KEYS = ("Internal", "External")
LINK_KEYS = ("To", "Ports", "AliasPorts", "MatchPort")
HEALTHCHECK_KEYS = ("Test", "Interval", "Timeout", "Retries")
INSTANCE_KEYS = ("Id", "Image", "From", "On", "Ports")
INSTANCE_PORT_KEYS = ("Internal", "External", "Target")
TARGET_KEYS = ("Host", "Port")

NAME_RULE = "use 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit"
ID_RULE = "use 1 to 200 letters, digits, '_', '.' or '-', starting with a letter or digit"
_NAME = re.compile(NAME_PATTERN)
_INSTANCE_ID = re.compile(INSTANCE_ID_PATTERN)
_STATE_FILE_SUFFIX = re.compile(r"\.json\.\d{8}-\d{6}", re.IGNORECASE)


def load(path: str | Path) -> Deployment:
    """Read and validate the descriptor (or saved state file) at `path`.

    Every failure, from a missing file to a bad port, is a `DescriptorError`
    whose one-line message says which file or field and why.
    """
    file = Path(path)
    try:
        with file.open("rb") as stream:
            data = stream.read(MAX_DESCRIPTOR_BYTES + 1)
    except FileNotFoundError:
        raise DescriptorError("", f"{file}: cannot read it: no such file") from None
    except IsADirectoryError:
        raise DescriptorError("", f"{file}: cannot read it: it is a directory") from None
    except PermissionError:
        raise DescriptorError("", f"{file}: cannot read it: permission denied") from None
    except OSError as exc:
        raise DescriptorError("", f"{file}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise DescriptorError("", f"{file}: larger than 1 MiB; a descriptor is a small JSON file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DescriptorError(
            "", f"{file}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    return parse(text, source=str(file))


def parse(text: str, *, source: str = "<descriptor>") -> Deployment:
    """Decode the JSON `text` and validate it (`source` names it in messages)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DESCRIPTOR_BYTES:
        raise DescriptorError("", f"{source}: larger than 1 MiB; a descriptor is a small JSON file")
    if not text.strip():
        raise DescriptorError("", f"{source}: empty; expected a JSON object with a Containers list")
    try:
        data = json.loads(text, object_pairs_hook=v.JSONObject, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise DescriptorError(
            "", f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise DescriptorError("", f"{source}: not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise DescriptorError("", f"{source}: not valid JSON: {exc}") from None
    return from_json(data)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def from_json(data: object) -> Deployment:
    """Validate an already decoded descriptor (for callers that got JSON elsewhere)."""
    if not isinstance(data, dict):
        v.fail("", f"a descriptor is a JSON object with a Containers list, not {v.type_name(data)}")
    top = v.fields(data, "", TOP_KEYS, {"RandomizeIds": False})
    raw = v.array(
        v.required(top, "containers", "", "a list of containers"),
        "containers",
        nonempty="container",
    )
    id_prefix = v.string(v.optional(top, "idprefix", ""), "idprefix")
    if id_prefix and not _NAME.fullmatch(id_prefix):
        v.fail("idprefix", f"{id_prefix!r} is not a valid id prefix: {NAME_RULE}")
    containers = tuple(_container(item, f"containers[{i}]") for i, item in enumerate(raw))
    _check_names(containers)
    _check_host_ports(containers)
    for i in range(len(containers)):
        _check_links(containers, i)
    instances = _instances(v.optional(top, "instances", []))
    return Deployment(containers, id_prefix, instances)


def _name(value: object, path: str) -> str:
    name = v.string(value, path)
    if not _NAME.fullmatch(name):
        v.fail(path, f"{name!r} is not a valid name: {NAME_RULE}")
    return name


def _container(value: object, path: str) -> Container:
    f = v.fields(value, path, CONTAINER_KEYS, {"Notify": False, "Affinity": ""})
    name = _name(v.required(f, "name", path, "the container's name"), v.join(path, "name"))
    image_path = v.join(path, "image")
    image = v.string(v.required(f, "image", path, "the Docker image to run"), image_path)
    if not image:
        v.fail(image_path, "must not be empty")
    if any(ch.isspace() or not ch.isprintable() for ch in image):
        v.fail(image_path, f"{image!r} must not contain whitespace or control characters")
    extras: dict[str, Any] = {}
    if (env := v.optional(f, "environment", None)) is not None:
        extras["environment"] = v.environment(env, v.join(path, "environment"))
    if (command := v.optional(f, "command", None)) is not None:
        extras["command"] = v.command(command, v.join(path, "command"))
    if (restart := v.optional(f, "restart", None)) is not None:
        extras["restart"] = _restart(restart, v.join(path, "restart"))
    if (check := v.optional(f, "healthcheck", None)) is not None:
        extras["healthcheck"] = _healthcheck(check, v.join(path, "healthcheck"))
    links = v.array(v.optional(f, "links", []), v.join(path, "links"))
    return Container(
        name=name,
        image=image,
        count=v.integer(v.optional(f, "count", 1), v.join(path, "count"), 0, MAX_COUNT),
        public_ports=_port_pairs(
            v.optional(f, "publicports", []), v.join(path, "publicports"), "allocate a host port"
        ),
        links=tuple(_link(item, f"{path}.links[{j}]") for j, item in enumerate(links)),
        **extras,
    )


def _port_pairs(value: object, path: str, zero: str) -> tuple[PortPair, ...]:
    """`[{Internal, External}]`, each Internal once; `zero` says what External 0 means."""
    pairs: list[PortPair] = []
    for j, item in enumerate(v.array(value, path)):
        here = f"{path}[{j}]"
        f = v.fields(item, here, PORT_KEYS)
        internal_path = v.join(here, "internal")
        internal = v.port(v.required(f, "internal", here, "a port number"), internal_path)
        external = v.port(v.optional(f, "external", 0), v.join(here, "external"), zero=zero)
        for k, earlier in enumerate(pairs):
            if earlier.internal == internal:
                v.fail(internal_path, f"port {internal} is listed twice (also at {path}[{k}])")
        pairs.append(PortPair(internal, external))
    return tuple(pairs)


def _link(value: object, path: str) -> Link:
    f = v.fields(value, path, LINK_KEYS, {"NonLocal": False})
    to = v.string(
        v.required(f, "to", path, "the name of the container to link to"), v.join(path, "to")
    )
    ports: list[int] = []
    for k, item in enumerate(v.array(v.optional(f, "ports", []), v.join(path, "ports"))):
        number = v.port(item, f"{path}.ports[{k}]")
        if number in ports:
            v.fail(f"{path}.ports[{k}]", f"port {number} is listed twice")
        ports.append(number)
    return Link(
        to=to,
        ports=tuple(ports),
        alias_ports=_port_pairs(
            v.optional(f, "aliasports", []), v.join(path, "aliasports"), "keep the target's port"
        ),
        match_port=v.boolean(v.optional(f, "matchport", False), v.join(path, "matchport")),
    )


def _restart(value: object, path: str) -> RestartPolicy:
    text = v.string(value, path)
    for policy in RESTART_POLICIES:
        if text == policy:
            return policy
    v.fail(path, f"must be one of {', '.join(RESTART_POLICIES)}, not {text!r}")


def _healthcheck(value: object, path: str) -> Healthcheck:
    f = v.fields(value, path, HEALTHCHECK_KEYS)
    test_path = v.join(path, "test")
    test = v.health_test(v.required(f, "test", path, "the command that checks health"), test_path)
    timing: dict[str, Any] = {}
    for key in ("interval", "timeout"):
        if (seconds := v.optional(f, key, None)) is not None:
            timing[key] = v.seconds(
                seconds, v.join(path, key), MIN_HEALTHCHECK_SECONDS, MAX_HEALTHCHECK_SECONDS
            )
    if (retries := v.optional(f, "retries", None)) is not None:
        timing["retries"] = v.integer(retries, v.join(path, "retries"), 1, MAX_RETRIES)
    return Healthcheck(test=test, **timing)


def _instances(value: object) -> tuple[InstanceRecord, ...]:
    """A state file's `Instances`; ids unique, host ports held once per host."""
    records: list[InstanceRecord] = []
    ids: dict[str, int] = {}
    held: dict[tuple[str, int], str] = {}
    for k, item in enumerate(v.array(value, "instances")):
        here = f"instances[{k}]"
        f = v.fields(item, here, INSTANCE_KEYS, {"Notify": False})
        iid = v.string(v.required(f, "id", here, "the instance id"), here + ".id")
        if not _INSTANCE_ID.fullmatch(iid):
            v.fail(here + ".id", f"{iid!r} is not a valid instance id: {ID_RULE}")
        if iid.lower() in ids:
            v.fail(
                here + ".id", f"duplicate instance id {iid!r} (see instances[{ids[iid.lower()]}])"
            )
        ids[iid.lower()] = k
        image = v.string(v.required(f, "image", here, "the image it runs"), here + ".image")
        if not image:
            v.fail(here + ".image", "must not be empty")
        source = _name(v.required(f, "from", here, "its container's name"), here + ".from")
        on = v.string(v.optional(f, "on", "local"), here + ".on")
        if not on:
            v.fail(here + ".on", "must not be empty (the host the instance runs on)")
        ports = _instance_ports(v.optional(f, "ports", []), here + ".ports")
        for j, p in enumerate(ports):
            if p.external and (on, p.external) in held:
                v.fail(
                    f"{here}.ports[{j}].external",
                    f"host port {p.external} on {on!r} is already held by {held[on, p.external]}",
                )
            if p.external:
                held[on, p.external] = f"{here}.ports[{j}] ({iid!r})"
        records.append(InstanceRecord(iid, image, source, on, ports))
    return tuple(records)


def _instance_ports(value: object, path: str) -> tuple[InstancePort, ...]:
    ports: list[InstancePort] = []
    for j, item in enumerate(v.array(value, path)):
        here = f"{path}[{j}]"
        f = v.fields(item, here, INSTANCE_PORT_KEYS)
        internal = v.port(v.required(f, "internal", here, "a port number"), here + ".internal")
        if any(p.internal == internal for p in ports):
            v.fail(here + ".internal", f"port {internal} is listed twice")
        external = v.port(v.optional(f, "external", 0), here + ".external", zero="not assigned")
        target = v.fields(v.optional(f, "target", {}), here + ".target", TARGET_KEYS)
        host = v.string(v.optional(target, "host", ""), here + ".target.host")
        number = v.port(v.optional(target, "port", 0), here + ".target.port", zero="none")
        ports.append(InstancePort(internal, external, host, number))
    return tuple(ports)


# --- cross-references --------------------------------------------------------------------------


def _check_names(containers: tuple[Container, ...]) -> None:
    """Names are unique ignoring case: instance ids that differ only in case confuse people
    and case-insensitive tools alike."""
    first: dict[str, int] = {}
    for i, c in enumerate(containers):
        j = first.setdefault(c.name.lower(), i)
        if j != i:
            other = containers[j].name
            note = "" if other == c.name else " (names are compared ignoring case)"
            v.fail(
                f"containers[{i}].name",
                f"duplicate container name {c.name!r}: containers[{j}] is already {other!r}{note}",
            )


def _check_host_ports(containers: tuple[Container, ...]) -> None:
    """An explicit External is claimed by one public port of one container.

    An explicit External with `Count` > 1 is left to the planner: it knows the
    hosts, and instances on different hosts may share a port number."""
    owner: dict[int, str] = {}
    for i, c in enumerate(containers):
        for j, pair in enumerate(c.public_ports):
            if not pair.external:
                continue
            here = f"containers[{i}].publicports[{j}]"
            if pair.external in owner:
                v.fail(
                    here + ".external",
                    f"host port {pair.external} is already used by {owner[pair.external]}",
                )
            owner[pair.external] = here


def link_ports(link: Link, target: Container) -> tuple[PortPair, ...]:
    """The ports a link carries: `internal` on the target, seen as `external` in the source.

    As geard: the aliased ports, then `Ports` not aliased; when both are empty,
    every public port of the target.  An alias External of 0 keeps the port.
    """
    return tuple(pair for pair, _ in _linked(link, target))


def _linked(link: Link, target: Container) -> list[tuple[PortPair, str]]:
    """`link_ports`, each with the path suffix of the member that asked for it."""
    out = [
        (
            PortPair(pair.internal, pair.external or pair.internal),
            f"aliasports[{k}].{'external' if pair.external else 'internal'}",
        )
        for k, pair in enumerate(link.alias_ports)
    ]
    aliased = {pair.internal for pair in link.alias_ports}
    out += [(PortPair(n, n), f"ports[{k}]") for k, n in enumerate(link.ports) if n not in aliased]
    if not out:
        out = [(PortPair(p.internal, p.internal), "to") for p in target.public_ports]
    return out


def _check_links(containers: tuple[Container, ...], i: int) -> None:
    """Every link of `containers[i]` names another container and ports it publishes, and
    no two of its ports land on the same local port inside the source."""
    source = containers[i]
    by_name = {c.name: c for c in containers}
    base = f"containers[{i}]"
    taken = {
        pair.internal: f"its own public port ({base}.publicports[{j}])"
        for j, pair in enumerate(source.public_ports)
    }
    for j, link in enumerate(source.links):
        here = f"{base}.links[{j}]"
        target = by_name.get(link.to)
        if target is None:
            close = [c.name for c in containers if c.name.lower() == link.to.lower()]
            hint = (
                f"did you mean {close[0]!r}? names are case-sensitive here"
                if close
                else "containers: " + ", ".join(c.name for c in containers)
            )
            v.fail(here + ".to", f"no container named {link.to!r} in this descriptor ({hint})")
        if target is source:
            v.fail(
                here + ".to",
                f"{source.name!r} cannot link to itself (the link's listener would take "
                "the container's own port)",
            )
        published = [pair.internal for pair in target.public_ports]
        if not published:
            v.fail(
                here + ".to", f"{link.to!r} has no public ports to link to (give it PublicPorts)"
            )
        listed = ", ".join(map(str, published))
        asked = [(f"ports[{k}]", n) for k, n in enumerate(link.ports)]
        asked += [(f"aliasports[{k}].internal", p.internal) for k, p in enumerate(link.alias_ports)]
        for where, number in asked:
            if number not in published:
                v.fail(
                    f"{here}.{where}",
                    f"{link.to!r} does not publish port {number} (it publishes {listed})",
                )
        for pair, where in _linked(link, target):
            if pair.external in taken:
                v.fail(
                    f"{here}.{where}",
                    f"local port {pair.external} inside {source.name!r} is already taken by "
                    f"{taken[pair.external]}",
                )
            taken[pair.external] = f"{here} (to {link.to!r})"


# --- writing and naming ------------------------------------------------------------------------


def to_json(deployment: Deployment) -> dict[str, Any]:
    """The deployment in geard's key spelling, ready for `json.dumps` (state files)."""
    out: dict[str, Any] = {
        "Containers": [_container_json(c) for c in deployment.containers],
        "IdPrefix": deployment.id_prefix,
    }
    if deployment.instances:
        out["Instances"] = [
            {
                "Id": r.id,
                "Image": r.image,
                "From": r.from_,
                "On": r.on,
                "Ports": [
                    {
                        "Internal": p.internal,
                        "External": p.external,
                        "Target": {"Host": p.target_host, "Port": p.target_port},
                    }
                    for p in r.ports
                ],
            }
            for r in deployment.instances
        ]
    return out


def _pairs_json(pairs: tuple[PortPair, ...]) -> list[dict[str, int]]:
    return [{"Internal": p.internal, "External": p.external} for p in pairs]


def _container_json(c: Container) -> dict[str, Any]:
    out: dict[str, Any] = {"Name": c.name, "Image": c.image, "Count": c.count}
    if c.public_ports:
        out["PublicPorts"] = _pairs_json(c.public_ports)
    if c.links:
        out["Links"] = [_link_json(link) for link in c.links]
    if c.environment:
        out["Environment"] = [{"Name": n, "Value": text} for n, text in c.environment]
    if c.command is not None:
        out["Command"] = list(c.command)
    if c.restart != "always":
        out["Restart"] = c.restart
    if c.healthcheck is not None:
        h = c.healthcheck
        out["Healthcheck"] = {
            "Test": list(h.test),
            "Interval": h.interval,
            "Timeout": h.timeout,
            "Retries": h.retries,
        }
    return out


def _link_json(link: Link) -> dict[str, Any]:
    out: dict[str, Any] = {"To": link.to}
    if link.ports:
        out["Ports"] = list(link.ports)
    if link.alias_ports:
        out["AliasPorts"] = _pairs_json(link.alias_ports)
    if link.match_port:
        out["MatchPort"] = True
    return out


def deployment_name(path: str | Path) -> str:
    """The deployment's default name: the file name without `.json` and without the
    timestamp geard adds to saved state files (`app.json.20140422-072112` -> `app`)."""
    base = Path(path).name
    name = _STATE_FILE_SUFFIX.sub("", base) if _STATE_FILE_SUFFIX.search(base) else base
    if name.lower().endswith(".json"):
        name = name[: -len(".json")]
    if not _NAME.fullmatch(name):
        raise DescriptorError(
            "",
            f"cannot make a deployment name from the file name {base!r} ({NAME_RULE}); "
            "give one with --name NAME",
        )
    return name
