"""Smoke tests: the engine that scripts/test-engine (or .ci/run) started runs containers made
from the imported busybox image, and the flags it runs with (no iptables, no default bridge)
still give user-defined networks that containers (and, rootful, the host) can reach."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import docker
import docker.errors
import pytest

if TYPE_CHECKING:
    from conftest import DockerScratch
    from docker.models.containers import Container

pytestmark = pytest.mark.docker

PAGE = "gearproxy-smoke"


def _serve_page(scratch: DockerScratch, network: str | None = None) -> Container:
    """Start a busybox httpd on :8080 serving PAGE, and wait until it answers from inside."""
    server = scratch.run(
        [
            "sh",
            "-c",
            f"mkdir -p /www && echo {PAGE} >/www/index.html && exec httpd -f -p 8080 -h /www",
        ],
        name=scratch.name("httpd"),
        network=network,
    )
    scratch.exec_until(server, ["wget", "-qO-", "http://127.0.0.1:8080/index.html"])
    return server


def test_container_is_created_started_execed_and_removed(
    docker_scratch: DockerScratch, docker_client: docker.DockerClient, busybox_image: str
) -> None:
    """A container from the imported image is created, starts, answers exec and an HTTP
    request to a server inside it, and is gone after removal."""
    container = docker_client.containers.create(
        busybox_image,
        [
            "sh",
            "-c",
            f"mkdir -p /www && echo {PAGE} >/www/index.html && exec httpd -f -p 80 -h /www",
        ],
        name=docker_scratch.name("lifecycle"),
        labels=docker_scratch.labels,
    )
    assert container.status == "created"

    container.start()
    container.reload()
    assert container.status == "running"

    code, out = docker_scratch.exec(container, ["echo", "exec works"])
    assert (code, out.strip()) == (0, "exec works")

    body = docker_scratch.exec_until(container, ["wget", "-qO-", "http://127.0.0.1/index.html"])
    assert body.strip() == PAGE

    container.remove(force=True)
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container.id)


def test_containers_on_a_user_network_reach_each_other_by_name(
    docker_scratch: DockerScratch,
) -> None:
    """Without iptables or the default bridge, a user-defined network still connects a client
    container to a server by its name (deploys put each deployment on such a network)."""
    net = docker_scratch.network("smoke")
    server = _serve_page(docker_scratch, network=net.name)

    client = docker_scratch.run(network=net.name)
    url = f"http://{server.name}:8080/index.html"
    body = docker_scratch.exec_until(client, ["wget", "-qO-", url])
    assert body.strip() == PAGE


def test_host_reaches_a_container_address_on_a_rootful_engine(
    docker_scratch: DockerScratch, docker_client: docker.DockerClient
) -> None:
    """On a rootful engine the host reaches a container's address on a user-defined network
    (proxies on the host connect to targets this way).  A rootless engine keeps container
    addresses inside RootlessKit's namespace, so there the check does not apply."""
    if any("name=rootless" in opt for opt in docker_client.info().get("SecurityOptions") or []):
        pytest.skip("rootless engine: container addresses are not reachable from the host")
    net = docker_scratch.network("host")
    server = _serve_page(docker_scratch, network=net.name)

    server.reload()
    address = server.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
    with socket.create_connection((address, 8080), timeout=10) as conn:
        conn.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.")
    assert PAGE.encode() in reply


def test_scratch_cleanup_removes_labelled_containers_and_networks(
    docker_scratch: DockerScratch, docker_client: docker.DockerClient, busybox_image: str
) -> None:
    """docker_scratch's cleanup removes what a test made, found by its label, and what the
    test registered with remove_later."""
    net = docker_scratch.network("cleanup")
    ours = docker_scratch.run(network=net.name)
    foreign = docker_client.containers.create(
        busybox_image, labels={"io.gearproxy.test.foreign": docker_scratch.run_id}
    )
    docker_scratch.remove_later(f"io.gearproxy.test.foreign={docker_scratch.run_id}")

    assert docker_scratch.cleanup() == []

    for container_id in (ours.id, foreign.id):
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(container_id)
    with pytest.raises(docker.errors.NotFound):
        docker_client.networks.get(net.id)
