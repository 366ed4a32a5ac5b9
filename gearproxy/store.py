"""The state store: SQLite (standard library) in the state directory.

Theory of operation
-------------------
One file, `state.db`, in `gearproxy.config.state_dir()` (created 0700, the
file 0600), holds what gearproxy knows between runs: deployments (with the
descriptor they were deployed from), their instances (with the Docker
container id and state), the host ports they hold and their resolved links.

Several processes use the file at once (the daemon, a `deploy --dry-run`,
a second daemon started by mistake), so:

- the journal is WAL, so readers never block the writer and vice versa;
- every change runs in one `BEGIN IMMEDIATE` transaction: a writer takes the
  write lock before it reads what it is about to change, so two writers
  serialise instead of deciding on stale reads (this is what makes port
  allocation race-free: `UNIQUE(host, port)` is the backstop);
- a writer that finds the lock held waits up to `BUSY_TIMEOUT` seconds;
- foreign keys are on, so deleting a deployment deletes its instances, links
  and port reservations in the same statement.

The connection runs with `isolation_level=None` (no implicit transactions in
the `sqlite3` module); `Store.transaction()` is the one place that opens,
commits and rolls back, and nests through savepoints.

The schema is versioned: `MIGRATIONS[i]` takes the schema from version `i`
to `i + 1`, and `PRAGMA user_version` records how many have been applied.
Opening a store applies the missing ones in order inside one transaction, so
an upgrade either completes or leaves the file as it was.  A v2 is one more
string (or function) appended to `MIGRATIONS`; never edit a released one.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Protocol

from gearproxy import config, ports
from gearproxy.errors import PortConflictError, StoreError
from gearproxy.plan import (
    PORT_RANGE_END,
    PORT_RANGE_START,
    CurrentInstance,
    CurrentState,
    InstancePlan,
    LinkEndpoint,
    PortMapping,
)

FILENAME = "state.db"
BUSY_TIMEOUT = 10.0  # seconds a writer waits for another process's transaction
APPLICATION_ID = 0x47505859  # "GPXY" in the file header: this file is gearproxy's

#: The status a deployment row gets when ports are reserved before it is recorded.
PENDING = "pending"

Migration = str | Callable[[sqlite3.Connection], None]

_SCHEMA_V1 = """
CREATE TABLE deployments (
    name        TEXT PRIMARY KEY,
    descriptor  TEXT NOT NULL,
    status      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE instances (
    deployment  TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    id          TEXT NOT NULL,
    container   TEXT NOT NULL,
    host        TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    docker_id   TEXT,
    state       TEXT NOT NULL,
    PRIMARY KEY (deployment, id)
);
CREATE TABLE ports (
    host        TEXT NOT NULL,
    port        INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    deployment  TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    instance    TEXT NOT NULL,
    internal    INTEGER NOT NULL CHECK (internal BETWEEN 1 AND 65535),
    explicit    INTEGER NOT NULL CHECK (explicit IN (0, 1)),
    UNIQUE (host, port)
);
CREATE INDEX ports_by_deployment ON ports (deployment, instance);
CREATE TABLE links (
    deployment       TEXT NOT NULL,
    source           TEXT NOT NULL,
    listen_host      TEXT NOT NULL,
    listen_port      INTEGER NOT NULL,
    target           TEXT NOT NULL,
    target_container TEXT NOT NULL,
    target_internal  INTEGER NOT NULL,
    target_host      TEXT NOT NULL,
    target_host_port INTEGER NOT NULL,
    FOREIGN KEY (deployment, source) REFERENCES instances (deployment, id) ON DELETE CASCADE,
    UNIQUE (deployment, source, listen_host, listen_port, target)
);
"""

#: v2: the address a deployment's public ports listen on (`deploy --publish-address`), so a
#: restarted daemon keeps local-only ports local.  NULL: the daemon's default.
_SCHEMA_V2 = "ALTER TABLE deployments ADD COLUMN publish_address TEXT"

#: Schema migrations, in order; `user_version` counts the applied ones.
MIGRATIONS: list[Migration] = [_SCHEMA_V1, _SCHEMA_V2]


class PortClaimLike(Protocol):
    """Anything that says which host port an instance's internal port should get."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def instance(self) -> str: ...
    @property
    def internal(self) -> int: ...
    @property
    def explicit(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class PortClaim:
    """A host port reservation: `host:port` serves `instance`'s container port `internal`."""

    host: str
    port: int
    instance: str
    internal: int
    explicit: bool = False


@dataclass(frozen=True, slots=True)
class DeploymentRecord:
    """A deployment as stored: its descriptor JSON, its status and its publish address."""

    name: str
    descriptor: str
    status: str
    created_at: datetime
    updated_at: datetime
    publish_address: str | None = None


@dataclass(frozen=True, slots=True)
class InstanceRow:
    """An instance as stored, with its Docker container id (None until created) and state."""

    id: str
    container: str
    host: str
    config_hash: str
    docker_id: str | None
    state: str
    ports: tuple[PortMapping, ...]


def _now() -> str:
    return datetime.now(UTC).isoformat()


def split_statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (triggers and literals stay whole).

    `executescript` would commit the migration's transaction first, so
    migrations run statement by statement instead.
    """
    statements: list[str] = []
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \t\r\n;"):
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement: {buffer.strip()[:60]!r}")
    return statements


class Store:
    """The state database of one host (or one rootless user).

    Use `Store.open()`; close it, or use it as a context manager.  One store
    may be shared by threads: a lock serialises them, and a transaction holds
    it until it ends.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path | None = None, *,
             migrations: Sequence[Migration] | None = None) -> Store:
        """Open (creating and migrating as needed) `state.db` in `directory`.

        `directory` defaults to the state directory of this process
        (`gearproxy.config.state_dir()`).  `migrations` defaults to
        `MIGRATIONS`; tests pass their own to exercise an upgrade.
        """
        where = config.state_dir() if directory is None else directory
        path = where / FILENAME
        try:
            where.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Create the file 0600 ourselves: SQLite would use 0644, and its -wal
            # and -shm files copy the database file's mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StoreError(
                f"cannot create the state store {path}: {exc.strerror or exc}; "
                "set GEARPROXY_STATE_DIR to a directory you can write") from exc
        try:
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                 check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state store {path}: {exc}") from exc
        store = cls(db, path)
        try:
            store._configure()
            store._migrate(MIGRATIONS if migrations is None else migrations)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreError(
                f"{path} is not a usable gearproxy state store ({exc}); "
                "move it aside to start afresh") from exc
        except BaseException:
            db.close()
            raise
        return store

    def _configure(self) -> None:
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: cannot switch to WAL journal mode (got {mode!r}); "
                             "put the state directory on a local file system")

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        with self.transaction():
            # Read inside the write transaction: two processes opening a new file
            # at once must not both apply migration 1.
            version = self.schema_version()
            app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
            foreign = app_id == 0 and (version != 0 or self._db.execute(
                "SELECT count(*) FROM sqlite_master").fetchone()[0] != 0)
            if app_id not in (0, APPLICATION_ID) or foreign:
                raise StoreError(f"{self.path} is not a gearproxy state store; "
                                 "move it aside or set GEARPROXY_STATE_DIR elsewhere")
            if version > len(migrations):
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this gearproxy "
                    f"knows ({len(migrations)}); upgrade gearproxy")
            for number, migration in enumerate(migrations[version:], start=version + 1):
                try:
                    if isinstance(migration, str):
                        for statement in split_statements(migration):
                            self._db.execute(statement)
                    else:
                        migration(self._db)
                except sqlite3.Error as exc:
                    raise StoreError(f"{self.path}: migration to schema version {number} "
                                     f"failed ({exc}); the file is unchanged") from exc
            if version < len(migrations):
                self._db.execute(f"PRAGMA user_version = {len(migrations)}")
                self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def schema_version(self) -> int:
        """The schema version recorded in the file (`PRAGMA user_version`)."""
        with self._reading():
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        """Close the connection; the store is unusable afterwards."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic change: `BEGIN IMMEDIATE` ... `COMMIT`, or `ROLLBACK` on any exception.

        Nested use is safe: an inner block is a savepoint, undone alone when
        it raises, committed with the outer transaction.
        """
        with self._lock:
            depth = self._depth
            savepoint = f"gearproxy_{depth}"
            try:
                self._db.execute(f"SAVEPOINT {savepoint}" if depth else "BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreError(f"{self.path}: cannot start a transaction ({exc}); "
                                 "another gearproxy process holds the store too long") from exc
            self._depth += 1
            try:
                yield
            except BaseException as exc:
                # SQLite may already have rolled back by itself (disk full, I/O error).
                if self._db.in_transaction:
                    if depth:
                        self._db.execute(f"ROLLBACK TO {savepoint}")
                        self._db.execute(f"RELEASE {savepoint}")
                    else:
                        self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"{self.path}: {exc}") from exc
                raise
            else:
                try:
                    self._db.execute(f"RELEASE {savepoint}" if depth else "COMMIT")
                except sqlite3.Error as exc:
                    raise StoreError(f"{self.path}: cannot commit ({exc})") from exc
            finally:
                self._depth -= 1

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Hold the lock for a read and turn SQLite's errors into `StoreError`."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """A consistent read of several queries (a deferred transaction, or the current one)."""
        with self._reading():
            if self._depth:
                yield
                return
            self._db.execute("BEGIN")
            try:
                yield
            finally:
                self._db.execute("COMMIT")

    # -- deployments -------------------------------------------------------------

    def deployment_names(self) -> list[str]:
        """Every stored deployment's name, sorted."""
        with self._reading():
            rows = self._db.execute("SELECT name FROM deployments ORDER BY name").fetchall()
        return [row[0] for row in rows]

    def get_deployment(self, name: str) -> DeploymentRecord | None:
        """The stored deployment `name`, or None."""
        with self._reading():
            row = self._db.execute(
                "SELECT name, descriptor, status, created_at, updated_at, publish_address"
                " FROM deployments WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        return DeploymentRecord(row[0], row[1], row[2], datetime.fromisoformat(row[3]),
                                datetime.fromisoformat(row[4]), row[5])

    def _ensure_deployment(self, name: str) -> None:
        now = _now()
        self._db.execute(
            "INSERT INTO deployments (name, descriptor, status, created_at, updated_at)"
            " VALUES (?, '{}', ?, ?, ?) ON CONFLICT (name) DO NOTHING",
            (name, PENDING, now, now))

    def record_deployment(self, name: str, descriptor_json: str,
                          instances: Sequence[InstancePlan], removed_ids: Sequence[str],
                          status: str, publish_address: str | None = None) -> None:
        """Record a deployment's desired state in one transaction.

        Upserts the deployment (descriptor, status and, when given, publish address) and
        each of `instances`
        (an instance new to the store gets state `"planned"`; a known one
        keeps its Docker id and state), reserves each instance's host ports and
        releases the ones it no longer has, replaces the links of those
        instances, and deletes the instances in `removed_ids` with their ports
        and links.  Pass the plan's full desired state to replace everything.
        Raises `PortConflictError` (nothing changed) if a port is another
        deployment's.
        """
        with self.transaction():
            now = _now()
            self._db.execute(
                "INSERT INTO deployments (name, descriptor, status, created_at, updated_at,"
                " publish_address) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                " descriptor = excluded.descriptor, status = excluded.status,"
                " updated_at = excluded.updated_at, publish_address ="
                " coalesce(excluded.publish_address, deployments.publish_address)",
                (name, descriptor_json, status, now, now, publish_address))
            for instance_id in removed_ids:
                self._db.execute("DELETE FROM instances WHERE deployment = ? AND id = ?",
                                 (name, instance_id))
                self._db.execute("DELETE FROM ports WHERE deployment = ? AND instance = ?",
                                 (name, instance_id))
            for inst in instances:
                self._db.execute(
                    "INSERT INTO instances (deployment, id, container, host, config_hash, state)"
                    " VALUES (?, ?, ?, ?, ?, 'planned') ON CONFLICT (deployment, id) DO UPDATE SET"
                    " container = excluded.container, host = excluded.host,"
                    " config_hash = excluded.config_hash",
                    (name, inst.id, inst.container, inst.host, inst.config_hash))
                wanted = {(inst.host, p.external) for p in inst.ports}
                held = self._db.execute(
                    "SELECT host, port FROM ports WHERE deployment = ? AND instance = ?",
                    (name, inst.id)).fetchall()
                self._db.executemany("DELETE FROM ports WHERE host = ? AND port = ?",
                                     [tuple(row) for row in held if tuple(row) not in wanted])
                self._reserve(name, [PortClaim(inst.host, p.external, inst.id, p.internal,
                                               p.explicit) for p in inst.ports], None)
                self._db.execute("DELETE FROM links WHERE deployment = ? AND source = ?",
                                 (name, inst.id))
                self._db.executemany(
                    "INSERT INTO links (deployment, source, listen_host, listen_port, target,"
                    " target_container, target_internal, target_host, target_host_port)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(name, link.source, link.listen_host, link.listen_port, link.target,
                      link.target_container, link.target_internal, link.target_host,
                      link.target_host_port) for link in inst.links])

    def set_status(self, name: str, status: str) -> None:
        """Set a deployment's status; a `StoreError` if there is no such deployment."""
        with self.transaction():
            cursor = self._db.execute(
                "UPDATE deployments SET status = ?, updated_at = ? WHERE name = ?",
                (status, _now(), name))
            if cursor.rowcount == 0:
                raise StoreError(f"no deployment {name!r} in {self.path}")

    def delete_deployment(self, name: str) -> bool:
        """Forget a deployment with its instances, links and ports; True if it existed."""
        with self.transaction():
            cursor = self._db.execute("DELETE FROM deployments WHERE name = ?", (name,))
            return cursor.rowcount > 0

    # -- instances and links -----------------------------------------------------

    def _ports_by_instance(self, name: str) -> dict[str, tuple[PortMapping, ...]]:
        found: dict[str, list[PortMapping]] = {}
        for instance, internal, port, explicit in self._db.execute(
                "SELECT instance, internal, port, explicit FROM ports WHERE deployment = ?"
                " ORDER BY instance, internal, port", (name,)):
            found.setdefault(instance, []).append(PortMapping(internal, port, bool(explicit)))
        return {instance: tuple(mappings) for instance, mappings in found.items()}

    def instances(self, name: str) -> list[InstanceRow]:
        """The stored instances of deployment `name` with their ports, ordered by id."""
        with self._snapshot():
            by_instance = self._ports_by_instance(name)
            rows = self._db.execute(
                "SELECT id, container, host, config_hash, docker_id, state FROM instances"
                " WHERE deployment = ? ORDER BY id", (name,)).fetchall()
        return [InstanceRow(row[0], row[1], row[2], row[3], row[4], row[5],
                            by_instance.get(row[0], ())) for row in rows]

    def current_state(self, name: str) -> CurrentState:
        """What the planner needs of deployment `name` (empty if it is unknown)."""
        return CurrentState(tuple(
            CurrentInstance(row.id, row.container, row.host, row.config_hash, row.ports)
            for row in self.instances(name)))

    def set_instance_state(self, name: str, instance_id: str, *, state: str,
                           docker_id: str | None = None) -> None:
        """Record an instance's state, and its Docker container id when given.

        `docker_id=None` keeps the stored id; a `StoreError` if the instance is unknown.
        """
        with self.transaction():
            cursor = self._db.execute(
                "UPDATE instances SET state = ?, docker_id = coalesce(?, docker_id)"
                " WHERE deployment = ? AND id = ?", (state, docker_id, name, instance_id))
            if cursor.rowcount == 0:
                raise StoreError(f"no instance {instance_id!r} of deployment {name!r} "
                                 f"in {self.path}")

    def links(self, name: str) -> list[LinkEndpoint]:
        """The resolved links of deployment `name`, ordered by source then listen address."""
        with self._reading():
            rows = self._db.execute(
                "SELECT source, listen_host, listen_port, target, target_container,"
                " target_internal, target_host, target_host_port FROM links"
                " WHERE deployment = ? ORDER BY source, listen_host, listen_port, target",
                (name,)).fetchall()
        return [LinkEndpoint(*row) for row in rows]

    # -- ports -------------------------------------------------------------------

    def taken_ports(self, host: str, *, exclude: str | None = None) -> frozenset[int]:
        """Host ports on `host` reserved by deployments other than `exclude`."""
        with self._reading():
            rows = self._db.execute(
                "SELECT port FROM ports WHERE host = ? AND deployment IS NOT ?",
                (host, exclude)).fetchall()
        return frozenset(row[0] for row in rows)

    def port_owner(self, host: str, port: int) -> str | None:
        """The deployment that holds `host:port`, or None."""
        with self._reading():
            row = self._db.execute("SELECT deployment FROM ports WHERE host = ? AND port = ?",
                                   (host, port)).fetchone()
        return None if row is None else str(row[0])

    def reservations(self, name: str) -> list[PortClaim]:
        """Every port reservation of deployment `name`, ordered by host and port."""
        with self._reading():
            rows = self._db.execute(
                "SELECT host, port, instance, internal, explicit FROM ports"
                " WHERE deployment = ? ORDER BY host, port", (name,)).fetchall()
        return [PortClaim(row[0], row[1], row[2], row[3], bool(row[4])) for row in rows]

    def _reserve(self, deployment: str, claims: Sequence[PortClaimLike],
                 probe: Callable[[str, int], bool] | None) -> None:
        for claim in claims:
            owner = self._db.execute(
                "SELECT deployment FROM ports WHERE host = ? AND port = ?",
                (claim.host, claim.port)).fetchone()
            if owner is not None and owner[0] != deployment:
                raise PortConflictError(claim.host, claim.port, str(owner[0]))
            if owner is None and probe is not None and not probe(claim.host, claim.port):
                raise PortConflictError(claim.host, claim.port, None)
            self._db.execute(
                "INSERT INTO ports (host, port, deployment, instance, internal, explicit)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (host, port) DO UPDATE SET"
                " instance = excluded.instance, internal = excluded.internal,"
                " explicit = excluded.explicit",
                (claim.host, claim.port, deployment, claim.instance, claim.internal,
                 int(claim.explicit)))

    def reserve_ports(self, deployment: str, claims: Sequence[PortClaimLike], *,
                      probe: Callable[[str, int], bool] | None = None) -> None:
        """Reserve host ports for `deployment`, all or none.

        A port another deployment holds raises `PortConflictError` naming it;
        with `probe`, a port new to this deployment that the probe finds bound
        raises `PortConflictError` with no owner ("another process").  Ports
        the deployment already holds are updated in place (re-reserving is
        harmless).  The deployment row is created (status `PENDING`) if absent.
        """
        with self.transaction():
            self._ensure_deployment(deployment)
            self._reserve(deployment, claims, probe)

    def release_ports(self, deployment: str, instance: str | None = None) -> int:
        """Release `deployment`'s ports (only `instance`'s, when given); returns how many."""
        with self.transaction():
            cursor = self._db.execute(
                "DELETE FROM ports WHERE deployment = ? AND (? IS NULL OR instance = ?)",
                (deployment, instance, instance))
            return cursor.rowcount

    def allocate_port(self, deployment: str, host: str, instance: str, internal: int, *,
                      probe: Callable[[str, int], bool] = ports.port_is_free,
                      start: int = PORT_RANGE_START, end: int = PORT_RANGE_END) -> int:
        """Reserve and return the lowest free host port in `start..end` for `instance:internal`.

        Free means: reserved by no deployment on `host`, and `probe(host, port)`
        is true (not bound by a foreign process).  Choosing and reserving happen
        in one `BEGIN IMMEDIATE` transaction, so racing processes get distinct
        ports.  If `deployment` already reserved a port for `instance:internal`
        on `host`, that port is returned again (a re-run after a crash does not
        leak ports).  Raises `StoreError` when the range is exhausted.
        """
        if not 1 <= start <= end <= 65535:
            raise ValueError(f"bad port range {start}..{end}")
        with self.transaction():
            self._ensure_deployment(deployment)
            held = self._db.execute(
                "SELECT port FROM ports WHERE deployment = ? AND host = ? AND instance = ?"
                " AND internal = ? ORDER BY port LIMIT 1",
                (deployment, host, instance, internal)).fetchone()
            if held is not None:
                return int(held[0])
            taken = {row[0] for row in self._db.execute(
                "SELECT port FROM ports WHERE host = ? AND port BETWEEN ? AND ?",
                (host, start, end))}
            for port in range(start, end + 1):
                if port in taken or not probe(host, port):
                    continue
                self._db.execute(
                    "INSERT INTO ports (host, port, deployment, instance, internal, explicit)"
                    " VALUES (?, ?, ?, ?, ?, 0)", (host, port, deployment, instance, internal))
                return port
        raise StoreError(f"no free host port in {start}..{end} on {host} for {instance}:"
                         f"{internal}; delete unused deployments or free some ports")
