"""The engine adapter against the real (rootful, private) test engine.

Each test works in a deployment of its own (`gpe-<random>`); everything labelled with it is
removed when the test ends, pass or fail, by the shared `docker_scratch` fixture.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import docker
import docker.errors
import pytest

from gearproxy.engine import (
    LABEL_CONTAINER,
    LABEL_DEPLOYMENT,
    LABEL_HASH,
    LABEL_INSTANCE,
    ContainerInfo,
    Engine,
    EngineEvent,
    netns_path,
    network_name,
)
from gearproxy.errors import EngineError
from gearproxy.plan import InstancePlan
from gearproxy.spec import Healthcheck

if TYPE_CHECKING:
    from conftest import DockerScratch

pytestmark = pytest.mark.docker

SLEEPER = ("sh", "-c", "echo FOO=$FOO; exec sleep 300")


def _plan(instance: str = "web-1", *, image: str, config_hash: str = "h1",
          command: tuple[str, ...] | None = SLEEPER,
          environment: tuple[tuple[str, str], ...] = (("FOO", "bar-42"),),
          healthcheck: Healthcheck | None = None) -> InstancePlan:
    return InstancePlan(id=instance, container=instance.rsplit("-", 1)[0], index=1,
                        host="local", image=image, ports=(), environment=environment,
                        command=command, restart="always", healthcheck=healthcheck,
                        config_hash=config_hash, links=())


@pytest.fixture
def engine(docker_client: docker.DockerClient) -> Iterator[Engine]:
    """An adapter connected through DOCKER_HOST (the shared client proves the engine answers)."""
    with Engine.connect() as eng:
        yield eng


@pytest.fixture
def deployment(docker_scratch: DockerScratch) -> str:
    """A fresh deployment name whose containers and network are removed after the test."""
    name = f"gpe-{uuid.uuid4().hex[:10]}"
    docker_scratch.remove_later(f"{LABEL_DEPLOYMENT}={name}")
    return name


def _running(engine: Engine, deployment: str, busybox_image: str,
             instance: str = "web-1") -> ContainerInfo:
    created = engine.create_container(deployment, _plan(instance, image=busybox_image))
    engine.start(created.id)
    return engine.wait_running(created.id, 20)


def test_connect_uses_docker_host_and_sees_a_rootful_engine(engine: Engine) -> None:
    """connect() picks DOCKER_HOST; the private test engine is rootful, with no pid file."""
    info = engine.info()
    assert info.host == os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    assert info.version
    assert info.rootless is False
    assert info.pid_file is None


def test_connect_follows_the_cli_current_context(docker_client: docker.DockerClient,
                                                 tmp_path: Path) -> None:
    """Without DOCKER_HOST, the Docker CLI's current context (config.json + meta.json) is used."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    meta = tmp_path / "contexts" / "meta" / hashlib.sha256(b"gp-test").hexdigest()
    meta.mkdir(parents=True)
    (meta / "meta.json").write_text(json.dumps(
        {"Name": "gp-test", "Endpoints": {"docker": {"Host": host}}}))
    (tmp_path / "config.json").write_text(json.dumps({"currentContext": "gp-test"}))
    with Engine.connect(environ={"DOCKER_CONFIG": str(tmp_path)}) as eng:
        assert eng.info().host == host


@pytest.mark.parametrize("host", ["unix:///nonexistent.sock", "tcp://127.0.0.1:1"])
def test_engine_that_does_not_answer_gives_one_line(host: str) -> None:
    """A wrong DOCKER_HOST fails at connect with one line naming the host and what to check."""
    started = time.monotonic()
    with pytest.raises(EngineError) as caught:
        Engine.connect(timeout=3, environ={"DOCKER_HOST": host})
    message = str(caught.value)
    assert "\n" not in message
    assert host in message and "does not answer" in message and "DOCKER_HOST" in message
    assert time.monotonic() - started < 5


def test_missing_image_that_cannot_be_pulled_fails_fast_naming_it(
        engine: Engine, busybox_image: str) -> None:
    """ensure_images checks every image and names the one that cannot be had, quickly."""
    missing = f"gearproxy-test/no-such-image:{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    with pytest.raises(EngineError) as caught:
        engine.ensure_images([busybox_image, missing, busybox_image], pull_timeout=10)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert missing in message and busybox_image not in message
    assert "\n" not in message
    assert elapsed < 15, f"a failing pull took {elapsed:.1f}s"


def test_present_image_is_not_pulled(engine: Engine, busybox_image: str) -> None:
    """An image the engine has is accepted without any registry (none is reachable here)."""
    engine.ensure_images([busybox_image])
    assert engine.has_image(busybox_image)


