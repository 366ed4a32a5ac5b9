"""gearproxy as an ordinary user against a rootless Docker engine (issue 5), for real.

Run by `.ci/run`'s rootless stage as an unprivileged user whose rootless engine answers at
$DOCKER_HOST (`scripts/rootless-engine start`, then its `env`).  Under CI=true a missing or
rootful engine, or running as root, fails these tests; elsewhere they skip.

Everything a user does goes through the CLI as subprocesses (daemon, deploy, status, delete);
probes are real: the host port from the host's loopback, the link from inside the consumer with
`docker exec`.  The bad-input cases point the CLI at the same engine through a socket symlink in
a runtime directory the test controls, so docker.pid can be missing, unreadable, stale or name a
process whose namespaces cannot be joined; a missing /dev/net/tun is made by mounting an empty
tmpfs over /dev/net in a private user+mount namespace (`unshare -Urm`), never on the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from gearproxy_harness import Gearproxy, proxy_processes, wait_for
from test_no_iptables import (
    assert_proxies_serve,
    delete_and_assert_gone,
    deploy,
    deploy_relink_delete_without_firewall,
    descriptor,
    host_port,
    in_consumer,
    installation,
    kill_target_and_wait_relink,
    make_fake_firewall,
    write_descriptor,
)

from gearproxy import rootless
from gearproxy.engine import Engine
from gearproxy.errors import DaemonError, EngineError
from gearproxy.orchestrator.api import ApiClient, socket_path

pytestmark = [pytest.mark.rootless, pytest.mark.docker, pytest.mark.slow]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"{reason} (CI=true: rootless tests fail instead of skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def dockerd_pid(docker_client: docker.DockerClient) -> int:
    """The rootless engine's dockerd pid; the tests need an unprivileged user and that engine."""
    if os.geteuid() == 0:
        _unavailable("rootless tests run as an unprivileged user (see .ci/run rootless_stage)")
    engine = Engine.connect()
    try:
        info = engine.info()
    finally:
        engine.close()
    if not info.rootless:
        _unavailable(f"the engine at DOCKER_HOST={info.host} is not rootless; start one with "
                     '`scripts/rootless-engine start` and `eval "$(scripts/rootless-engine env)"`')
    assert info.pid_file, "a rootless engine whose docker.pid gearproxy cannot find"
    return int(Path(info.pid_file).read_text().strip())


@pytest.fixture
def gp(tmp_path: Path, docker_client: docker.DockerClient, busybox_image: str,
       dockerd_pid: int) -> Iterator[Gearproxy]:
    with installation(tmp_path, docker_client, busybox_image, {}) as g:
        yield g


