"""The real `gearproxy` command line, in process (click's CliRunner) and as a user runs it
(`python -m gearproxy …` and the `gearproxy` console script as subprocesses).

Every test runs with `GEARPROXY_STATE_DIR` in a temporary directory and `DOCKER_HOST` pointing
at a socket that does not exist, so nothing touches /var/lib/gearproxy or a real engine.  Tests
that make the CLI auto-start a daemon kill any `gearproxy daemon` left with their state
directory in teardown, and check that none was left in the first place.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from gearproxy import __version__, spec, statefile
from gearproxy.cli import main
from gearproxy.plan import plan

REPO = Path(__file__).resolve().parent.parent
ROCKMONGO = REPO / "examples" / "rockmongo_mongodb.json"
WEB_DB = REPO / "examples" / "web_db.json"
NOWHERE = "unix:///nonexistent.sock"
ERROR_PREFIX = "gearproxy: error:"
COMMANDS = ("deploy", "status", "list", "stop", "start", "restart", "logs", "delete", "daemon",
            "proxy", "install-units")

ROCKMONGO_LINES = [
    "local PortMapping: 27017 -> 4000",
    "local Container mongodb-1 will be created",
    "local PortMapping: 80 -> 6060",
    "local Container rockmongo-1 will be created",
    "linking rockmongo: 127.0.0.1:27017 -> localhost:4000",
]


# --- helpers ---------------------------------------------------------------------------------


def _console_script() -> str:
    """The installed `gearproxy` script of this interpreter (beside it, else on PATH)."""
    beside = Path(sys.executable).with_name("gearproxy")
    if beside.is_file():
        return str(beside)
    found = shutil.which("gearproxy")
    assert found, "the gearproxy console script is not installed (pip install -e '.[test]')"
    return found


LAUNCHERS = {
    "python -m gearproxy": [sys.executable, "-m", "gearproxy"],
    "gearproxy script": [_console_script()],
}


def run(*args: str | os.PathLike[str], launcher: str = "python -m gearproxy",
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a subprocess with the test's environment (set by the autouse fixture)."""
    return subprocess.run([*LAUNCHERS[launcher], *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ), check=False)


def invoke(*args: str | os.PathLike[str]) -> Result:
    """Run the CLI in process; click's SystemExit becomes `exit_code`."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_error_line(stderr: str, *fragments: str) -> str:
    """stderr is exactly one line, `gearproxy: error: …`, containing every fragment."""
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith(ERROR_PREFIX), line
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def daemons_of(state: Path) -> list[int]:
    """Pids of `gearproxy daemon` processes whose environment has GEARPROXY_STATE_DIR=state."""
    wanted = f"GEARPROXY_STATE_DIR={state}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"gearproxy" not in b" ".join(argv) or b"daemon" not in argv:
                continue
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def wait_no_daemon(state: Path, timeout: float = 5.0) -> list[int]:
    """Wait until no daemon of `state` runs; return the ones still running at the deadline."""
    deadline = time.monotonic() + timeout
    while (pids := daemons_of(state)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def kill_daemons(state: Path) -> None:
    """SIGTERM, then SIGKILL after a deadline, every daemon of `state` (ours by its env)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = daemons_of(state)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not pids or not wait_no_daemon(state, 5.0):
            return