def test_network_is_labelled_idempotent_and_removed_twice(
        engine: Engine, deployment: str, docker_client: docker.DockerClient) -> None:
    """ensure_network makes one labelled bridge, returns it again; removing twice is fine."""
    first = engine.ensure_network(deployment)
    assert engine.ensure_network(deployment) == first
    net = docker_client.networks.get(first)
    assert net.name == network_name(deployment) == f"gearproxy-{deployment}"
    assert net.attrs["Driver"] == "bridge"
    assert net.attrs["Labels"][LABEL_DEPLOYMENT] == deployment
    engine.remove_network(deployment)
    engine.remove_network(deployment)
    assert docker_client.networks.list(names=[network_name(deployment)]) == []


def test_container_runs_with_env_command_labels_address_and_no_published_ports(
        engine: Engine, deployment: str, busybox_image: str,
        docker_client: docker.DockerClient) -> None:
    """A created and started container carries the plan: name, labels, env, command,
    hostname, aliases, an address on the deployment network, a pid; no port publishing and
    no Docker restart policy."""
    created = engine.create_container(deployment, _plan(image=busybox_image))
    assert created.status == "created" and created.pid == 0 and created.address is None
    assert engine.start(created.id).id == created.id
    info = engine.wait_running(created.id, 20)
    assert info.name == f"{deployment}-web-1"
    assert (info.deployment, info.container, info.instance, info.config_hash) == (
        deployment, "web", "web-1", "h1")
    assert info.pid > 0 and info.address
    assert netns_path(info) == f"/proc/{info.pid}/ns/net"

    attrs = docker_client.api.inspect_container(info.id)
    assert attrs["Config"]["Labels"] == {**attrs["Config"]["Labels"], LABEL_DEPLOYMENT: deployment,
                                         LABEL_CONTAINER: "web", LABEL_INSTANCE: "web-1",
                                         LABEL_HASH: "h1"}
    assert "FOO=bar-42" in attrs["Config"]["Env"]
    assert attrs["Config"]["Hostname"] == "web-1"
    assert not attrs["HostConfig"]["PortBindings"]
    assert not attrs["HostConfig"]["PublishAllPorts"]
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] in ("no", "")
    endpoint = attrs["NetworkSettings"]["Networks"][network_name(deployment)]
    assert {"web-1", info.name} <= set(endpoint["Aliases"])
    assert endpoint["IPAddress"] == info.address

    with engine.logs(info.id, follow=True) as stream:
        seen = b""
        for chunk in stream:
            seen += chunk
            if b"\n" in seen:
                break
    assert seen.startswith(b"FOO=bar-42")
    assert b"FOO=bar-42" in b"".join(engine.logs(info.id, tail=10))


def test_healthcheck_reaches_docker_in_nanoseconds(
        engine: Engine, deployment: str, busybox_image: str,
        docker_client: docker.DockerClient) -> None:
    """The plan's healthcheck (seconds) becomes Docker's Healthcheck (nanoseconds)."""
    check = Healthcheck(test=("true",), interval=0.5, timeout=2.0, retries=2)
    created = engine.create_container(deployment,
                                      _plan(image=busybox_image, healthcheck=check))
    health = docker_client.api.inspect_container(created.id)["Config"]["Healthcheck"]
    assert health == {"Test": ["CMD-SHELL", "true"], "Interval": 500_000_000,
                      "Timeout": 2_000_000_000, "Retries": 2}
    engine.start(created.id)
    assert engine.wait_running(created.id, 20, healthy=True).health == "healthy"


def test_create_is_idempotent_and_another_hash_needs_replace(
        engine: Engine, deployment: str, busybox_image: str) -> None:
    """Creating the same plan twice returns the same container; a changed config hash is
    refused unless replace=True, which recreates it."""
    first = engine.create_container(deployment, _plan(image=busybox_image))
    assert engine.create_container(deployment, _plan(image=busybox_image)).id == first.id
    changed = _plan(image=busybox_image, config_hash="h2")
    with pytest.raises(EngineError, match="another configuration"):
        engine.create_container(deployment, changed)
    replaced = engine.create_container(deployment, changed, replace=True)
    assert replaced.id != first.id and replaced.config_hash == "h2"
    assert engine.inspect(first.id) is None


def test_container_left_on_a_recreated_network_is_recreated(
        engine: Engine, deployment: str, busybox_image: str) -> None:
    """A container that ran, stopped, and lost its network (removed and re-made) is replaced
    on create: Docker could not start it again, it keeps the old network's id."""
    first = _running(engine, deployment, busybox_image)
    engine.kill(first.id)
    engine.remove_network(deployment)
    again = engine.create_container(deployment, _plan(image=busybox_image))
    assert again.id != first.id
    assert engine.start(again.id).status == "running"


