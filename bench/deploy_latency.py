"""`python -m bench.deploy_latency`: how long `gearproxy deploy` takes beside plain `docker run`.

Shape of a size N: N links.  N consumers `c1..cN` (busybox `sleep`) each link to their own
target `t1..tN` (busybox `nc -ll -p 7000 -e cat`, public port 7000), so a size-N deployment is
2N containers and N link proxies (each listening on its host port and inside its consumer).

Contenders, alternated within every round (A B C, then B C A, ...), medians reported:

- gearproxy: a private daemon (own GEARPROXY_STATE_DIR, `--publish-address 127.0.0.1`),
  started and warmed by one throwaway deploy before any timing.  Timed: `gearproxy deploy
  FILE --json` from spawn to exit; then "verified": an echo round trip through every host
  port and one `docker exec` round trip inside c1 (127.0.0.1:7000), so serving is checked
  independently of the deploy's own readiness wait; then `gearproxy delete`.
- docker-cli: the same 2N containers with `docker network create` and one `docker run -d`
  per container, sequentially (the way a user scripts it), until `docker inspect` shows
  every one running.  No links.  Then `docker rm -f` + `docker network rm`.
- docker-sdk: the same through the Docker API from this process (create + start, one by
  one): what the engine itself costs without any CLI process per container.

Between measurements the bench waits until the daemon's CPU goes quiet (it handles the
deploy's Docker events after returning), so one measurement does not bill the next.
Every wait is bounded; everything created (containers, networks, daemon, proxies, state
directory) is removed in `finally`, also on failure or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import hashlib
import io
import itertools
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors

from bench.deploy_report import markdown, summarise

TARGET_PORT = 7000
IMAGE_REPO = "gearproxy-bench/busybox"
BUSYBOX = Path("/bin/busybox")
BENCH_LABEL = "io.gearproxy.bench.run"
CONTENDERS = ("gearproxy", "docker-cli", "docker-sdk")
RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = ("size N = N links: consumers c1..cN (busybox sleep) each linking to its own target "
         f"t1..tN (busybox `nc -ll -p {TARGET_PORT} -e cat`), i.e. 2N containers and N link "
         "proxies; baselines start the same 2N containers on a user-defined network, no links")


class BenchError(RuntimeError):
    """A measurement could not be made (a command failed or a deadline passed)."""


def now() -> float:
    return time.monotonic()


def run(argv: list[str], *, timeout: float, env: dict[str, str] | None = None,
        check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          input=stdin, check=False)
    if check and proc.returncode != 0:
        raise BenchError(f"{shlex.join(argv[:4])}... exited {proc.returncode}: "
                         f"{proc.stderr.strip()[-400:]}")
    return proc


def until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Call `check` until it returns something truthy, within `timeout` seconds."""
    deadline = now() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, BenchError, subprocess.TimeoutExpired) as exc:
            last = exc
        else:
            if last:
                return last
        if now() >= deadline:
            raise BenchError(f"{what}: not within {timeout:g}s (last: {last!r})")
        time.sleep(interval)


# --------------------------------------------------------------------------- image


def ensure_image(client: docker.DockerClient) -> str:
    """`gearproxy-bench/busybox:<hash>`: the host's static busybox, `docker import`ed once."""
    if not BUSYBOX.is_file():
        raise BenchError(f"{BUSYBOX} is missing: install Debian's busybox-static")
    binary = BUSYBOX.read_bytes()
    listed = run([str(BUSYBOX), "--list"], timeout=30).stdout.split()
    applets = sorted({a for a in listed if a and "/" not in a and a != "busybox"})
    tag = hashlib.sha256(binary + "\n".join(applets).encode()).hexdigest()[:16]
    reference = f"{IMAGE_REPO}:{tag}"
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(reference)
        return reference
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(binary), 0o755
        tar.addfile(info, io.BytesIO(binary))
        for applet in applets:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(link)
    client.api.import_image_from_data(buf.getvalue(), repository=IMAGE_REPO, tag=tag,
                                      changes=["ENV PATH=/bin", 'CMD ["sleep", "3600"]'])
    client.images.get(reference)  # raises if the import did not produce it
    return reference


def commands(n: int) -> list[tuple[str, list[str]]]:
    """(name, command) of the 2N containers, targets first as the orchestrator orders them."""
    targets = [(f"t{i}", ["nc", "-ll", "-p", str(TARGET_PORT), "-e", "cat"])
               for i in range(1, n + 1)]
    consumers = [(f"c{i}", ["sleep", "3600"]) for i in range(1, n + 1)]
    return targets + consumers