def _proxy_argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_unprivileged_deploy_serves_host_port_and_link_then_relinks_redeploys_and_deletes(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str, dockerd_pid: int) -> None:
    """As an ordinary user: the proxies join dockerd's namespaces; the public port answers on
    the host's loopback and the link inside web-1; a killed db-1 is restarted and relinked with
    web-1 untouched; redeploying the same file is `unchanged`, a changed environment recreates
    only db-1 on the same host ports; delete leaves nothing."""
    path = write_descriptor(tmp_path, "rl", descriptor(busybox_image))
    status, progress = deploy(gp, path)
    assert "local Container web-1 starting" in progress
    pids = gp.proxy_pids()
    assert set(pids) == {"rl.web-1.80", "rl.db-1.27017"}
    for pid in pids.values():
        argv = _proxy_argv(pid)
        assert argv[argv.index("--join-ns-of") + 1] == str(dockerd_pid)
        # the proxy now lives in RootlessKit's network namespace, not the host's
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(
            f"/proc/{dockerd_pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    assert_proxies_serve(gp, docker_client, "rl", status)

    kill_target_and_wait_relink(docker_client, "rl")

    web_id = docker_client.containers.get("rl-web-1").id
    db_id = docker_client.containers.get("rl-db-1").id
    _, progress = deploy(gp, path)
    assert "unchanged" in progress
    assert docker_client.containers.get("rl-db-1").id == db_id

    write_descriptor(tmp_path, "rl", descriptor(busybox_image, env="two"))
    status2, progress = deploy(gp, path)
    assert "local Container db-1 will be recreated" in progress
    assert docker_client.containers.get("rl-db-1").id != db_id
    assert docker_client.containers.get("rl-web-1").id == web_id
    for inst, port in (("web-1", 80), ("db-1", 27017)):
        assert host_port(status2, inst, port) == host_port(status, inst, port)
    assert wait_for("link follows the new db-1",
                    lambda: in_consumer(docker_client, "rl") == "ping")
    assert_proxies_serve(gp, docker_client, "rl", status2)

    delete_and_assert_gone(gp, docker_client, "rl", status2)


def test_unprivileged_deploy_relink_delete_never_run_iptables_or_nft(
        tmp_path: Path, docker_client: docker.DockerClient, busybox_image: str,
        dockerd_pid: int) -> None:
    """The no-firewall guard, rootless: recording fakes first on PATH stay unused through a
    deploy, a relink after `docker kill` and a delete, while the proxies serve."""
    fw = make_fake_firewall(tmp_path)
    with installation(tmp_path, docker_client, busybox_image, {"PATH": fw.path_env()}) as gp:
        deploy_relink_delete_without_firewall(gp, fw, docker_client, busybox_image, tmp_path,
                                              "rlnoipt")


# -- bad input: one line, exit 1, nothing created ---------------------------------------------


def _fake_runtime(tmp_path: Path, pid_text: str | None, mode: int = 0o600) -> dict[str, str]:
    """A runtime directory whose docker.sock reaches the real engine and whose docker.pid is
    `pid_text` (absent when None); returns the environment that points gearproxy at it."""
    real = os.environ["DOCKER_HOST"].removeprefix("unix://")
    run = tmp_path / "run"
    run.mkdir()
    (run / "docker.sock").symlink_to(real)
    if pid_text is not None:
        (run / "docker.pid").write_text(pid_text)
        (run / "docker.pid").chmod(mode)
    return {"DOCKER_HOST": f"unix://{run / 'docker.sock'}", "XDG_RUNTIME_DIR": str(run)}


def _assert_refused_and_nothing_created(proc: subprocess.CompletedProcess[str], gp: Gearproxy,
                                        client: docker.DockerClient, name: str,
                                        *expected: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1, proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert not client.containers.list(all=True, filters={
        "label": f"io.gearproxy.deployment={name}"})
    assert not client.networks.list(names=[f"gearproxy-{name}"])
    assert not proxy_processes(gp.state_dir)
    assert not ApiClient(socket_path(gp.state_dir)).ping()


def _fake_dockerd(tmp_path: Path) -> subprocess.Popen[bytes]:
    """A process of this user named `dockerd` that lives in the host's namespaces: a copy of
    sleep.  Joining its network namespace needs CAP_SYS_ADMIN there, which the user lacks."""
    binary = tmp_path / "dockerd"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    return subprocess.Popen([str(binary), "120"])


@pytest.mark.parametrize(("case", "expected"), [
    ("missing", ("no docker.pid", "XDG_RUNTIME_DIR")),
    ("unreadable", ("cannot read", "docker.pid", "Permission denied")),
    ("garbage", ("not a pid", "restart the engine")),
    ("not-running", ("which is not running", "restart the engine")),
    ("not-dockerd", ("names pid 1 (", "not dockerd", "restart the engine")),
    ("cannot-join", ("cannot join the user and network namespaces", "not permitted",
                     "run gearproxy as the user that runs the rootless engine")),
])
def test_unusable_docker_pid_is_one_line_and_creates_nothing(
        case: str, expected: tuple[str, ...], tmp_path: Path,
        docker_client: docker.DockerClient, busybox_image: str, dockerd_pid: int) -> None:
    """docker.pid missing, unreadable, not a pid, naming no process, naming a process that is
    not dockerd, or naming a dockerd whose namespaces this user may not join: `deploy` says
    what is wrong and how to fix it in one line, exits 1, and creates nothing."""
    fake: subprocess.Popen[bytes] | None = None
    if case == "missing":
        env = _fake_runtime(tmp_path, None)
    elif case == "unreadable":
        env = _fake_runtime(tmp_path, str(dockerd_pid), mode=0)
    elif case == "garbage":
        env = _fake_runtime(tmp_path, "not-a-number\n")
    elif case == "not-running":
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        env = _fake_runtime(tmp_path, f"{pid_max + 1}\n")
    elif case == "not-dockerd":
        env = _fake_runtime(tmp_path, "1\n")
    else:
        fake = _fake_dockerd(tmp_path)
        env = _fake_runtime(tmp_path, f"{fake.pid}\n")
    gp = Gearproxy(tmp_path / "state", env=env)
    try:
        proc = gp.run("deploy", str(write_descriptor(tmp_path, f"bad{case}".replace("-", ""),
                                                     descriptor(busybox_image))))
    finally:
        if fake is not None:
            fake.kill()
            fake.wait()
    _assert_refused_and_nothing_created(proc, gp, docker_client, f"bad{case}".replace("-", ""),
                                        "rootless engine", *expected)


def test_missing_dev_net_tun_is_one_line_and_creates_nothing(
        tmp_path: Path, docker_client: docker.DockerClient, busybox_image: str,
        dockerd_pid: int) -> None:
    """In a private mount namespace where /dev/net is an empty tmpfs (the machine's device is
    untouched), `deploy` refuses in one line naming /dev/net/tun and the mknod that fixes it."""
    if shutil.which("unshare") is None:
        _unavailable("unshare (util-linux) is needed to hide /dev/net/tun")
    gp = Gearproxy(tmp_path / "state")
    path = write_descriptor(tmp_path, "notun", descriptor(busybox_image))
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         'mount -t tmpfs none /dev/net && exec "$@"', "sh",
         sys.executable, "-m", "gearproxy", "deploy", str(path)],
        env=gp.environ(), capture_output=True, text=True, timeout=120, check=False)
    _assert_refused_and_nothing_created(proc, gp, docker_client, "notun",
                                        "/dev/net/tun is missing", "mknod")
    assert Path("/dev/net/tun").is_char_device()