def test_name_taken_by_a_foreign_container_is_refused(
        engine: Engine, deployment: str, busybox_image: str,
        docker_scratch: DockerScratch) -> None:
    """A container of the same name that gearproxy does not own is never replaced."""
    foreign = docker_scratch.client.containers.create(
        busybox_image, name=f"{deployment}-web-1", labels=docker_scratch.labels)
    with pytest.raises(EngineError, match="does not own"):
        engine.create_container(deployment, _plan(image=busybox_image), replace=True)
    foreign.reload()
    assert foreign.status == "created"


def test_remove_twice_is_fine_and_inspect_then_says_none(
        engine: Engine, deployment: str, busybox_image: str) -> None:
    """remove() of a running container, then of a missing one, both succeed."""
    info = _running(engine, deployment, busybox_image)
    engine.remove(info.id)
    engine.remove(info.id)
    assert engine.inspect(info.id) is None
    with pytest.raises(EngineError, match="does not exist"):
        engine.start(info.id)


def test_restart_gives_a_new_pid_and_stop_leaves_it_exited(
        engine: Engine, deployment: str, busybox_image: str) -> None:
    """restart() runs the container again with a new main process; stop() stops it."""
    info = _running(engine, deployment, busybox_image)
    again = engine.wait_running(engine.restart(info.id, timeout=0).id, 20)
    assert again.pid > 0 and again.pid != info.pid
    engine.stop(info.id, timeout=0)
    stopped = engine.inspect(info.id)
    assert stopped is not None and stopped.status == "exited" and stopped.pid == 0
    with pytest.raises(EngineError, match="not running"):
        netns_path(stopped)


def test_wait_running_reports_a_container_that_exits(
        engine: Engine, deployment: str, busybox_image: str) -> None:
    """wait_running fails with the exit code instead of waiting out its timeout."""
    created = engine.create_container(
        deployment, _plan(image=busybox_image, command=("sh", "-c", "exit 3")))
    engine.start(created.id)
    started = time.monotonic()
    with pytest.raises(EngineError, match="exited with code 3"):
        engine.wait_running(created.id, 30)
    assert time.monotonic() - started < 10


def test_events_report_die_with_labels_and_stop_ends_the_thread(
        engine: Engine, deployment: str, busybox_image: str) -> None:
    """A thread consuming events sees the kill and die of an owned container, with its
    instance label and exit code; setting `stop` ends the thread promptly."""
    info = _running(engine, deployment, busybox_image)
    seen: list[EngineEvent] = []
    died = threading.Event()
    stop = threading.Event()
    since = time.time() - 1
    stream = engine.events(since=since, stop=stop)

    def consume() -> None:
        for event in stream:
            seen.append(event)
            if event.action == "die" and event.container_id == info.id:
                died.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    engine.kill(info.id)
    assert died.wait(20), f"no die event; saw {seen}"
    die = next(e for e in seen if e.action == "die" and e.container_id == info.id)
    assert (die.deployment, die.instance, die.exit_code) == (deployment, "web-1", 137)
    assert die.time >= since
    assert any(e.action == "kill" and e.container_id == info.id for e in seen)
    stop.set()
    thread.join(3)
    assert not thread.is_alive()


def test_closing_an_idle_event_stream_from_another_thread_ends_it(engine: Engine) -> None:
    """close() from another thread ends an iteration blocked waiting for events."""
    stream = engine.events()
    ended = threading.Event()

    def consume() -> None:
        for _ in stream:
            pass
        ended.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    time.sleep(0.2)  # let it block in the read: it must end anyway once closed
    stream.close()
    assert ended.wait(3)
    thread.join(3)


def test_owned_containers_filter_by_deployment(
        engine: Engine, deployment: str, busybox_image: str,
        docker_scratch: DockerScratch) -> None:
    """owned_containers(name) lists only that deployment's containers, in any state;
    without a name it lists every owned container."""
    other = f"{deployment}-b"
    docker_scratch.remove_later(f"{LABEL_DEPLOYMENT}={other}")
    running = _running(engine, deployment, busybox_image, "web-1")
    created = engine.create_container(deployment, _plan("db-1", image=busybox_image))
    elsewhere = engine.create_container(other, _plan("web-1", image=busybox_image))
    mine = engine.owned_containers(deployment)
    assert [(c.instance, c.status) for c in mine] == [("db-1", "created"), ("web-1", "running")]
    assert {c.id for c in mine} == {running.id, created.id}
    assert [c.id for c in engine.owned_containers(other)] == [elsewhere.id]
    assert {running.id, created.id, elsewhere.id} <= {c.id for c in engine.owned_containers()}