def mapped_ports(lines: list[str]) -> dict[str, int]:
    """`{container: host port}` from a dry run's `PortMapping` + `Container` lines."""
    ports: dict[str, int] = {}
    pending: list[int] = []
    for line in lines:
        if m := re.fullmatch(r"local PortMapping: \d+ -> (\d+)", line):
            pending.append(int(m[1]))
        elif m := re.fullmatch(r"local Container (\S+)-\d+ will be created", line):
            assert len(pending) == 1, line
            ports[m[1]] = pending.pop()
    return ports


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private, not yet existing state directory and a DOCKER_HOST that answers nothing;
    any daemon started with this state directory is killed afterwards."""
    directory = tmp_path / "state"
    monkeypatch.setenv("GEARPROXY_STATE_DIR", str(directory))
    monkeypatch.setenv("DOCKER_HOST", NOWHERE)
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        yield directory
    finally:
        kill_daemons(directory)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_daemon_finder_sees_and_kills_only_our_state_dirs_daemon(tmp_path: Path,
                                                               state: Path) -> None:
    """The teardown helper finds a `… gearproxy daemon` process by its GEARPROXY_STATE_DIR,
    ignores one with another state directory, and kills ours."""
    argv = [sys.executable, "-c", "import time; time.sleep(60)", "gearproxy", "daemon"]
    ours = subprocess.Popen(argv, env={**os.environ, "GEARPROXY_STATE_DIR": str(state)})
    other = subprocess.Popen(argv, env={**os.environ,
                                        "GEARPROXY_STATE_DIR": str(tmp_path / "other")})
    try:
        assert daemons_of(state) == [ours.pid]
        kill_daemons(state)
        assert ours.wait(5) == -signal.SIGTERM
        assert other.poll() is None
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait(5)


# --- version and help ------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_version_prints_the_package_version(launcher: str) -> None:
    """`--version` prints `gearproxy, version X` with the installed distribution's version."""
    proc = run("--version", launcher=launcher)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"gearproxy, version {__version__}"
    assert __version__ == importlib.metadata.version("gearproxy")


def test_version_in_process_matches() -> None:
    """The click group itself answers `--version` with exit 0."""
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"gearproxy, version {__version__}"


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_help_lists_every_command(launcher: str) -> None:
    """`gearproxy --help` names every verb, including the lazily imported ones."""
    proc = run("--help", launcher=launcher)
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^  (\S+)\s", proc.stdout.split("Commands:", 1)[1], re.MULTILINE)
    assert set(COMMANDS) <= set(listed), listed


# --- deploy --dry-run ------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_dry_run_prints_geard_lines_for_the_example(launcher: str, state: Path) -> None:
    """The issue's example plans to exactly geard's lines on stdout, nothing on stderr,
    exit 0, and writes no state directory."""
    proc = run("deploy", "--dry-run", ROCKMONGO, launcher=launcher)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ROCKMONGO_LINES
    assert proc.stderr == ""
    assert not state.exists()


def test_dry_run_in_process_prints_the_same_lines(state: Path) -> None:
    result = invoke("deploy", "--dry-run", ROCKMONGO)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ROCKMONGO_LINES
    assert not state.exists()


def test_dry_run_leaves_an_existing_empty_state_directory_empty(state: Path) -> None:
    """No database, socket or log appears in a state directory a dry run finds empty."""
    state.mkdir()
    proc = run("deploy", "--dry-run", ROCKMONGO)
    assert proc.returncode == 0, proc.stderr
    assert list(state.iterdir()) == []


def test_dry_run_never_connects_to_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          state: Path) -> None:
    """With DOCKER_HOST on a socket that listens and records callers, a dry run (text and
    JSON) succeeds and nobody connects; nor does a daemon appear."""
    sock_path = tmp_path / "engine.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(sock_path))
        listener.listen(8)
        listener.setblocking(False)
        monkeypatch.setenv("DOCKER_HOST", f"unix://{sock_path}")
        assert run("deploy", "--dry-run", ROCKMONGO).returncode == 0
        assert run("deploy", "--dry-run", "--json", WEB_DB).returncode == 0
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert not state.exists()
    assert daemons_of(state) == []


