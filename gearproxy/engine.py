"""The Docker engine adapter: the only module that talks to the docker SDK.

Theory of operation
-------------------
Every call here blocks (HTTP over the engine's socket), so the daemon runs them
off its event loop in threads.  Each method translates docker SDK, requests and
socket exceptions into one `EngineError` whose one-line message names the
object at fault and says what to do; nothing from the SDK escapes.

Objects gearproxy owns are found by label, never by name alone:

    network    gearproxy-<deployment>             label io.gearproxy.deployment
    container  <deployment>-<instance id>         labels io.gearproxy.{deployment,container,
                                                         instance,config-hash}

Containers are created with **no** published ports (the proxies publish them,
no NAT) and restart policy "no" (the daemon restarts them per the descriptor's
`Restart`, so it can re-link after each restart).  Creation is idempotent: a
container that already exists with the same labels and config hash is
returned as it is, so a deploy interrupted by a crash converges when re-run.

The event and log streams hold an HTTP response open; `close()` shuts its
socket down, which is safe from any thread and ends a blocked read at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.auth
import docker.errors
import docker.types
import docker.utils
import requests

from gearproxy.engine_stream import SDK_ERRORS, Stream, one_line, reason
from gearproxy.errors import EngineError
from gearproxy.log import get_logger
from gearproxy.plan import InstancePlan

LABEL_DEPLOYMENT = "io.gearproxy.deployment"
LABEL_CONTAINER = "io.gearproxy.container"
LABEL_INSTANCE = "io.gearproxy.instance"
LABEL_HASH = "io.gearproxy.config-hash"

DEFAULT_HOST = "unix:///var/run/docker.sock"
#: Container event actions the daemon acts on (`health_status: healthy` is reduced to
#: `health_status`, its status going to `EngineEvent.health`).
EVENT_ACTIONS = frozenset({"start", "die", "destroy", "health_status", "oom", "kill"})

_NS = 1_000_000_000
_log = get_logger("gearproxy.engine")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What gearproxy needs to know about the engine it talks to."""

    version: str
    rootless: bool
    host: str
    pid_file: str | None
    api_version: str = ""


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """One container gearproxy owns, as the engine sees it now."""

    id: str
    name: str
    deployment: str
    container: str
    instance: str
    config_hash: str
    status: str
    pid: int
    address: str | None
    health: str | None
    exit_code: int
    restarting: bool
    started_at: str


@dataclass(frozen=True, slots=True)
class EngineEvent:
    """A container event of an owned container; `time` in seconds since the epoch."""

    action: str
    container_id: str
    deployment: str
    instance: str
    exit_code: int | None
    time: float
    health: str | None = None


def network_name(deployment: str) -> str:
    """The deployment's user-defined bridge network."""
    return f"gearproxy-{deployment}"


def container_name(deployment: str, instance_id: str) -> str:
    """The Docker name of an instance's container."""
    return f"{deployment}-{instance_id}"


def netns_path(info: ContainerInfo) -> str:
    """The network namespace of a running container, for setns from a proxy."""
    if info.pid <= 0:
        raise EngineError(f"container {info.name} is not running, so it has no network "
                          "namespace: start it first")
    return f"/proc/{info.pid}/ns/net"


def _host_from_context(env: Mapping[str, str]) -> str | None:
    """The Docker CLI's current context endpoint, as `docker context use` set it."""
    config_dir = Path(env.get("DOCKER_CONFIG") or Path(env.get("HOME") or Path.home()) / ".docker")
    name = env.get("DOCKER_CONTEXT")
    if not name:
        try:
            config = json.loads((config_dir / "config.json").read_text())
        except (OSError, ValueError):
            return None
        name = config.get("currentContext") if isinstance(config, dict) else None
    if not isinstance(name, str) or not name or name == "default":
        return None
    digest = hashlib.sha256(name.encode()).hexdigest()
    meta_path = config_dir / "contexts" / "meta" / digest / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        host = meta["Endpoints"]["docker"]["Host"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"Docker context {name!r} cannot be read from {meta_path}: "
                          f"{reason(exc)} (run `docker context use default` or set "
                          "DOCKER_HOST)") from None
    return str(host) if host else None


