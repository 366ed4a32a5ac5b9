"""The state store (`gearproxy.store`) on real SQLite files, and the state directory choice."""

from __future__ import annotations

import json
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from gearproxy import config, ports
from gearproxy.errors import PortConflictError, StoreError
from gearproxy.plan import InstancePlan, LinkEndpoint, PortMapping
from gearproxy.store import (
    APPLICATION_ID,
    FILENAME,
    MIGRATIONS,
    PENDING,
    Migration,
    PortClaim,
    Store,
    split_statements,
)

# The v1 schema exactly as released, frozen here so that later edits to MIGRATIONS[0]
# (which must never happen) are caught by the upgrade test.
V1_SCHEMA = """
CREATE TABLE deployments (
    name TEXT PRIMARY KEY, descriptor TEXT NOT NULL, status TEXT NOT NULL,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE instances (
    deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    id TEXT NOT NULL, container TEXT NOT NULL, host TEXT NOT NULL, config_hash TEXT NOT NULL,
    docker_id TEXT, state TEXT NOT NULL, PRIMARY KEY (deployment, id));
CREATE TABLE ports (
    host TEXT NOT NULL, port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    instance TEXT NOT NULL, internal INTEGER NOT NULL CHECK (internal BETWEEN 1 AND 65535),
    explicit INTEGER NOT NULL CHECK (explicit IN (0, 1)), UNIQUE (host, port));
CREATE INDEX ports_by_deployment ON ports (deployment, instance);
CREATE TABLE links (
    deployment TEXT NOT NULL, source TEXT NOT NULL, listen_host TEXT NOT NULL,
    listen_port INTEGER NOT NULL, target TEXT NOT NULL, target_container TEXT NOT NULL,
    target_internal INTEGER NOT NULL, target_host TEXT NOT NULL,
    target_host_port INTEGER NOT NULL,
    FOREIGN KEY (deployment, source) REFERENCES instances (deployment, id) ON DELETE CASCADE,
    UNIQUE (deployment, source, listen_host, listen_port, target));
"""


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state") as opened:
        yield opened


def always_free(host: str, port: int) -> bool:
    return True


def instance(iid: str, container: str, ports_: Sequence[PortMapping] = (),
             links: Sequence[LinkEndpoint] = (), config_hash: str = "h1") -> InstancePlan:
    return InstancePlan(id=iid, container=container, index=int(iid.rsplit("-", 1)[1]),
                        host="local", image=f"{container}:latest", ports=tuple(ports_),
                        environment=(), command=None, restart="always", healthcheck=None,
                        config_hash=config_hash, links=tuple(links))


def example_instances(mongo_port: int = 4000) -> list[InstancePlan]:
    """The rockmongo/mongodb example, resolved: rockmongo-1 links to mongodb-1."""
    link = LinkEndpoint(source="rockmongo-1", listen_host="127.0.0.1", listen_port=27017,
                        target="mongodb-1", target_container="mongodb", target_internal=27017,
                        target_host="local", target_host_port=mongo_port)
    return [
        instance("mongodb-1", "mongodb", [PortMapping(27017, mongo_port)]),
        instance("rockmongo-1", "rockmongo", [PortMapping(80, 6060, explicit=True)], [link]),
    ]


# -- opening, schema and migrations ------------------------------------------------------


def test_open_creates_private_directory_file_and_current_schema(tmp_path: Path) -> None:
    """A first open creates the directory 0700, state.db 0600 and records the schema version."""
    where = tmp_path / "nested" / "gearproxy"
    with Store.open(where) as store:
        assert store.path == where / FILENAME
        assert store.schema_version() == len(MIGRATIONS)
        assert store.deployment_names() == []
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    assert stat.S_IMODE((where / FILENAME).stat().st_mode) == 0o600
    raw = sqlite3.connect(where / FILENAME)
    try:
        query = "SELECT name FROM sqlite_master WHERE type = 'table'"
        tables = {row[0] for row in raw.execute(query)}
        assert raw.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    finally:
        raw.close()
    assert tables == {"deployments", "instances", "ports", "links"}