def test_dry_run_json_is_one_document_with_instances_ports_and_links(state: Path) -> None:
    """`--dry-run --json`: stdout is exactly one JSON document (json.loads rejects trailing
    data), stderr is empty, and it holds the instances, host ports and link of the example."""
    proc = run("deploy", "--dry-run", "--json", ROCKMONGO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    doc: dict[str, Any] = json.loads(proc.stdout)
    assert doc["name"] == "rockmongo_mongodb"
    assert doc["empty"] is False
    assert doc["remove"] == []
    assert sorted(doc["create"]) == ["mongodb-1", "rockmongo-1"]
    instances = {i["id"]: i for i in doc["instances"]}
    assert set(instances) == {"mongodb-1", "rockmongo-1"}
    assert all(i["action"] == "create" and i["host"] == "local" for i in instances.values())
    assert [(p["internal"], p["external"]) for p in instances["rockmongo-1"]["ports"]] == [
        (80, 6060)]
    assert [(p["internal"], p["external"]) for p in instances["mongodb-1"]["ports"]] == [
        (27017, 4000)]
    assert instances["mongodb-1"]["links"] == []
    (link,) = instances["rockmongo-1"]["links"]
    assert (link["source"], link["target"]) == ("rockmongo-1", "mongodb-1")
    assert (link["listen_host"], link["listen_port"]) == ("127.0.0.1", 27017)
    assert (link["target_host"], link["target_host_port"], link["target_internal"]) == (
        "local", 4000, 27017)
    assert not state.exists()


def test_dry_run_of_web_db_example_links_web_to_the_db_host_port(state: Path) -> None:
    """examples/web_db.json: both containers get distinct allocated ports in 4000..59999 and
    web's link listens on 127.0.0.1:5432 and targets db's host port."""
    proc = run("deploy", "--dry-run", WEB_DB)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    ports = mapped_ports(lines)
    assert set(ports) == {"web", "db"}
    assert ports["web"] != ports["db"]
    assert all(4000 <= p <= 59999 for p in ports.values())
    assert f"linking web: 127.0.0.1:5432 -> localhost:{ports['db']}" in lines
    assert lines.index("local Container db-1 will be created") < lines.index(
        "local Container web-1 will be created"), "link target starts before its source"
    assert len(lines) == 5, lines
    assert not state.exists()


def test_dry_run_of_a_saved_state_file_plans_the_same_ports(tmp_path: Path,
                                                           state: Path) -> None:
    """A state file written by `statefile.render` (with non-default ports) dry-runs to the
    ports it records; its geard timestamp suffix is dropped from the deployment name."""
    deployment = spec.load(ROCKMONGO)
    saved_plan = plan(deployment, name="rockmongo_mongodb",
                      taken={"local": frozenset({4000, 4001})})
    recorded = {(i.id, m.internal, m.external) for i in saved_plan.instances for m in i.ports}
    assert ("mongodb-1", 27017, 4002) in recorded  # really not the default allocation
    path = write(tmp_path, "rockmongo_mongodb.json.20140422-072112",
                 json.dumps(statefile.render(saved_plan, deployment)))

    text = run("deploy", "--dry-run", path)
    assert text.returncode == 0, text.stderr
    assert "local PortMapping: 27017 -> 4002" in text.stdout.splitlines()
    assert "linking rockmongo: 127.0.0.1:27017 -> localhost:4002" in text.stdout.splitlines()

    as_json = run("deploy", "--dry-run", "--json", path)
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["name"] == "rockmongo_mongodb"
    planned = {(i["id"], p["internal"], p["external"])
               for i in doc["instances"] for p in i["ports"]}
    assert planned == recorded
    assert not state.exists()


# --- bad input: descriptors and options (exit 2, one line) -----------------------------------

BAD_DESCRIPTORS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    # name: (file text, None = file missing; fragments the one error line must contain)
    "missing file": (None, ("nope.json", "no such file")),
    "not json": ('{"containers": [\n  {"name": "a",}\n]}', ("not valid JSON",
                                                          "line 2 column 16")),
    "port out of range": (
        '{"containers":[{"name":"a","image":"x"},'
        '{"name":"b","image":"y","publicports":[{"internal":70000}]}]}',
        ("containers[1].publicports[0].internal", "1..65535")),
    "unknown key": ('{"containers":[{"name":"a","image":"x","imgae":"y"}]}',
                    ("containers[0].imgae", "unknown key", "Image")),
    "link to unknown container": (
        '{"containers":[{"name":"a","image":"x","links":[{"to":"nope"}]}]}',
        ("containers[0].links[0].to", "nope")),
    "duplicate container names": (
        '{"containers":[{"name":"a","image":"x"},{"name":"a","image":"y"}]}',
        ("containers[1].name", "duplicate", "'a'")),
    "same external port twice": (
        '{"containers":[{"name":"a","image":"x","publicports":[{"internal":1,"external":5000}]},'
        '{"name":"b","image":"y","publicports":[{"internal":2,"external":5000}]}]}',
        ("containers[1].publicports[0].external", "5000")),
    "wrong type": ('{"containers":[{"name":"a","image":"x","count":"three"}]}',
                   ("containers[0].count", "integer")),
    "bad container name": ('{"containers":[{"name":"-a","image":"x"}]}',
                           ("containers[0].name", "'-a'")),
}
SUBPROCESS_BAD = ("missing file", "not json", "port out of range", "unknown key",
                  "link to unknown container")


