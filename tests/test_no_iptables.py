"""gearproxy never runs iptables or nft: a guard that fails the day anything in it does.

Fake `iptables`, `ip6tables`, `iptables-nft`, `iptables-legacy`, `iptables-restore`, `nft` (and
their siblings) come first on the PATH of the CLI, the daemon and therefore every proxy; each
appends its command line to a record file and exits 1.  A deploy, a killed target that is
restarted and relinked, and a delete run through the CLI; the record must stay empty.  The
scenario also proves the proxies did the work (the host port answers through a proxy listener
whose counters move, the link answers inside the consumer), so it cannot pass vacuously.

The scenario helpers here are shared with the rootless variant in test_rootless.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from gearproxy_harness import Gearproxy, echo_roundtrip, http_get, proxy_processes, wait_for

from gearproxy.orchestrator.api import ApiClient, socket_path

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FIREWALL_TOOLS = (
    "iptables", "ip6tables", "iptables-nft", "iptables-legacy", "iptables-restore",
    "ip6tables-restore", "iptables-save", "ip6tables-nft", "ip6tables-legacy", "nft",
    "xtables-nft-multi", "xtables-legacy-multi",
)
DB_COMMAND = ["nc", "-ll", "-p", "27017", "-e", "cat"]
WEB_COMMAND = ["sh", "-c", "mkdir -p /www && echo hello-from-web > /www/index.html && "
               "exec httpd -f -p 80 -h /www"]


@dataclass(frozen=True)
class FakeFirewall:
    """A directory of recording fakes and the record they append to."""

    bin_dir: Path
    record: Path

    def path_env(self) -> str:
        return f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"

    def calls(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []


def make_fake_firewall(directory: Path) -> FakeFirewall:
    """Write the fakes; check through PATH that they are found and record (then clear it)."""
    bin_dir = directory / "fake-firewall-bin"
    bin_dir.mkdir(parents=True)
    record = directory / "firewall-calls.log"
    for tool in FIREWALL_TOOLS:
        fake = bin_dir / tool
        fake.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{record}"\nexit 1\n')
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    fw = FakeFirewall(bin_dir, record)
    probe = subprocess.run(["iptables", "-L"], env={**os.environ, "PATH": fw.path_env()},
                           capture_output=True, check=False, timeout=10)
    assert probe.returncode == 1 and fw.calls() == ["iptables -L"], "the fakes do not record"
    record.write_text("")
    return fw


def descriptor(image: str, *, env: str = "one") -> dict[str, Any]:
    """web (public port 80) links to db (an echo server on 27017)."""
    return {"containers": [
        {"name": "web", "image": image, "publicports": [{"internal": 80}],
         "links": [{"to": "db"}], "command": WEB_COMMAND},
        {"name": "db", "image": image, "publicports": [{"internal": 27017}],
         "command": DB_COMMAND, "environment": {"GEN": env}},
    ]}


def write_descriptor(directory: Path, name: str, data: dict[str, Any]) -> Path:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def deploy(gp: Gearproxy, path: Path) -> tuple[dict[str, Any], str]:
    """`gearproxy deploy PATH --json` on loopback; returns the status and the progress text."""
    proc = gp.run("deploy", str(path), "--publish-address", "127.0.0.1", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def container(client: docker.DockerClient, deployment: str, instance: str) -> Any:
    return client.containers.get(f"{deployment}-{instance}")


def in_consumer(client: docker.DockerClient, deployment: str, payload: str = "ping") -> str:
    """What the echo server answers, asked from inside web-1 at 127.0.0.1:27017."""
    web = container(client, deployment, "web-1")
    result = web.exec_run(["sh", "-c", f"echo {payload} | nc -w 3 127.0.0.1 27017"])
    return str(result.output.decode(errors="replace").strip())


def host_port(status: dict[str, Any], instance: str, internal: int) -> int:
    for inst in status["instances"]:
        if inst["id"] == instance:
            return int(next(p["external"] for p in inst["ports"] if p["internal"] == internal))
    raise KeyError(instance)


def host_listener(gp: Gearproxy, deployment: str, key: str, port: int) -> dict[str, Any]:
    """The stats of proxy `key`'s host listener on 127.0.0.1:`port` (it must exist)."""
    [dep] = gp.json("status", deployment)
    [proxy] = [p for p in dep["proxies"] if p["key"] == key]
    assert proxy["stats"], f"proxy {key} answers no stats"
    [listener] = [lst for lst in proxy["stats"]["listeners"]
                  if lst["netns"] is None and lst["listen"] == f"127.0.0.1:{port}"]
    return dict(listener)