def test_store_uses_wal_foreign_keys_and_a_busy_timeout(store: Store) -> None:
    """The journal is WAL (persisted in the file), foreign keys are on, writers wait 10 s."""
    raw = sqlite3.connect(store.path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()
    assert store._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000


def test_open_without_directory_uses_the_state_dir_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Store.open()` with no argument opens `$GEARPROXY_STATE_DIR/state.db`."""
    monkeypatch.setenv("GEARPROXY_STATE_DIR", str(tmp_path / "from-env"))
    with Store.open() as store:
        assert store.path == tmp_path / "from-env" / FILENAME


def _make_v1(path: Path) -> None:
    """A hand-made database as gearproxy with schema version 1 left it, with some data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in split_statements(V1_SCHEMA):
            raw.execute(statement)
        raw.execute("INSERT INTO deployments VALUES ('old', '{\"containers\":[]}', 'running',"
                    " '2024-01-01T00:00:00+00:00', '2024-01-01T00:00:00+00:00')")
        raw.execute("INSERT INTO instances VALUES ('old', 'db-1', 'db', 'local', 'abc', 'd0c',"
                    " 'running')")
        raw.execute("INSERT INTO ports VALUES ('local', 4321, 'old', 'db-1', 5432, 0)")
        raw.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        raw.execute("PRAGMA user_version = 1")
    finally:
        raw.close()


def test_upgrade_from_a_v1_database_keeps_its_data(tmp_path: Path) -> None:
    """A v1 file opened by this code is migrated to the current version with its data intact."""
    _make_v1(tmp_path / FILENAME)
    with Store.open(tmp_path) as store:
        assert store.schema_version() == len(MIGRATIONS)
        assert store.deployment_names() == ["old"]
        [row] = store.instances("old")
        assert (row.id, row.docker_id, row.state) == ("db-1", "d0c", "running")
        assert row.ports == (PortMapping(5432, 4321),)
        assert store.taken_ports("local") == {4321}


def test_appended_migrations_run_in_order_and_bump_the_version(tmp_path: Path) -> None:
    """A v2 (SQL) and v3 (function) appended to the list upgrade a v1 file in order."""
    _make_v1(tmp_path / FILENAME)
    seen: list[int] = []

    def v3(db: sqlite3.Connection) -> None:
        seen.append(db.execute("SELECT count(*) FROM notes").fetchone()[0])
        db.execute("INSERT INTO notes VALUES ('v3 ran; after v2')")

    migrations: list[Migration] = [
        *MIGRATIONS, "CREATE TABLE notes (text TEXT); INSERT INTO notes VALUES ('v2;ran')", v3]
    with Store.open(tmp_path, migrations=migrations) as store:
        assert store.schema_version() == len(MIGRATIONS) + 2
        assert seen == [1]
        notes = [r[0] for r in store._db.execute("SELECT text FROM notes ORDER BY rowid")]
        assert notes == ["v2;ran", "v3 ran; after v2"]
    with Store.open(tmp_path, migrations=migrations) as store:  # nothing applied twice
        assert store._db.execute("SELECT count(*) FROM notes").fetchone()[0] == 2


def test_a_failing_migration_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    """A migration that fails part way rolls back every migration of that open."""
    _make_v1(tmp_path / FILENAME)
    broken: list[Migration] = [*MIGRATIONS, "CREATE TABLE notes (text TEXT)", "NOT SQL AT ALL"]
    with pytest.raises(StoreError, match=f"migration to schema version {len(MIGRATIONS) + 2} "
                       "failed") as err:
        Store.open(tmp_path, migrations=broken)
    assert str(tmp_path / FILENAME) in str(err.value)
    with Store.open(tmp_path, migrations=MIGRATIONS[:1]) as store:
        assert store.schema_version() == 1
        names = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master")}
        assert "notes" not in names


def test_a_newer_schema_is_refused_with_upgrade_advice(tmp_path: Path) -> None:
    """A file written by a newer gearproxy is not touched: one line says to upgrade."""
    with Store.open(tmp_path):
        pass
    raw = sqlite3.connect(tmp_path / FILENAME)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(StoreError, match=r"schema version 99, newer .* upgrade gearproxy") as err:
        Store.open(tmp_path)
    assert str(tmp_path / FILENAME) in str(err.value)
    assert "\n" not in str(err.value)


def test_a_corrupt_file_is_refused_naming_the_path(tmp_path: Path) -> None:
    """Garbage in state.db gives a StoreError naming the file and saying to move it aside."""
    (tmp_path / FILENAME).write_bytes(b"this is not an sqlite database at all" * 200)
    with pytest.raises(StoreError, match="move it aside") as err:
        Store.open(tmp_path)
    assert str(tmp_path / FILENAME) in str(err.value)


def test_another_programs_sqlite_file_is_refused(tmp_path: Path) -> None:
    """An SQLite file that is not gearproxy's is not migrated over."""
    raw = sqlite3.connect(tmp_path / FILENAME)
    raw.execute("CREATE TABLE unrelated (x)")
    raw.close()
    with pytest.raises(StoreError, match="not a gearproxy state store"):
        Store.open(tmp_path)


def test_an_uncreatable_directory_is_a_store_error(tmp_path: Path) -> None:
    """A state directory that cannot be created names the path and GEARPROXY_STATE_DIR."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="GEARPROXY_STATE_DIR") as err:
        Store.open(blocker / "state")
    assert str(blocker / "state") in str(err.value)


# -- state directory selection -----------------------------------------------------------


def test_state_dir_prefers_gearproxy_state_dir() -> None:
    """`$GEARPROXY_STATE_DIR` wins, for root and for users."""
    env = {"GEARPROXY_STATE_DIR": "/srv/gp", "XDG_STATE_HOME": "/x", "HOME": "/home/u"}
    assert config.state_dir(env, uid=0) == Path("/srv/gp")
    assert config.state_dir(env, uid=1000) == Path("/srv/gp")


def test_state_dir_for_root_is_var_lib() -> None:
    """Root without an explicit directory uses /var/lib/gearproxy."""
    assert config.state_dir({"XDG_STATE_HOME": "/x"}, uid=0) == Path("/var/lib/gearproxy")


def test_state_dir_for_a_user_follows_xdg() -> None:
    """A user gets `$XDG_STATE_HOME/gearproxy`, else `~/.local/state/gearproxy`."""
    assert config.state_dir({"XDG_STATE_HOME": "/x"}, uid=1000) == Path("/x/gearproxy")
    assert config.state_dir({"HOME": "/home/u"}, uid=1000) == Path(
        "/home/u/.local/state/gearproxy")


# -- deployments, instances, links -------------------------------------------------------


def test_record_deployment_round_trips_instances_ports_and_links(store: Store) -> None:
    """What record_deployment stores comes back as current state, rows, links and ports."""
    store.record_deployment("app", '{"containers": []}', example_instances(), [], "deploying")
    record = store.get_deployment("app")
    assert record is not None
    assert (record.descriptor, record.status) == ('{"containers": []}', "deploying")
    assert record.created_at == record.updated_at
    state = store.current_state("app")
    assert [(i.id, i.container, i.host, i.config_hash, i.ports) for i in state.instances] == [
        ("mongodb-1", "mongodb", "local", "h1", (PortMapping(27017, 4000),)),
        ("rockmongo-1", "rockmongo", "local", "h1", (PortMapping(80, 6060, explicit=True),)),
    ]
    assert [(r.id, r.docker_id, r.state) for r in store.instances("app")] == [
        ("mongodb-1", None, "planned"), ("rockmongo-1", None, "planned")]
    assert store.links("app") == list(example_instances()[1].links)
    assert store.taken_ports("local") == {4000, 6060}
    assert store.taken_ports("local", exclude="app") == frozenset()
    assert store.port_owner("local", 6060) == "app"
    assert store.get_deployment("nope") is None
    assert store.current_state("nope").instances == ()


def test_instance_state_and_docker_id_survive_a_redeploy(store: Store) -> None:
    """set_instance_state records the container; recording the plan again keeps it."""
    store.record_deployment("app", "{}", example_instances(), [], "deploying")
    store.set_instance_state("app", "mongodb-1", docker_id="c0ffee", state="running")
    store.set_instance_state("app", "mongodb-1", state="exited")  # no id: keeps the old one
    store.record_deployment("app", "{}", example_instances(), [], "running")
    row = store.instances("app")[0]
    assert (row.id, row.docker_id, row.state) == ("mongodb-1", "c0ffee", "exited")
    with pytest.raises(StoreError, match="no instance 'ghost-1'"):
        store.set_instance_state("app", "ghost-1", state="running")


def test_redeploy_removes_instances_and_releases_their_ports_and_links(store: Store) -> None:
    """Removed ids lose their row, ports and links; a changed port releases the old one."""
    store.record_deployment("app", "{}", example_instances(), [], "running")
    moved = instance("mongodb-1", "mongodb", [PortMapping(27017, 4100)], config_hash="h2")
    store.record_deployment("app", "{}", [moved], ["rockmongo-1"], "running")
    assert [r.id for r in store.instances("app")] == ["mongodb-1"]
    assert store.instances("app")[0].config_hash == "h2"
    assert store.links("app") == []
    assert store.taken_ports("local") == {4100}


def test_record_deployment_is_atomic_when_a_port_conflicts(store: Store) -> None:
    """A plan whose second instance hits another deployment's port changes nothing."""
    store.record_deployment("app", "{}", example_instances(), [], "running")
    before = (store.get_deployment("app"), store.instances("app"), store.reservations("app"))
    other = [instance("web-1", "web", [PortMapping(80, 7000)]),
             instance("web-2", "web", [PortMapping(80, 6060)])]
    with pytest.raises(PortConflictError, match="deployment 'app'"):
        store.record_deployment("other", "{}", other, [], "deploying")
    assert store.deployment_names() == ["app"]
    assert store.taken_ports("local") == {4000, 6060}
    assert (store.get_deployment("app"), store.instances("app"),
            store.reservations("app")) == before


class ExplodingPlan(Sequence[InstancePlan]):
    """A sequence of instances that fails when the store reaches its second element."""

    def __init__(self, items: list[InstancePlan]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> InstancePlan:  # type: ignore[override]
        if index >= 1:
            raise RuntimeError("simulated crash half way through recording")
        return self.items[index]


def test_record_deployment_is_atomic_when_it_fails_half_way(store: Store) -> None:
    """A failure after part of the plan is written leaves the previous deployment intact."""
    store.record_deployment("app", '{"v": 1}', example_instances()[:1], [], "running")
    before = (store.get_deployment("app"), store.instances("app"), store.links("app"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.record_deployment("app", '{"v": 2}', ExplodingPlan(example_instances(4200)),
                                ["mongodb-1"], "deploying")
    assert (store.get_deployment("app"), store.instances("app"), store.links("app")) == before
    assert store.taken_ports("local") == {4000}


def test_nested_transaction_failure_is_undone_alone(store: Store) -> None:
    """An inner transaction block that raises is rolled back; the outer one still commits."""
    with store.transaction():
        store.reserve_ports("app", [PortClaim("local", 5000, "a-1", 80)])
        with pytest.raises(PortConflictError), store.transaction():
            store.reserve_ports("app", [PortClaim("local", 5001, "a-1", 81)])
            store.reserve_ports("other", [PortClaim("local", 5000, "o-1", 80)])
    assert store.reservations("app") == [PortClaim("local", 5000, "a-1", 80)]


def test_set_status_updates_status_and_time(store: Store) -> None:
    """set_status changes the status; an unknown deployment is a StoreError."""
    store.record_deployment("app", "{}", [], [], "deploying")
    store.set_status("app", "running")
    record = store.get_deployment("app")
    assert record is not None and record.status == "running"
    assert record.updated_at >= record.created_at
    with pytest.raises(StoreError, match="no deployment 'nope'"):
        store.set_status("nope", "running")


def test_delete_releases_everything_and_running_it_twice_is_fine(store: Store) -> None:
    """delete_deployment removes rows, links and ports (cascade); a second call returns False."""
    store.record_deployment("app", "{}", example_instances(), [], "running")
    store.allocate_port("app", "local", "extra-1", 9000, probe=always_free, start=30000)
    assert store.delete_deployment("app") is True
    assert store.delete_deployment("app") is False
    assert store.deployment_names() == []
    assert store.instances("app") == [] and store.links("app") == []
    assert store.taken_ports("local") == frozenset()
    for table in ("instances", "ports", "links"):
        assert store._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0


# -- port reservations and allocation ----------------------------------------------------


def test_explicit_port_held_by_another_deployment_names_it_and_reserves_nothing(
        store: Store) -> None:
    """Claiming a port another deployment holds fails naming it; none of the claims stick."""
    store.reserve_ports("rockmongo", [PortClaim("local", 6060, "rockmongo-1", 80, True)])
    claims = [PortClaim("local", 4001, "web-1", 8080), PortClaim("local", 6060, "web-1", 80, True)]
    with pytest.raises(PortConflictError) as err:
        store.reserve_ports("web", claims)
    assert err.value.owner == "rockmongo" and err.value.port == 6060
    assert "deployment 'rockmongo'" in str(err.value)
    assert store.reservations("web") == []
    assert store.taken_ports("local") == {6060}
    assert store.get_deployment("web") is None


def test_reserving_own_ports_again_updates_in_place(store: Store) -> None:
    """Re-reserving a deployment's own port is harmless and records the new instance."""
    store.reserve_ports("app", [PortClaim("local", 6060, "web-1", 80, True)])
    store.reserve_ports("app", [PortClaim("local", 6060, "web-2", 80, True)])
    assert store.reservations("app") == [PortClaim("local", 6060, "web-2", 80, True)]
    record = store.get_deployment("app")
    assert record is not None and record.status == PENDING


def test_reserving_a_port_bound_by_a_foreign_process_is_a_conflict(store: Store) -> None:
    """With a probe, an explicit port some other process listens on is refused, no owner."""
    with socket.create_server(("0.0.0.0", 0)) as sock:
        port = sock.getsockname()[1]
        with pytest.raises(PortConflictError, match="another process"):
            store.reserve_ports("app", [PortClaim("local", port, "web-1", 80, True)],
                                probe=ports.port_is_free)
    assert store.taken_ports("local") == frozenset()


def test_release_ports_of_one_instance_or_all(store: Store) -> None:
    """release_ports frees one instance's ports, or all of a deployment's, and counts them."""
    store.reserve_ports("app", [PortClaim("local", 5000, "a-1", 80),
                                PortClaim("local", 5001, "a-2", 80),
                                PortClaim("local", 5002, "a-2", 81)])
    assert store.release_ports("app", "a-2") == 2
    assert store.taken_ports("local") == {5000}
    assert store.release_ports("app") == 1
    assert store.release_ports("app") == 0


def test_allocate_returns_lowest_unreserved_port_and_is_stable_per_instance_port(
        store: Store) -> None:
    """Allocation skips reserved ports, and the same instance:internal gets its port back."""
    store.reserve_ports("other", [PortClaim("local", 30000, "o-1", 80)])
    first = store.allocate_port("app", "local", "db-1", 27017, probe=always_free, start=30000)
    second = store.allocate_port("app", "local", "db-2", 27017, probe=always_free, start=30000)
    again = store.allocate_port("app", "local", "db-1", 27017, probe=always_free, start=30000)
    assert (first, second, again) == (30001, 30002, 30001)
    # Another host has its own port space.
    assert store.allocate_port("app", "h2", "db-3", 27017, probe=always_free, start=30000) == 30000


def test_allocate_raises_when_the_range_is_exhausted(store: Store) -> None:
    """A range with every port reserved or bound gives a StoreError and reserves nothing."""
    store.reserve_ports("other", [PortClaim("local", 31000, "o-1", 80)])
    with pytest.raises(StoreError, match=r"no free host port in 31000..31001"):
        store.allocate_port("app", "local", "db-1", 1, start=31000, end=31001,
                            probe=lambda host, port: port != 31001)
    assert store.reservations("app") == []


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0"])
def test_allocate_skips_a_port_bound_by_another_socket(store: Store, address: str) -> None:
    """A port a foreign socket listens on is never handed out, even if lowest in range."""
    with socket.create_server((address, 0)) as sock:
        bound = sock.getsockname()[1]
        end = min(bound + 50, 65535)
        got = store.allocate_port("app", "local", "db-1", 27017, start=bound, end=end)
        assert got != bound
        assert bound < got <= end
        assert store.reservations("app") == [PortClaim("local", got, "db-1", 27017)]


def test_a_reopened_store_keeps_its_reservations(tmp_path: Path) -> None:
    """Reservations survive closing and reopening the store (a restart)."""
    with Store.open(tmp_path) as store:
        store.record_deployment("app", "{}", example_instances(), [], "running")
        port = store.allocate_port("app", "local", "extra-1", 1, probe=always_free, start=40000)
    with Store.open(tmp_path) as store:
        assert store.taken_ports("local") == {4000, 6060, port}
        assert store.allocate_port("other", "local", "x-1", 1, probe=always_free,
                                   start=port) == port + 1


ALLOCATOR = """
import json, sys
from pathlib import Path
from gearproxy.store import Store
directory, name, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with Store.open(directory) as store:
    print("ready", flush=True)
    sys.stdin.readline()
    got = [store.allocate_port(name, "local", f"{name}-{i}", 80, start=20000)
           for i in range(count)]
print(json.dumps(got), flush=True)
"""


def test_two_processes_allocating_concurrently_get_disjoint_ports(tmp_path: Path) -> None:
    """Two processes racing 50 allocations each into one new file never share a port."""
    procs = [subprocess.Popen([sys.executable, "-c", ALLOCATOR, str(tmp_path), name, "50"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name in ("alpha", "beta")]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:  # release both at once
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0]
    alpha, beta = (json.loads(out.strip().splitlines()[-1]) for out in outputs)
    assert len(set(alpha)) == len(set(beta)) == 50
    assert set(alpha).isdisjoint(beta)
    with Store.open(tmp_path) as store:
        assert {c.port for c in store.reservations("alpha")} == set(alpha)
        assert {c.port for c in store.reservations("beta")} == set(beta)
        assert store.taken_ports("local") == set(alpha) | set(beta)