def _bad_file(tmp_path: Path, case: str) -> Path:
    text, _ = BAD_DESCRIPTORS[case]
    return tmp_path / "nope.json" if text is None else write(tmp_path, "bad.json", text)


@pytest.mark.parametrize("case", list(BAD_DESCRIPTORS))
def test_bad_descriptor_exits_2_with_one_line_naming_the_field(case: str, tmp_path: Path,
                                                               state: Path) -> None:
    """In process: exit 2, nothing on stdout, one `gearproxy: error:` line naming the field."""
    result = invoke("deploy", "--dry-run", _bad_file(tmp_path, case))
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert_one_error_line(result.stderr, *BAD_DESCRIPTORS[case][1])
    assert not state.exists()


@pytest.mark.parametrize("case", SUBPROCESS_BAD)
def test_bad_descriptor_subprocess_exits_2_without_traceback(case: str, tmp_path: Path,
                                                             state: Path) -> None:
    """As a real process (dry run and real deploy alike): exit 2, one line, no traceback,
    and a real deploy of a bad file starts no daemon."""
    path = _bad_file(tmp_path, case)
    for args in (("--dry-run",), ("--json",)):
        proc = run("deploy", *args, path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        assert_one_error_line(proc.stderr, *BAD_DESCRIPTORS[case][1])
    assert not state.exists()
    assert daemons_of(state) == []


def test_large_descriptor_exits_2_saying_it_is_too_large(tmp_path: Path) -> None:
    path = write(tmp_path, "big.json", '{"containers": []}' + " " * (1 << 20))
    result = invoke("deploy", "--dry-run", path)
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "1 MiB")


@pytest.mark.parametrize("name", ["bad name!", "-leading-dash", "x" * 64, "a/b"])
def test_invalid_name_option_exits_2_with_one_line(name: str, state: Path) -> None:
    result = invoke("deploy", "--dry-run", "--name", name, ROCKMONGO)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert_one_error_line(result.stderr, "--name")
    assert not state.exists()


def test_invalid_name_option_subprocess_exits_2() -> None:
    proc = run("deploy", "--dry-run", "--name", "bad name!", ROCKMONGO)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, "--name", "bad name!")


def test_valid_name_option_names_the_planned_deployment() -> None:
    result = invoke("deploy", "--dry-run", "--json", "--name", "shop.v2", ROCKMONGO)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "shop.v2"


def test_empty_name_option_is_rejected() -> None:
    result = invoke("deploy", "--dry-run", "--name", "", ROCKMONGO)
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "--name")


def test_file_name_that_makes_no_deployment_name_asks_for_name(tmp_path: Path) -> None:
    """A file whose name is no valid deployment name: exit 2 saying to give --name."""
    path = write(tmp_path, "my app.json", ROCKMONGO.read_text())
    result = invoke("deploy", "--dry-run", path)
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "--name")
    assert invoke("deploy", "--dry-run", "--name", "myapp", path).exit_code == 0