def _client_kwargs(env: Mapping[str, str]) -> dict[str, Any]:
    """base_url (+ tls) from DOCKER_HOST, else the CLI context, else the default socket."""
    if env.get("DOCKER_HOST"):
        return dict(docker.utils.kwargs_from_env(environment=dict(env)))
    return {"base_url": _host_from_context(env) or DEFAULT_HOST}


def _parse_event(raw: Any) -> EngineEvent | None:
    if not isinstance(raw, dict) or raw.get("Type", "container") != "container":
        return None
    action = str(raw.get("Action") or raw.get("status") or "")
    health: str | None = None
    if ":" in action:
        action, _, rest = action.partition(":")
        health = rest.strip() or None
    if action not in EVENT_ACTIONS:
        return None
    actor = raw.get("Actor") or {}
    attrs: dict[str, str] = actor.get("Attributes") or {}
    code = attrs.get("exitCode")
    stamp = raw.get("timeNano")
    when = int(stamp) / _NS if stamp else float(raw.get("time") or 0)
    return EngineEvent(action=action, container_id=str(actor.get("ID") or raw.get("id") or ""),
                       deployment=attrs.get(LABEL_DEPLOYMENT, ""),
                       instance=attrs.get(LABEL_INSTANCE, ""),
                       exit_code=int(code) if code is not None and code.lstrip("-").isdigit()
                       else None,
                       time=when, health=health)


def _container_info(raw: Mapping[str, Any]) -> ContainerInfo:
    labels: Mapping[str, str] = (raw.get("Config") or {}).get("Labels") or {}
    state: Mapping[str, Any] = raw.get("State") or {}
    deployment = labels.get(LABEL_DEPLOYMENT, "")
    networks: Mapping[str, Any] = (raw.get("NetworkSettings") or {}).get("Networks") or {}
    endpoint = networks.get(network_name(deployment)) if deployment else None
    address = (endpoint or {}).get("IPAddress") or None
    health = (state.get("Health") or {}).get("Status") or None
    return ContainerInfo(
        id=str(raw.get("Id", "")), name=str(raw.get("Name", "")).lstrip("/"),
        deployment=deployment, container=labels.get(LABEL_CONTAINER, ""),
        instance=labels.get(LABEL_INSTANCE, ""), config_hash=labels.get(LABEL_HASH, ""),
        status=str(state.get("Status", "")), pid=int(state.get("Pid") or 0),
        address=address, health=health, exit_code=int(state.get("ExitCode") or 0),
        restarting=bool(state.get("Restarting")), started_at=str(state.get("StartedAt", "")))


def _healthcheck(inst: InstancePlan) -> Any:
    check = inst.healthcheck
    if check is None:
        return None
    test = list(check.test)
    if not test or test[0] not in ("CMD", "CMD-SHELL", "NONE"):
        test = ["CMD-SHELL", *test] if len(test) == 1 else ["CMD", *test]
    return docker.types.Healthcheck(test=test, interval=int(check.interval * _NS),
                                    timeout=int(check.timeout * _NS), retries=check.retries)


