"""The lifecycle verbs and readiness: stop/start/restart, logs, healthchecks, --timeout,
and a failed deploy that cleans up after itself.  A real engine and daemon, the CLI as a
subprocess."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from gearproxy_harness import Gearproxy, proxy_processes, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def talker(image: str, **extra: Any) -> dict[str, Any]:
    return {"name": "talk", "image": image, "environment": {"GEN": "x1"},
            "command": ["sh", "-c", "echo said-$GEN; exec sleep 3600"], **extra}


def write(tmp_path: Path, name: str, containers: list[dict[str, Any]]) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"containers": containers}))
    return path


def instance_state(gp: Gearproxy, name: str, instance: str) -> dict[str, Any]:
    [dep] = gp.json("status", name)
    return next(i for i in dep["instances"] if i["id"] == instance)


def test_logs_print_the_container_output(gp: Gearproxy, tmp_path: Path,
                                         busybox_image: str) -> None:
    """`gearproxy logs INSTANCE` prints what the container wrote, environment applied."""
    assert gp.run("deploy", str(write(tmp_path, "lg", [talker(busybox_image)]))).returncode == 0
    out = wait_for("logs show the line", lambda: (p := gp.run("logs", "talk-1")).returncode == 0
                   and "said-x1" in p.stdout and p.stdout)
    assert "said-x1" in out
    missing = gp.run("logs", "nope-1")
    assert missing.returncode == 2 and "nope-1" in missing.stderr


def test_logs_follow_streams_until_interrupted(gp: Gearproxy, tmp_path: Path,
                                               busybox_image: str) -> None:
    """`logs --follow` keeps the stream open and prints lines as they come."""
    spec = talker(busybox_image, command=[
        "sh", "-c", "i=0; while [ $i -lt 600 ]; do echo tick-$i; i=$((i+1)); sleep 0.2; done"])
    assert gp.run("deploy", str(write(tmp_path, "fl", [spec]))).returncode == 0
    follower = subprocess.Popen([sys.executable, "-m", "gearproxy", "logs", "--follow",
                                 "talk-1"], env=gp.environ(), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
    try:
        assert follower.stdout is not None
        seen = [follower.stdout.readline() for _ in range(3)]
        assert all(line.startswith(b"tick-") for line in seen)
        assert follower.poll() is None  # still following
    finally:
        follower.kill()
        follower.wait(10)
        assert follower.stdout is not None
        follower.stdout.close()


def test_stop_keeps_an_instance_stopped_and_start_brings_it_back(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str) -> None:
    """A stopped instance is not restarted by the `always` policy; start and restart work on
    an instance and on a whole deployment."""
    assert gp.run("deploy", str(write(tmp_path, "sv", [talker(busybox_image, count=2)]))
                  ).returncode == 0
    stopped = gp.json("stop", "talk-1")
    assert stopped == {"op": "stop", "instances": ["talk-1"]}
    assert docker_client.containers.get("sv-talk-1").status == "exited"
    assert instance_state(gp, "sv", "talk-1")["state"] == "exited"
    with pytest.raises(AssertionError):  # not restarted behind the user's back
        wait_for("talk-1 restarted", lambda: docker_client.containers.get("sv-talk-1")
                 .status == "running", timeout=3)
    assert gp.run("start", "talk-1").returncode == 0
    assert instance_state(gp, "sv", "talk-1")["state"] == "running"
    before = docker_client.containers.get("sv-talk-2").attrs["State"]["StartedAt"]
    assert gp.json("restart", "sv")["instances"] == ["talk-1", "talk-2"]
    after = docker_client.containers.get("sv-talk-2").attrs["State"]["StartedAt"]
    assert after != before
    unknown = gp.run("stop", "nothing-here")
    assert unknown.returncode == 2 and "nothing-here" in unknown.stderr


def test_deploy_waits_for_a_healthcheck(gp: Gearproxy, tmp_path: Path,
                                        busybox_image: str) -> None:
    """With a Healthcheck, deploy returns only once the instance reports healthy."""
    spec = talker(busybox_image, healthcheck={
        "test": "test -f /tmp/ready", "interval": 0.2, "timeout": 1, "retries": 50},
        command=["sh", "-c", "sleep 1; touch /tmp/ready; exec sleep 3600"])
    proc = gp.run("deploy", str(write(tmp_path, "hc", [spec])), "--json")
    assert proc.returncode == 0, proc.stderr
    [inst] = json.loads(proc.stdout)["instances"]
    assert inst["health"] == "healthy"


def test_failed_deploy_says_what_is_not_ready_and_leaves_nothing(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str) -> None:
    """An instance that never becomes healthy: after --timeout, one line naming it, exit 1,
    and the deploy's containers, network, proxies and port reservations are gone."""
    spec = talker(busybox_image, publicports=[{"internal": 8080}], healthcheck={
        "test": "false", "interval": 0.2, "timeout": 1, "retries": 1000})
    proc = gp.run("deploy", str(write(tmp_path, "sick", [spec])), "--timeout", "4")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gearproxy: error:") and "talk-1" in last and "not ready" in last
    assert not docker_client.containers.list(
        all=True, filters={"label": "io.gearproxy.deployment=sick"})
    assert not docker_client.networks.list(names=["gearproxy-sick"])
    assert gp.json("list") == []
    assert not proxy_processes(gp.state_dir)
    [mapping] = [line for line in proc.stderr.splitlines() if "PortMapping: 8080 ->" in line]
    port = int(mapping.rsplit(" ", 1)[1])
    with socket.socket() as probe:  # nothing listens on its host port any more
        probe.bind(("127.0.0.1", port))
    taken = subprocess.run([sys.executable, "-c", (
        "from gearproxy.store import Store; import json; "
        "print(json.dumps(sorted(Store.open().taken_ports('local'))))")],
        env=gp.environ(), capture_output=True, text=True, check=True).stdout
    assert port not in json.loads(taken)  # and its reservation was released


def test_publish_address_ipv6_serves_on_ipv6_loopback(gp: Gearproxy, tmp_path: Path,
                                                      busybox_image: str) -> None:
    """`--publish-address ::` deploys (readiness probed on ::1) and the public port answers
    on [::1]."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    web = {"name": "web", "image": busybox_image, "publicports": [{"internal": 80}],
           "command": ["sh", "-c", "mkdir -p /www && echo v6-ok > /www/index.html && "
                       "exec httpd -f -p 80 -h /www"]}
    proc = gp.run("deploy", str(write(tmp_path, "six", [web])), "--publish-address", "::",
                  "--json", "--timeout", "60")
    assert proc.returncode == 0, proc.stderr
    [inst] = json.loads(proc.stdout)["instances"]
    port = inst["ports"][0]["external"]
    with socket.create_connection(("::1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert b"v6-ok" in reply