def test_directory_as_descriptor_exits_2_with_one_line(tmp_path: Path) -> None:
    result = invoke("deploy", "--dry-run", tmp_path)
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "directory")


# --- runtime failures: no daemon, no engine (exit 1, one line) -------------------------------


@pytest.mark.parametrize("args", [("status",), ("status", "web"), ("list",), ("stop", "web"),
                                  ("start", "web-1"), ("restart", "web"), ("list", "--json")])
def test_verbs_without_a_daemon_exit_1_saying_it_does_not_answer(args: tuple[str, ...],
                                                                 state: Path) -> None:
    """With an empty state directory no daemon answers: exit 1, one line, nothing on stdout,
    and the verb neither starts a daemon nor writes into the state directory."""
    state.mkdir()
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert_one_error_line(result.stderr, "daemon does not answer", str(state))
    assert list(state.iterdir()) == []
    assert daemons_of(state) == []


@pytest.mark.parametrize("args", [("status",), ("list",)])
def test_status_and_list_subprocess_without_a_daemon_exit_1(args: tuple[str, ...],
                                                            state: Path) -> None:
    state.mkdir()
    proc = run(*args)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, "daemon does not answer")


def test_status_with_a_stale_socket_file_says_the_daemon_does_not_answer(state: Path) -> None:
    """A socket left by a dead daemon (nobody listening) is 'does not answer', not a crash."""
    state.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(state / "daemon.sock"))  # bound, never listening: connect is refused
        result = invoke("status")
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "daemon does not answer")


def test_delete_without_daemon_or_engine_fails_fast_and_leaves_no_daemon(state: Path) -> None:
    """`delete` starts a daemon when none answers; with DOCKER_HOST pointing nowhere that daemon
    cannot start: exit 1 within seconds, one line saying the daemon did not start because the
    engine does not answer, and no daemon process left running."""
    state.mkdir()
    started = time.monotonic()
    proc = run("delete", "web", timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert elapsed < 15, f"delete took {elapsed:.1f}s to fail"
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, "daemon did not start", "Docker engine", NOWHERE,
                          "does not answer")
    assert wait_no_daemon(state) == []


def test_deploy_with_unreachable_engine_exits_1_and_leaves_no_daemon(state: Path) -> None:
    """A real deploy auto-starts a daemon, which cannot reach the engine at a wrong DOCKER_HOST:
    exit 1 with one line that says so (and where the daemon's log is), nothing on stdout even
    with --json, no daemon process left behind."""
    for extra in ((), ("--json",)):
        started = time.monotonic()
        proc = run("deploy", *extra, ROCKMONGO, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert time.monotonic() - started < 15
        assert proc.stdout == ""
        assert_one_error_line(proc.stderr, "Docker engine", NOWHERE, "does not answer",
                              str(state / "daemon.log"))
        assert wait_no_daemon(state) == []


def test_daemon_start_failure_line_has_the_error_prefix_once() -> None:
    proc = run("deploy", ROCKMONGO, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count(ERROR_PREFIX) == 1, proc.stderr


def test_logs_with_unreachable_engine_exits_1_saying_the_engine_does_not_answer(
        state: Path) -> None:
    """`logs` talks to the engine directly: a wrong DOCKER_HOST gives exit 1 and one line."""
    proc = run("logs", "web-1")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, "Docker engine", NOWHERE, "does not answer")
    assert not state.exists()


@pytest.mark.parametrize("value", ["-1", "1000001", "fast"])
def test_daemon_proxy_busy_poll_out_of_range_exits_2_naming_it(value: str, state: Path) -> None:
    result = CliRunner().invoke(main, ["daemon", "--proxy-busy-poll", value])
    assert result.exit_code == 2
    assert "--proxy-busy-poll" in result.output