def assert_proxies_serve(gp: Gearproxy, client: docker.DockerClient, name: str,
                         status: dict[str, Any]) -> None:
    """The host ports answer through gearproxy's own listeners, and the link answers in web-1."""
    web_port = host_port(status, "web-1", 80)
    db_port = host_port(status, "db-1", 27017)
    before = host_listener(gp, name, f"{name}.web-1.80", web_port)
    assert before["listening"]
    assert "hello-from-web" in http_get(web_port)
    assert echo_roundtrip(db_port, b"through the proxy\n") == b"through the proxy\n"
    after = host_listener(gp, name, f"{name}.web-1.80", web_port)
    assert after["connections_total"] > before["connections_total"], "not served by the proxy"
    assert wait_for("link answers inside web-1", lambda: in_consumer(client, name) == "ping")


def kill_target_and_wait_relink(client: docker.DockerClient, name: str) -> None:
    """`docker kill` db-1: it comes back (restart policy always) and web-1's link with it,
    web-1 untouched."""
    web_started = container(client, name, "web-1").attrs["State"]["StartedAt"]
    db = container(client, name, "db-1")
    old_pid = db.attrs["State"]["Pid"]
    db.kill()
    wait_for("db-1 restarted", lambda: container(client, name, "db-1")
             .attrs["State"]["Pid"] not in (0, old_pid), timeout=60)
    assert wait_for("link to the restarted db-1", lambda: in_consumer(client, name) == "ping")
    assert container(client, name, "web-1").attrs["State"]["StartedAt"] == web_started


def delete_and_assert_gone(gp: Gearproxy, client: docker.DockerClient, name: str,
                           status: dict[str, Any]) -> None:
    """`delete` leaves no container, network, proxy process, listener or deployment."""
    ports = [host_port(status, i, p) for i, p in (("web-1", 80), ("db-1", 27017))]
    gp.run("delete", name, check=True)
    assert not client.containers.list(
        all=True, filters={"label": f"io.gearproxy.deployment={name}"})
    assert not client.networks.list(names=[f"gearproxy-{name}"])
    assert wait_for("proxies gone", lambda: not proxy_processes(gp.state_dir), timeout=15)
    assert gp.json("list") == []
    for port in ports:
        with pytest.raises(OSError):
            http_get(port, timeout=2)


def deploy_relink_delete_without_firewall(gp: Gearproxy, fw: FakeFirewall,
                                          client: docker.DockerClient, image: str,
                                          directory: Path, name: str) -> None:
    """The guarded scenario: deploy, serve, kill and relink, delete; no firewall tool ran."""
    status, _ = deploy(gp, write_descriptor(directory, name, descriptor(image)))
    assert_proxies_serve(gp, client, name, status)
    kill_target_and_wait_relink(client, name)
    delete_and_assert_gone(gp, client, name, status)
    assert fw.calls() == [], f"gearproxy ran a firewall tool: {fw.calls()}"


@contextlib.contextmanager
def installation(directory: Path, client: docker.DockerClient, image: str,
                 env: dict[str, str]) -> Iterator[Gearproxy]:
    """A private gearproxy (state under `directory`) with its daemon started with `env`;
    every deployment, proxy and daemon it made is removed afterwards."""
    gp = Gearproxy(directory / "state", env=env)
    gp.start_daemon()
    try:
        yield gp
    finally:
        listed = gp.run("list", "--json")
        names = [d["name"] for d in json.loads(listed.stdout)] if listed.returncode == 0 else []
        for name in names:
            gp.run("delete", name)
        gp.stop_daemon()
        gp.kill_all_proxies()
        for path in directory.glob("*.json"):  # what the daemon could not delete
            for leftover in client.containers.list(all=True, filters={
                    "label": f"io.gearproxy.deployment={path.stem}"}):
                with contextlib.suppress(docker.errors.NotFound):
                    leftover.remove(force=True)
            for net in client.networks.list(names=[f"gearproxy-{path.stem}"]):
                with contextlib.suppress(docker.errors.NotFound):
                    net.remove()
        assert not ApiClient(socket_path(gp.state_dir)).ping()


def test_deploy_relink_delete_never_run_iptables_or_nft(
        tmp_path: Path, docker_client: docker.DockerClient, busybox_image: str) -> None:
    """With recording fakes first on the daemon's PATH, a deploy whose proxies serve the host
    port and the link, a killed-and-relinked target and a delete invoke no firewall tool."""
    fw = make_fake_firewall(tmp_path)
    with installation(tmp_path, docker_client, busybox_image, {"PATH": fw.path_env()}) as gp:
        deploy_relink_delete_without_firewall(gp, fw, docker_client, busybox_image, tmp_path,
                                              "noipt")