def test_unusable_tun_device_is_refused_with_the_fix(tmp_path: Path, dockerd_pid: int) -> None:
    """`preflight` with a tun path this user cannot open (mode 000) says to chmod 0666 it; with
    a path that is not a character device it says to recreate it with mknod."""
    info = Engine.connect()
    try:
        engine_info = info.info()
    finally:
        info.close()
    locked = tmp_path / "tun-locked"
    locked.write_bytes(b"")
    locked.chmod(0)
    with pytest.raises(EngineError, match=r"cannot open .*tun-locked \(Permission denied\); "
                                          r"as root: chmod 0666"):
        rootless.preflight(engine_info, tun=locked)
    plain = tmp_path / "tun-plain"
    plain.write_bytes(b"")
    with pytest.raises(EngineError, match=r"tun-plain is not a character device; .*mknod"):
        rootless.preflight(engine_info, tun=plain)
    assert rootless.preflight(engine_info) == dockerd_pid


def test_preflight_join_probe_refuses_a_foreign_process(dockerd_pid: int) -> None:
    """The nsenter-equivalent probe joins the engine's namespaces, and refuses pid 1's (root's)
    with DaemonError naming the namespace file."""
    rootless.check_join(dockerd_pid)
    with pytest.raises(DaemonError, match=r"pid 1\): cannot open /proc/1/ns/user"):
        rootless.check_join(1)


def test_status_json_lists_rootless_proxies_with_their_netns_listeners(
        gp: Gearproxy, tmp_path: Path, docker_client: docker.DockerClient,
        busybox_image: str) -> None:
    """`status --json` shows db-1's proxy listening both on the host port and inside web-1's
    network namespace (the consumer's /proc/PID/ns/net)."""
    status, _ = deploy(gp, write_descriptor(tmp_path, "rlst", descriptor(busybox_image)))
    assert wait_for("link answers", lambda: in_consumer(docker_client, "rlst") == "ping")
    [dep] = gp.json("status", "rlst")
    [proxy] = [p for p in dep["proxies"] if p["key"] == "rlst.db-1.27017"]
    web_pid = docker_client.containers.get("rlst-web-1").attrs["State"]["Pid"]
    listeners = {(lst["netns"], lst["listen"]) for lst in proxy["stats"]["listeners"]}
    db_port = host_port(status, "db-1", 27017)
    assert listeners == {(None, f"127.0.0.1:{db_port}"),
                         (f"/proc/{web_pid}/ns/net", "127.0.0.1:27017")}