class Engine:
    """A connection to one Docker engine (blocking; thread-safe for concurrent calls)."""

    def __init__(self, api: Any, host: str, client_kwargs: Mapping[str, Any], *,
                 pull_timeout: float = 30.0) -> None:
        self._api = api
        self._host = host
        self._kwargs = dict(client_kwargs)
        self._pull_timeout = pull_timeout
        self._follow_api: Any = None
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, *, timeout: float = 10, pull_timeout: float = 30.0,
                environ: Mapping[str, str] | None = None) -> Engine:
        """Connect to the engine of DOCKER_HOST, else of the Docker CLI's current context,
        else of the default socket; fails at once if it does not answer."""
        env = os.environ if environ is None else environ
        kwargs = _client_kwargs(env)
        host = str(kwargs.get("base_url") or DEFAULT_HOST)
        try:
            if host.startswith("unix://"):
                # The SDK leaks the socket of a failed unix connect: probe with our own first.
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(timeout)
                    probe.connect(host.removeprefix("unix://"))
            api = docker.APIClient(timeout=timeout, **kwargs)
        except SDK_ERRORS as exc:
            raise EngineError(f"Docker engine at {host} does not answer: {reason(exc)} "
                              "(is dockerd running? is DOCKER_HOST right?)") from None
        return cls(api, host, kwargs, pull_timeout=pull_timeout)

    def close(self) -> None:
        """Close the HTTP sessions (open streams end)."""
        self._api.close()
        if self._follow_api is not None:
            self._follow_api.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, what: str, exc: BaseException, todo: str = "") -> EngineError:
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return EngineError(f"{what}: Docker engine at {self._host} does not answer: "
                               f"{reason(exc)} (is dockerd running?)")
        return EngineError(f"{what}: {reason(exc)}" + (f" ({todo})" if todo else ""))

    # -- engine ------------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        """Version, and whether the engine is rootless (security option `name=rootless`)."""
        try:
            version = self._api.version()
            info = self._api.info()
        except SDK_ERRORS as exc:
            raise self._fail("cannot read the engine's info", exc) from None
        options = [str(o) for o in info.get("SecurityOptions") or ()]
        rootless = any("name=rootless" in opt.split(",") for opt in options)
        return EngineInfo(version=str(version.get("Version", "")), rootless=rootless,
                          host=self._host, pid_file=self._pid_file() if rootless else None,
                          api_version=str(version.get("ApiVersion", "")))

    def _pid_file(self) -> str | None:
        """The rootless engine's docker.pid: beside its socket, else in $XDG_RUNTIME_DIR."""
        candidates: list[Path] = []
        if self._host.startswith("unix://"):
            candidates.append(Path(self._host.removeprefix("unix://")).parent / "docker.pid")
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime:
            candidates.append(Path(runtime) / "docker.pid")
        return next((str(p) for p in candidates if p.is_file()), None)

    # -- images ------------------------------------------------------------------------------

    def ensure_images(self, images: Iterable[str], *, pull_timeout: float | None = None) -> None:
        """Make every image present, pulling the missing ones; raise naming every image that
        cannot be had, so a deploy fails before it creates anything."""
        failures: list[str] = []
        for image in dict.fromkeys(images):
            if self.has_image(image):
                continue
            try:
                self._pull(image, self._pull_timeout if pull_timeout is None else pull_timeout)
            except EngineError as exc:
                failures.append(f"{image}: {exc}")
        if failures:
            names = "image" if len(failures) == 1 else "images"
            raise EngineError(f"{names} not found locally and cannot be pulled ("
                              + "; ".join(failures) + "): build or pull it, or fix the name")

    def has_image(self, image: str) -> bool:
        """Whether the engine has the image locally."""
        try:
            self._api.inspect_image(image)
        except docker.errors.NotFound:
            return False
        except SDK_ERRORS as exc:
            raise self._fail(f"cannot inspect image {image}", exc) from None
        return True

    def _pull(self, image: str, timeout: float) -> None:
        """Pull one image; `timeout` bounds both each silence and the whole pull."""
        repo, tag = docker.utils.parse_repository_tag(image)
        params = {"fromImage": image} if tag else {"fromImage": repo, "tag": "latest"}
        headers: dict[str, str] = {}
        try:
            registry, _ = docker.auth.resolve_repository_name(repo)
            auth = docker.auth.get_config_header(self._api, registry)
        except SDK_ERRORS:
            auth = None
        if auth:
            headers["X-Registry-Auth"] = auth
        deadline = time.monotonic() + timeout
        _log.info("image_pull", image=image)
        response: Any = None
        try:
            response = self._api.post(self._api._url("/images/create"), params=params,
                                      headers=headers, stream=True, timeout=timeout)
            if response.status_code >= 400:
                raise docker.errors.APIError("pull failed", response,
                                             explanation=_response_message(response))
            for line in response.iter_lines():
                if time.monotonic() > deadline:
                    raise EngineError(f"pull did not finish within {timeout:g}s")
                message = json.loads(line) if line else {}
                if isinstance(message, dict) and message.get("error"):
                    raise EngineError(one_line(str(message["error"])))
        except ValueError as exc:
            raise EngineError(f"unreadable pull progress: {exc}") from None
        except requests.exceptions.Timeout:
            raise EngineError(f"no registry answered within {timeout:g}s") from None
        except SDK_ERRORS as exc:
            raise EngineError(reason(exc)) from None
        finally:
            if response is not None:
                response.close()

    # -- networks ----------------------------------------------------------------------------

    def _networks(self, name: str) -> list[dict[str, Any]]:
        # The engine's name filter matches substrings: keep exact matches only.
        found = self._api.networks(names=[name])
        return [n for n in found if n.get("Name") == name]

    def ensure_network(self, deployment: str) -> str:
        """Create the deployment's labelled bridge network unless it exists; its id."""
        name = network_name(deployment)
        try:
            for net in self._networks(name):
                if (net.get("Labels") or {}).get(LABEL_DEPLOYMENT) != deployment:
                    raise EngineError(f"network {name} exists but gearproxy does not own it: "
                                      "remove it (docker network rm) or rename the deployment")
                return str(net["Id"])
            created = self._api.create_network(name, driver="bridge",
                                               labels={LABEL_DEPLOYMENT: deployment})
            _log.info("network_created", network=name)
            return str(created["Id"])
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # created concurrently: adopt it
                for net in self._networks(name):
                    return str(net["Id"])
            raise self._fail(f"cannot create network {name}", exc) from None
        except SDK_ERRORS as exc:
            raise self._fail(f"cannot create network {name}", exc) from None

    def remove_network(self, deployment: str) -> None:
        """Remove the deployment's network; a missing one is fine."""
        name = network_name(deployment)
        try:
            for net in self._networks(name):
                if (net.get("Labels") or {}).get(LABEL_DEPLOYMENT) != deployment:
                    continue
                with contextlib.suppress(docker.errors.NotFound):
                    self._api.remove_network(net["Id"])
        except docker.errors.APIError as exc:
            raise self._fail(f"cannot remove network {name}", exc,
                             "remove the containers still attached to it first") from None
        except SDK_ERRORS as exc:
            raise self._fail(f"cannot remove network {name}", exc) from None

    # -- containers --------------------------------------------------------------------------

    def _inspect_raw(self, ref: str) -> dict[str, Any] | None:
        try:
            return dict(self._api.inspect_container(ref))
        except docker.errors.NotFound:
            return None
        except SDK_ERRORS as exc:
            raise self._fail(f"cannot inspect container {ref}", exc) from None

    def inspect(self, container_id_or_name: str) -> ContainerInfo | None:
        """The container as it is now, or None when it does not exist."""
        raw = self._inspect_raw(container_id_or_name)
        return None if raw is None else _container_info(raw)

    def create_container(self, deployment: str, inst: InstancePlan, *,
                         replace: bool = False) -> ContainerInfo:
        """Create (not start) the instance's container on the deployment network.

        An existing container with the same labels and config hash is returned as it
        is; one with another hash is an error unless `replace` removes it first.
        """
        name = container_name(deployment, inst.id)
        network_id = self.ensure_network(deployment)
        for _attempt in range(2):
            existing = self._inspect_raw(name)
            if existing is not None:
                kept = self._adopt(existing, deployment, inst, network_id, replace=replace)
                if kept is not None:
                    return kept
            try:
                created = self._create(name, deployment, inst)
            except docker.errors.APIError as exc:
                if exc.status_code == 409 and _attempt == 0:
                    continue  # created concurrently (or being removed): look again
                if exc.status_code == 404:
                    raise EngineError(f"container {name}: image {inst.image} is not present: "
                                      "pull or build it first") from None
                raise self._fail(f"cannot create container {name}", exc) from None
            except SDK_ERRORS as exc:
                raise self._fail(f"cannot create container {name}", exc) from None
            _log.info("container_created", container=name, id=created[:12])
            info = self.inspect(created)
            if info is None:
                raise EngineError(f"container {name} vanished right after it was created: "
                                  "is another tool removing containers?")
            return info
        raise EngineError(f"container {name} keeps conflicting with a concurrent "
                          "create or remove: try again")

    def _adopt(self, raw: dict[str, Any], deployment: str, inst: InstancePlan,
               network_id: str, *, replace: bool) -> ContainerInfo | None:
        """The existing container if it can be kept; None once it has been removed."""
        info = _container_info(raw)
        if info.deployment != deployment or info.instance != inst.id:
            raise EngineError(f"container name {info.name} is taken by a container gearproxy "
                              "does not own: remove or rename it")
        networks = (raw.get("NetworkSettings") or {}).get("Networks") or {}
        endpoint = networks.get(network_name(deployment))
        # A never-started container names its network only ("" id) and finds it by name at
        # start; one that has run keeps the id, and cannot start once that network is gone.
        attached = endpoint is not None and endpoint.get("NetworkID") in ("", None, network_id)
        if info.config_hash == inst.config_hash and attached:
            return info
        if info.config_hash != inst.config_hash and not replace:
            raise EngineError(f"container {info.name} exists with another configuration "
                              f"(hash {info.config_hash}, wanted {inst.config_hash}): "
                              "remove it or redeploy to replace it")
        # Replaced, or ours but attached to a network that was recreated: start afresh.
        self.remove(info.id)
        return None

    def _create(self, name: str, deployment: str, inst: InstancePlan) -> str:
        api = self._api
        network = network_name(deployment)
        endpoint = api.create_endpoint_config(aliases=[inst.id, name])
        created = api.create_container(
            image=inst.image,
            command=list(inst.command) if inst.command is not None else None,
            name=name, hostname=inst.id, detach=True,
            environment=[f"{k}={v}" for k, v in inst.environment],
            labels={LABEL_DEPLOYMENT: deployment, LABEL_CONTAINER: inst.container,
                    LABEL_INSTANCE: inst.id, LABEL_HASH: inst.config_hash},
            healthcheck=_healthcheck(inst),
            host_config=api.create_host_config(restart_policy={"Name": "no"}),
            networking_config=api.create_networking_config({network: endpoint}),
        )
        return str(created["Id"])

    def _act(self, verb: str, ref: str, call: Callable[[], object]) -> None:
        try:
            call()
        except docker.errors.NotFound:
            raise EngineError(f"cannot {verb} container {ref}: it does not exist "
                              "(redeploy to recreate it)") from None
        except SDK_ERRORS as exc:
            raise self._fail(f"cannot {verb} container {ref}", exc) from None

    def _current(self, ref: str) -> ContainerInfo:
        info = self.inspect(ref)
        if info is None:
            raise EngineError(f"container {ref} vanished: redeploy to recreate it")
        return info

    def start(self, container_id: str) -> ContainerInfo:
        """Start the container (a running one is fine); its state afterwards."""
        self._act("start", container_id, lambda: self._api.start(container_id))
        return self._current(container_id)

    def stop(self, container_id: str, timeout: float = 10) -> None:
        """Stop it: SIGTERM, then SIGKILL after `timeout` seconds."""
        self._act("stop", container_id,
                  lambda: self._api.stop(container_id, timeout=math.ceil(timeout)))

    def restart(self, container_id: str, timeout: float = 10) -> ContainerInfo:
        """Restart it (stop with `timeout`, then start); its state afterwards."""
        self._act("restart", container_id,
                  lambda: self._api.restart(container_id, timeout=math.ceil(timeout)))
        return self._current(container_id)

    def kill(self, container_id: str, signal: str = "SIGKILL") -> None:
        """Send a signal to the container's main process."""
        self._act("kill", container_id, lambda: self._api.kill(container_id, signal=signal))

    def remove(self, container_id: str, *, force: bool = True) -> None:
        """Remove it (and its anonymous volumes); a missing container is fine."""
        try:
            self._api.remove_container(container_id, force=force, v=True)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if exc.status_code == 409 and "already in progress" in reason(exc):
                return
            raise self._fail(f"cannot remove container {container_id}", exc) from None
        except SDK_ERRORS as exc:
            raise self._fail(f"cannot remove container {container_id}", exc) from None

    def owned_containers(self, deployment: str | None = None) -> list[ContainerInfo]:
        """Every container gearproxy owns (of one deployment if given), in any state."""
        label = LABEL_DEPLOYMENT if deployment is None else f"{LABEL_DEPLOYMENT}={deployment}"
        try:
            listed = self._api.containers(all=True, filters={"label": label})
        except SDK_ERRORS as exc:
            raise self._fail("cannot list gearproxy's containers", exc) from None
        found = (self.inspect(str(c["Id"])) for c in listed)
        return sorted((i for i in found if i is not None), key=lambda i: i.name)

    def wait_running(self, container_id: str, timeout: float, *,
                     healthy: bool = False) -> ContainerInfo:
        """Wait until the container runs (and, with `healthy`, until a container with a
        healthcheck reports healthy); EngineError when it exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            info = self._current(container_id)
            if info.status == "running" and info.pid > 0 and (
                    not healthy or info.health in (None, "healthy")):
                return info
            if info.status in ("exited", "dead") and not info.restarting:
                raise EngineError(f"container {info.name} exited with code {info.exit_code}: "
                                  f"see `gearproxy logs {info.instance or info.name}`")
            if time.monotonic() >= deadline:
                state = info.status + (f", {info.health}" if info.health else "")
                raise EngineError(f"container {info.name} is not ready after {timeout:g}s "
                                  f"({state}): see `gearproxy logs {info.instance or info.name}`")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)

    # -- streams -----------------------------------------------------------------------------

    def events(self, *, since: float | None = None,
               stop: threading.Event | None = None) -> Stream[EngineEvent]:
        """Container events (start, die, destroy, health_status, oom, kill) of the containers
        gearproxy owns, as a blocking iterator for a thread; ends when `stop` is set or on
        `close()`, raises EngineError when the engine drops the stream."""
        filters = {"type": ["container"], "label": [LABEL_DEPLOYMENT]}
        try:
            raw = self._api.events(since=f"{since:.9f}" if since is not None else None,
                                   filters=filters, decode=True)
        except SDK_ERRORS as exc:
            raise self._fail("cannot watch the engine's events", exc) from None
        return Stream(raw, _parse_event, "event", stop)

    def logs(self, container_id: str, *, follow: bool = False,
             tail: int | str = "all") -> Stream[bytes]:
        """The container's stdout and stderr as chunks of bytes; with `follow`, it waits for
        more until the container stops or the stream is closed."""
        api = self._api
        if follow:
            with self._lock:
                if self._follow_api is None:  # no read timeout: a quiet container is fine
                    self._follow_api = docker.APIClient(
                        timeout=None, version=self._api.api_version, **self._kwargs)
                api = self._follow_api
        try:
            raw = api.logs(container_id, stdout=True, stderr=True, stream=True,
                           follow=follow, tail=tail)
        except docker.errors.NotFound:
            raise EngineError(f"no logs for container {container_id}: it does not exist") \
                from None
        except SDK_ERRORS as exc:
            raise self._fail(f"cannot read logs of container {container_id}", exc) from None
        return Stream(raw, lambda chunk: bytes(chunk) or None, "log", ends=True)


def _response_message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return str(response.text or response.reason)
    return str(body.get("message") if isinstance(body, dict) else body)