def descriptor(n: int, image: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = []
    for name, command in commands(n):
        entry: dict[str, Any] = {"Name": name, "Image": image, "Count": 1, "Command": command}
        if name.startswith("t"):
            entry["PublicPorts"] = [{"Internal": TARGET_PORT}]
        else:
            entry["Links"] = [{"To": "t" + name[1:]}]
        containers.append(entry)
    return {"Containers": containers}


# --------------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float | None:
    """utime+stime of one process (not its children), or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes_mentioning(marker: str, word: str) -> list[int]:
    """Live pids whose argv has `word` as an argument and mentions `marker` somewhere."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if word.encode() in argv and any(marker.encode() in a for a in argv):
            found.append(int(entry.name))
    return found


def kill_pids(pids: list[int], grace: float = 3.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = now() + grace
    while now() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Gearproxy:
    """A private gearproxy installation: state directory, daemon, CLI as subprocesses."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.env = {**os.environ, "GEARPROXY_STATE_DIR": str(state_dir)}
        self.daemon: subprocess.Popen[bytes] | None = None

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "gearproxy", *args]

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*args), timeout=timeout, env=self.env)

    def start(self) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "daemon.bench.log", "ab") as log:
            self.daemon = subprocess.Popen(
                self.argv("daemon", "--publish-address", "127.0.0.1"), env=self.env,
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        until("gearproxy daemon answers", lambda: self.cli("list", timeout=20), 60, 0.2)
        return self.daemon.pid

    def proxies(self) -> list[int]:
        return processes_mentioning(str(self.state_dir), "proxy")

    def quiesce(self, timeout: float = 60.0) -> float:
        """Wait until the daemon burns no CPU for 0.5 s (its event backlog is done)."""
        assert self.daemon is not None
        start, last = now(), cpu_seconds(self.daemon.pid)
        quiet_since = now()
        while now() - start < timeout:
            time.sleep(0.1)
            cpu = cpu_seconds(self.daemon.pid)
            if cpu != last:
                last, quiet_since = cpu, now()
            elif now() - quiet_since >= 0.5:
                break
        return now() - start

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(20)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(10)
        self.daemon = None
        kill_pids(self.proxies())


# --------------------------------------------------------------------------- probes


def echo_roundtrip(port: int, payload: bytes, timeout: float = 5.0) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := sock.recv(65536):
            got += chunk
    return bytes(got) == payload


def exec_roundtrip(container: str) -> bool:
    proc = run(["docker", "exec", container, "sh", "-c",
                f"echo bench-ping | nc -w 3 127.0.0.1 {TARGET_PORT}"], timeout=20, check=False)
    return proc.returncode == 0 and proc.stdout.strip() == "bench-ping"


def stream_stderr(proc: subprocess.Popen[str], t0: float, lines: list[tuple[float, str]]) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append((now() - t0, line.rstrip("\n")))
    proc.stderr.close()


def phases(lines: list[tuple[float, str]], total: float) -> dict[str, float | None]:
    """Where the deploy's wall time went, from the arrival times of its progress lines.

    plan: until the first line (CLI start, image check, planning, port reservation);
    before_containers: first line to the first `is installed` (network, the up-front
    proxy spawns, the first create); containers: first `is installed` to the last
    `starting` (create + start of all but the last container); tail: the rest (last
    start, re-pointing proxies at the containers, readiness wait, status reply).
    """
    first = lines[0][0] if lines else None
    installed = [t for t, text in lines if text.endswith(" is installed")]
    starts = [t for t, text in lines if text.endswith(" starting")]
    if first is None or not starts or not installed:
        return {"plan_s": first, "before_containers_s": None, "containers_s": None,
                "tail_s": None, "per_container_ms": None}
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    return {"plan_s": first, "before_containers_s": installed[0] - first,
            "containers_s": starts[-1] - installed[0], "tail_s": total - starts[-1],
            "per_container_ms": statistics.median(gaps) * 1000 if gaps else None}


# --------------------------------------------------------------------------- contenders


class Bench:
    def __init__(self, args: argparse.Namespace, client: docker.DockerClient, image: str,
                 gp: Gearproxy) -> None:
        self.args, self.client, self.image, self.gp = args, client, image, gp
        self.run_id = uuid.uuid4().hex[:6]
        self.deployments: set[str] = set()
        self.networks: set[str] = set()
        self.workdir = gp.state_dir / "bench-files"
        self.workdir.mkdir(parents=True, exist_ok=True)

    def gearproxy(self, n: int, tag: str, *, profile: Path | None = None) -> dict[str, Any]:
        name = f"gpb{self.run_id}{tag}"
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(descriptor(n, self.image)))
        self.deployments.add(name)
        assert self.gp.daemon is not None
        daemon = self.gp.daemon.pid
        cpu0 = cpu_seconds(daemon) or 0.0
        spy = None
        if profile is not None:
            spy = subprocess.Popen(["py-spy", "record", "--idle", "--nonblocking", "--format",
                                    "raw", "-r", "100", "-o", str(profile), "--pid", str(daemon)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # let it attach
        lines: list[tuple[float, str]] = []
        t0 = now()
        proc = subprocess.Popen(
            self.gp.argv("deploy", str(path), "--name", name, "--publish-address", "127.0.0.1",
                         "--timeout", str(self.args.timeout), "--json"),
            env=self.gp.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        reader = threading.Thread(target=stream_stderr, args=(proc, t0, lines), daemon=True)
        reader.start()
        assert proc.stdout is not None
        try:  # stdout (the JSON) is small and comes last; stderr has its own reader
            stdout = proc.stdout.read()
            proc.wait(timeout=self.args.timeout + 90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise BenchError(f"gearproxy deploy of {n} links did not return") from None
        deploy_s = now() - t0
        reader.join(10)
        proc.stdout.close()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
            if spy.poll() is None:
                spy.kill()
        if proc.returncode != 0:
            raise BenchError(f"gearproxy deploy exited {proc.returncode}: "
                             + " | ".join(text for _, text in lines[-3:]))
        status = json.loads(stdout)
        ports = [p["external"] for inst in status["instances"] for p in inst["ports"]]
        if len(ports) != n:
            raise BenchError(f"expected {n} host ports, status lists {len(ports)}")
        retried, first_failures = 0, []
        for port in ports:
            payload = f"bench-{port}\n".encode()
            t_probe = now()
            try:
                ok, why = echo_roundtrip(port, payload), "wrong echo"
            except OSError as exc:
                ok, why = False, repr(exc)
            if not ok:  # deploy returned, yet this link did not serve at once: note it
                retried += 1
                first_failures.append(f"port {port} at +{t_probe - t0:.2f}s: {why}")
                until(f"echo through host port {port}",
                      functools.partial(echo_roundtrip, port, payload), 15)
        hosts_s = now() - t0
        if not exec_roundtrip(f"{name}-c1-1"):
            retried += 1
            until("docker exec round trip in c1", lambda: exec_roundtrip(f"{name}-c1-1"), 15,
                  0.2)
        verified_s = now() - t0
        cpu1 = cpu_seconds(daemon) or 0.0
        proxy_pids = [p for p in self.gp.proxies() if Path(f"/proc/{p}").exists()]
        proxy_cpu = sum(cpu_seconds(p) or 0.0 for p in proxy_pids)
        self.gp.quiesce()
        t1 = now()
        self.gp.cli("delete", name, timeout=300)
        delete_s = now() - t1
        left = self.client.containers.list(
            all=True, filters={"label": f"io.gearproxy.deployment={name}"})
        if left or self.gp.proxies():
            raise BenchError(f"delete of {name} left {len(left)} containers, "
                             f"{len(self.gp.proxies())} proxies")
        self.deployments.discard(name)
        self.gp.quiesce()
        return {"deploy_s": deploy_s, "hosts_verified_s": hosts_s, "verified_s": verified_s,
                "delete_s": delete_s, "daemon_cpu_s": cpu1 - cpu0, "proxy_cpu_s": proxy_cpu,
                "proxies": len(proxy_pids), "verify_retries": retried,
                "first_probe_failures": first_failures,
                "timeline": [[round(t, 3), text] for t, text in lines],
                **phases(lines, deploy_s)}

    def _names(self, n: int, tag: str) -> tuple[str, list[tuple[str, list[str]]]]:
        prefix = f"gpb{self.run_id}{tag}"
        self.networks.add(f"{prefix}-net")
        return f"{prefix}-net", [(f"{prefix}-{name}", cmd) for name, cmd in commands(n)]

    def docker_cli(self, n: int, tag: str) -> dict[str, Any]:
        net, containers = self._names(n, tag)
        label = f"{BENCH_LABEL}={self.run_id}"
        t0 = now()
        run(["docker", "network", "create", "--label", label, net], timeout=60)
        for name, cmd in containers:
            run(["docker", "run", "-d", "--network", net, "--name", name, "--label", label,
                 self.image, *cmd], timeout=120)
        names = [name for name, _ in containers]
        until("docker-cli containers running", lambda: set(run(
            ["docker", "inspect", "-f", "{{.State.Running}}", *names], timeout=60,
            check=False).stdout.split()) == {"true"}, 60)
        up_s = now() - t0
        t1 = now()
        for name in names:  # one by one: a parallel `docker rm -f a b ...` of many running
            # containers can leave a stale endpoint that makes the network unremovable
            run(["docker", "rm", "-f", name], timeout=120)
        # `rm -f` can return before the engine has released the endpoints: retry, bounded.
        until(f"docker network rm {net}", lambda: run(["docker", "network", "rm", net],
                                                      timeout=60), 30, 0.1)
        self.networks.discard(net)
        return {"up_s": up_s, "remove_s": now() - t1}

    def docker_sdk(self, n: int, tag: str) -> dict[str, Any]:
        net, containers = self._names(n, tag)
        labels = {BENCH_LABEL: self.run_id}
        api = self.client.api
        t0 = now()
        api.create_network(net, driver="bridge", labels=labels)
        ids = []
        for name, cmd in containers:
            created = api.create_container(self.image, cmd, name=name, labels=labels,
                                           host_config=api.create_host_config(network_mode=net))
            api.start(created["Id"])
            ids.append(created["Id"])
        until("docker-sdk containers running", lambda: all(
            api.inspect_container(i)["State"]["Running"] for i in ids), 60)
        up_s = now() - t0
        t1 = now()
        for cid in ids:
            api.remove_container(cid, force=True)

        def remove_network() -> bool:
            try:
                api.remove_network(net)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                raise BenchError(str(exc)) from None
            return True

        until(f"remove network {net}", remove_network, 30, 0.1)
        self.networks.discard(net)
        return {"up_s": up_s, "remove_s": now() - t1}

    def cleanup(self) -> list[str]:
        """Remove whatever this run created that is still there; return what failed."""
        problems = []
        if self.gp.daemon is not None and self.gp.daemon.poll() is None:
            for name in sorted(self.deployments):
                try:
                    self.gp.cli("delete", name, timeout=120)
                except (BenchError, subprocess.TimeoutExpired) as exc:
                    problems.append(f"gearproxy delete {name}: {exc}")
        selectors = [f"{BENCH_LABEL}={self.run_id}",
                     *(f"io.gearproxy.deployment={d}" for d in self.deployments)]
        for selector in selectors:
            for c in self.client.containers.list(all=True, filters={"label": selector}):
                try:
                    c.remove(force=True)
                except docker.errors.APIError as exc:
                    problems.append(f"container {c.name}: {exc}")
        names = [*self.networks, *(f"gearproxy-{d}" for d in self.deployments)]
        for net in self.client.networks.list(names=names) if names else []:
            if net.name in names:
                try:
                    net.remove()
                except docker.errors.APIError as exc:
                    problems.append(f"network {net.name}: {exc}")
        return problems


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.deploy_latency",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--sizes", default="1,10,40", help="comma-separated N (links) per size")
    p.add_argument("--rounds", type=int, help="rounds per size (default 3, --quick 1)")
    p.add_argument("--quick", action="store_true", help="size 1, one round (a few seconds)")
    p.add_argument("--only", default=",".join(CONTENDERS),
                   help=f"comma-separated subset of {','.join(CONTENDERS)}")
    p.add_argument("--timeout", type=float, default=300.0, help="gearproxy deploy --timeout")
    p.add_argument("--out", type=Path, help="output directory (default bench/results/deploy-*)")
    p.add_argument("--state-dir", type=Path, help="gearproxy state dir (default: a temp dir)")
    p.add_argument("--py-spy", type=Path, metavar="FILE",
                   help="after the rounds, one extra unmeasured deploy of the largest size "
                        "with py-spy recording the daemon (raw collapsed stacks) to FILE")
    args = p.parse_args(argv)
    args.size_list = [1] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.contenders = [c for c in CONTENDERS if c in args.only.split(",")]
    if not args.contenders or any(n < 1 for n in args.size_list):
        p.error("need at least one contender and sizes >= 1")
    return args


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def state_directory(given: Path | None) -> Iterator[Path]:
    if given is not None:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="gpbench-") as tmp:
        yield Path(tmp)


def measure(args: argparse.Namespace, bench: Bench, result: dict[str, Any]) -> None:
    order = list(args.contenders)
    step = 0
    for n in args.size_list:
        per: dict[str, list[dict[str, Any]]] = {c: [] for c in args.contenders}
        result["raw"][str(n)] = per
        for rnd in range(args.rounds):
            for name in order[step % len(order):] + order[:step % len(order)]:
                tag = f"n{n}r{rnd}{name[-3:]}"
                try:
                    if name == "gearproxy":
                        row = bench.gearproxy(n, tag)
                    elif name == "docker-cli":
                        row = bench.docker_cli(n, tag)
                    else:
                        row = bench.docker_sdk(n, tag)
                except (BenchError, OSError, subprocess.TimeoutExpired,
                        docker.errors.APIError) as exc:
                    result["errors"].append(f"{name} N={n} round {rnd + 1}: {exc}")
                    print(f"  {name} N={n} round {rnd + 1}: ERROR {exc}", file=sys.stderr)
                    bench.cleanup()
                    continue
                per[name].append({"round": rnd + 1, **row})
                shown = ", ".join(f"{k}={v:.2f}" for k, v in row.items()
                                  if isinstance(v, float) and k.endswith("_s"))
                print(f"  N={n} round {rnd + 1} {name}: {shown}", file=sys.stderr, flush=True)
            step += 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or RESULTS / f"deploy-{started}"
    client = docker.from_env(timeout=300)
    result: dict[str, Any] = {
        "meta": {"started": started, "command": shlex.join(["python", "-m",
                                                            "bench.deploy_latency",
                                                            *(argv or sys.argv[1:])]),
                 "host": platform.node(), "cpus": os.cpu_count(), "python":
                 platform.python_version(), "docker": client.version().get("Version"),
                 "sizes": args.size_list, "rounds": args.rounds,
                 "contenders": args.contenders, "shape": SHAPE,
                 "load_before": [round(x, 2) for x in os.getloadavg()]},
        "raw": {}, "notes": [], "errors": []}
    code = 0
    with state_directory(args.state_dir) as state:
        gp = Gearproxy(state)
        bench = None
        try:
            image = ensure_image(client)
            result["meta"]["image"] = image
            t0 = now()
            pid = gp.start()
            result["notes"].append(f"daemon started in {now() - t0:.2f}s (pid {pid}), warmed "
                                   "by one unmeasured 1-link deploy + delete")
            bench = Bench(args, client, image, gp)
            result["meta"]["run_id"] = bench.run_id
            if "gearproxy" in args.contenders:
                bench.gearproxy(1, "warm")
            t0 = now()
            gp.cli("list")
            cli_s = now() - t0
            t0 = now()
            run(["docker", "version", "--format", "{{.Server.Version}}"], timeout=30)
            result["notes"].append(f"one `gearproxy list` (CLI process start) took "
                                   f"{cli_s:.2f}s; one `docker version` {now() - t0:.2f}s")
            measure(args, bench, result)
            for size, per in result["raw"].items():
                for row in per.get("gearproxy", []):
                    result["notes"] += [f"N={size} round {row['round']}: link not serving when "
                                        f"deploy returned: {f}"
                                        for f in row.get("first_probe_failures", [])]
            if args.py_spy is not None and "gearproxy" in args.contenders:
                n = max(args.size_list)
                row = bench.gearproxy(n, "spy", profile=args.py_spy)
                result["notes"].append(f"py-spy: extra deploy of {n} links under py-spy took "
                                       f"{row['deploy_s']:.2f}s; stacks in {args.py_spy}")
        except (BenchError, OSError, docker.errors.DockerException,
                subprocess.TimeoutExpired) as exc:
            result["errors"].append(f"aborted: {exc}")
        except (KeyboardInterrupt, SystemExit) as exc:  # SIGINT/SIGTERM: keep what we have
            result["errors"].append(f"interrupted ({type(exc).__name__})")
            code = 130
        finally:
            if bench is not None:
                result["errors"] += [f"cleanup: {p}" for p in bench.cleanup()]
            gp.stop()
            client.close()
    result["meta"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["notes"].append("ms/ctr = median wall time / 2N containers; gp / CLI = gearproxy "
                           "deploy over `docker run` loop (values above 1 are orchestrator cost)")
    result.update(summarise(result["raw"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "deploy.md").write_text(md)
    print(md)
    print(f"written: {out / 'deploy.json'}, {out / 'deploy.md'}")
    return code or (1 if result["errors"] else 0)


if __name__ == "__main__":
    sys.exit(main())
