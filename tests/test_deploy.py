"""`gearproxy deploy` end to end: a real engine, a real daemon, the CLI as a subprocess.

The seed scenario is a web container with a public port linking to a
database-like echo server; every check is made the way a user would see it:
from inside the consumer, on the host's port, and with `status`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from gearproxy_harness import (
    Gearproxy,
    digest,
    echo_roundtrip,
    http_get,
    proxy_processes,
    wait_for,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

DB_COMMAND = ["nc", "-ll", "-p", "27017", "-e", "cat"]
WEB_COMMAND = ["sh", "-c", "mkdir -p /www && echo hello-from-web > /www/index.html && "
               "exec httpd -f -p 80 -h /www"]


def descriptor(image: str, *, db_count: int = 1, env: str = "one",
               web_port: int = 0) -> dict[str, Any]:
    web_public: dict[str, int] = {"internal": 80}
    if web_port:
        web_public["external"] = web_port
    return {"containers": [
        {"name": "web", "image": image, "publicports": [web_public],
         "links": [{"to": "db"}], "command": WEB_COMMAND},
        {"name": "db", "image": image, "count": db_count,
         "publicports": [{"internal": 27017}], "command": DB_COMMAND,
         "environment": {"GEN": env}},
    ]}


def write(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def deploy(gp: Gearproxy, path: Path, *extra: str) -> tuple[dict[str, Any], str]:
    proc = gp.run("deploy", str(path), "--publish-address", "127.0.0.1", "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def container(client: docker.DockerClient, deployment: str, instance: str) -> Any:
    return client.containers.get(f"{deployment}-{instance}")


def in_consumer(client: docker.DockerClient, deployment: str, port: int = 27017,
                payload: str = "ping") -> str:
    """What the echo server answers, asked from inside web-1 at 127.0.0.1:`port`."""
    web = container(client, deployment, "web-1")
    result = web.exec_run(["sh", "-c", f"echo {payload} | nc -w 3 127.0.0.1 {port}"])
    return str(result.output.decode(errors="replace").strip())


def host_port(status: dict[str, Any], instance: str, internal: int) -> int:
    for inst in status["instances"]:
        if inst["id"] == instance:
            return next(p["external"] for p in inst["ports"] if p["internal"] == internal)
    raise KeyError(instance)


def test_seed_scenario_links_public_port_and_intact_bytes(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str) -> None:
    """The consumer reaches the target at 127.0.0.1:27017, the public port answers on the host,
    and a megabyte crosses the link both ways unchanged."""
    status, progress = deploy(gp, write(tmp_path, "seed", descriptor(busybox_image)))
    db_port = host_port(status, "db-1", 27017)
    web_port = host_port(status, "web-1", 80)
    assert 4000 <= db_port <= 59999 and 4000 <= web_port <= 59999
    assert f"local PortMapping: 27017 -> {db_port}" in progress
    assert f"linking web: 127.0.0.1:27017 -> localhost:{db_port}" in progress
    assert "local Container db-1 is installed" in progress
    assert "local Container web-1 starting" in progress
    assert wait_for("link answers inside web-1", lambda: in_consumer(docker_client, "seed")
                    == "ping")
    assert "hello-from-web" in http_get(web_port)
    payload = os.urandom(1 << 20)
    assert digest(echo_roundtrip(db_port, payload)) == digest(payload)
    # No Docker port publishing anywhere: the proxies are the only way in.
    for inst in ("web-1", "db-1"):
        attrs = container(docker_client, "seed", inst).attrs
        assert not attrs["HostConfig"].get("PortBindings")
    state_file = gp.state_dir / "deployments" / "seed.json"
    saved = json.loads(state_file.read_text())
    assert {i["Id"] for i in saved["Instances"]} == {"web-1", "db-1"}


def test_fan_out_and_target_restart_relink_without_touching_the_consumer(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str) -> None:
    """With three db instances web sees 27017..27019; a killed target comes back (restart
    policy always) and its link works again while web keeps running, never restarted."""
    deploy(gp, write(tmp_path, "fan", descriptor(busybox_image, db_count=3)))
    for port in (27017, 27018, 27019):
        assert wait_for(f"127.0.0.1:{port} in web-1",
                        lambda p=port: in_consumer(docker_client, "fan", p) == "ping")
    web = container(docker_client, "fan", "web-1")
    web_started = web.attrs["State"]["StartedAt"]
    db1 = container(docker_client, "fan", "db-1")
    old_pid = db1.attrs["State"]["Pid"]
    db1.kill()
    wait_for("db-1 restarted", lambda: container(docker_client, "fan", "db-1")
             .attrs["State"]["Pid"] not in (0, old_pid))
    assert wait_for("link to db-1 works again",
                    lambda: in_consumer(docker_client, "fan", 27017) == "ping")
    web.reload()
    assert web.attrs["State"]["StartedAt"] == web_started


def test_removed_target_is_restored_by_redeploy(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str) -> None:
    """`docker rm -f` of a target: the next deploy re-creates it on the same host port."""
    path = write(tmp_path, "gone", descriptor(busybox_image))
    status, _ = deploy(gp, path)
    container(docker_client, "gone", "db-1").remove(force=True)
    status2, _ = deploy(gp, path)
    assert host_port(status2, "db-1", 27017) == host_port(status, "db-1", 27017)
    assert wait_for("link works again", lambda: in_consumer(docker_client, "gone") == "ping")


def test_killed_proxy_is_back_within_a_second(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str) -> None:
    """SIGKILL of a proxy process: the daemon restarts it at once and counts the restart."""
    status, _ = deploy(gp, write(tmp_path, "kp", descriptor(busybox_image)))
    key = "kp.db-1.27017"
    pid = gp.proxy_pids()[key]
    os.kill(pid, signal.SIGKILL)
    new = wait_for("proxy restarted", lambda: (p := gp.proxy_pids().get(key)) and p != pid
                   and p, timeout=1.5, interval=0.05)
    assert new != pid
    [dep] = gp.json("status", "kp")
    [proxy] = [p for p in dep["proxies"] if p["key"] == key]
    assert proxy["restarts"] >= 1
    assert wait_for("link works", lambda: in_consumer(docker_client, "kp") == "ping")
    port = host_port(status, "db-1", 27017)
    assert echo_roundtrip(port, b"x" * 1000) == b"x" * 1000


def test_redeploy_unchanged_changed_env_and_scale(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str) -> None:
    """Same file: unchanged. Changed environment: only db is recreated, web keeps its link
    and every kept host port stays. Scale up adds db-2, scale down removes it."""
    path = write(tmp_path, "re", descriptor(busybox_image))
    status, _ = deploy(gp, path)
    web_id = container(docker_client, "re", "web-1").id
    db_id = container(docker_client, "re", "db-1").id
    _, progress = deploy(gp, path)
    assert "unchanged" in progress
    assert container(docker_client, "re", "db-1").id == db_id

    write(tmp_path, "re", descriptor(busybox_image, env="two"))
    status2, progress = deploy(gp, path)
    assert "local Container db-1 will be recreated" in progress
    assert container(docker_client, "re", "db-1").id != db_id
    assert container(docker_client, "re", "web-1").id == web_id
    assert host_port(status2, "db-1", 27017) == host_port(status, "db-1", 27017)
    assert host_port(status2, "web-1", 80) == host_port(status, "web-1", 80)
    assert wait_for("link follows the new db-1", lambda: in_consumer(docker_client, "re")
                    == "ping")

    write(tmp_path, "re", descriptor(busybox_image, env="two", db_count=2))
    status3, _ = deploy(gp, path)
    assert {i["id"] for i in status3["instances"]} == {"web-1", "db-1", "db-2"}
    assert wait_for("second db at 27018", lambda: in_consumer(docker_client, "re", 27018)
                    == "ping")
    write(tmp_path, "re", descriptor(busybox_image, env="two", db_count=1))
    status4, _ = deploy(gp, path)
    assert {i["id"] for i in status4["instances"]} == {"web-1", "db-1"}
    with pytest.raises(docker.errors.NotFound):
        container(docker_client, "re", "db-2")


def test_delete_leaves_nothing_behind(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str) -> None:
    """delete removes containers, network, proxy processes, port reservations and state;
    running it twice is fine."""
    status, _ = deploy(gp, write(tmp_path, "del", descriptor(busybox_image)))
    port = host_port(status, "db-1", 27017)
    assert gp.run("delete", "del").returncode == 0
    assert gp.run("delete", "del").returncode == 0
    assert not docker_client.containers.list(
        all=True, filters={"label": "io.gearproxy.deployment=del"})
    assert not docker_client.networks.list(names=["gearproxy-del"])
    assert not [p for p in proxy_processes(gp.state_dir)]
    with socket.socket() as probe:  # the host port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
    assert gp.json("list") == []


def test_daemon_killed_mid_deploy_converges_without_duplicates(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str) -> None:
    """SIGKILL the daemon while a deploy runs; a new daemon and a second deploy give the
    complete deployment with one container and one proxy per instance port, no orphans."""
    path = write(tmp_path, "mid", descriptor(busybox_image, db_count=3))
    deploying = subprocess.Popen(
        [sys.executable, "-m", "gearproxy", "deploy", str(path), "--publish-address",
         "127.0.0.1"], env=gp.environ(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("first container created", lambda: docker_client.containers.list(
        all=True, filters={"label": "io.gearproxy.deployment=mid"}), timeout=60, interval=0.02)
    gp.stop_daemon(signal.SIGKILL)
    deploying.wait(30)
    gp.start_daemon()
    status, _ = deploy(gp, path)
    owned = docker_client.containers.list(all=True,
                                          filters={"label": "io.gearproxy.deployment=mid"})
    assert sorted(c.name for c in owned) == [f"mid-{i}" for i in
                                             ("db-1", "db-2", "db-3", "web-1")]
    assert all(c.status == "running" for c in owned)
    assert sorted(gp.proxy_pids()) == sorted(
        f"mid.{i}" for i in ("db-1.27017", "db-2.27017", "db-3.27017", "web-1.80"))
    assert len(proxy_processes(gp.state_dir)) == 4
    assert wait_for("link works", lambda: in_consumer(docker_client, "mid") == "ping")
    assert {i["id"] for i in status["instances"]} == {"web-1", "db-1", "db-2", "db-3"}


def test_missing_image_fails_before_anything_is_created(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str) -> None:
    """An image that cannot be had: one line naming it, exit 1, nothing created, no ports."""
    data = descriptor(busybox_image)
    data["containers"][1]["image"] = "gearproxy-test/does-not-exist:1"
    proc = gp.run("deploy", str(write(tmp_path, "noimg", data)))
    assert proc.returncode == 1
    assert "gearproxy-test/does-not-exist:1" in proc.stderr.strip().splitlines()[-1]
    assert not docker_client.containers.list(
        all=True, filters={"label": "io.gearproxy.deployment=noimg"})
    assert gp.json("list") == []


def test_host_port_bound_by_a_foreign_process_is_an_error(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str) -> None:
    """An explicit public port that another process listens on: one clear line, exit 1,
    nothing created."""
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        proc = gp.run("deploy", str(write(tmp_path, "busy", descriptor(busybox_image,
                                                                        web_port=port))))
    assert proc.returncode == 1
    assert f"host port {port}" in proc.stderr
    assert not docker_client.containers.list(
        all=True, filters={"label": "io.gearproxy.deployment=busy"})


def test_explicit_port_of_another_deployment_is_an_error_naming_it(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str) -> None:
    """Two deployments asking for the same explicit public port: the second fails in one
    line naming the first, and creates nothing."""
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    deploy(gp, write(tmp_path, "own", descriptor(busybox_image, web_port=port)))
    proc = gp.run("deploy", str(write(tmp_path, "thief", descriptor(busybox_image,
                                                                     web_port=port))))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert f"host port {port}" in last and "'own'" in last
    assert not docker_client.containers.list(
        all=True, filters={"label": "io.gearproxy.deployment=thief"})
