"""Shared fixtures for tests that need a Docker engine.

- ``docker_client``: a session-wide ``docker.DockerClient`` for ``$DOCKER_HOST``.  When no engine
  answers, the test fails under ``CI=true`` (CI must never silently skip Docker tests) and skips
  elsewhere, naming DOCKER_HOST and the command that starts the project's private engine.
- ``busybox_image``: the reference of a tiny image made with ``docker import`` from the host's
  static busybox (Debian ``busybox-static``), because no registry is reachable from CI.  Its tag
  is the content hash, so every session on an engine reuses one image and a changed busybox or
  layout gives a new one.
- ``docker_scratch``: runs labelled one-off containers and networks for one test and removes
  everything it made (plus anything matching labels the test registers) when the test ends.

Any test that uses one of these fixtures is marked ``docker`` automatically, so
``-m "not docker"`` deselects it.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import docker
import docker.errors
import pytest
from docker.models.containers import Container
from docker.models.networks import Network
from gearproxy_harness import Gearproxy

#: Label on every object a test creates; the value is the scratch run id.
TEST_LABEL = "io.gearproxy.test"
TEST_RUN_LABEL = "io.gearproxy.test.run"
BUSYBOX_REPO = "gearproxy-test/busybox"
BUSYBOX_PATH = Path("/bin/busybox")
#: Bump when the image layout below changes, so the content hash changes with it.
_IMAGE_LAYOUT_VERSION = "1"
_DOCKER_FIXTURES = frozenset({"docker_client", "busybox_image", "docker_scratch", "gp"})


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _unavailable(reason: str) -> NoReturn:
    """Fail under CI (a missing engine is a broken CI), skip on a developer machine."""
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: Docker tests fail instead of skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a Docker fixture ``docker``, so marker selection is honest."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _DOCKER_FIXTURES and item.get_closest_marker("docker") is None:
            item.add_marker(pytest.mark.docker)


def _connect() -> tuple[docker.DockerClient | None, str]:
    """Connect to the engine and ping it; return the client, or None and why it failed.

    A failed connect leaves the SDK's socket to the garbage collector; its ResourceWarning would
    become an error under ``filterwarnings = error``, so it is collected here with that warning
    ignored, once the exception (whose traceback holds the socket) is gone.
    """
    client: docker.DockerClient | None = None
    error = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=120)
            client.ping()
        except (docker.errors.DockerException, OSError) as exc:
            error = str(exc) or type(exc).__name__
            if client is not None:
                client.close()
                client = None
        gc.collect()
    return client, error


@pytest.fixture(autouse=True)
def _docker_marker_needs_an_engine(request: pytest.FixtureRequest) -> None:
    """A test marked ``docker`` gets the engine check even if it builds its own client."""
    if request.node.get_closest_marker("docker") is not None:
        request.getfixturevalue("docker_client")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client for the engine at ``$DOCKER_HOST`` (the default socket when unset)."""
    client, error = _connect()
    if client is None:
        where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock (DOCKER_HOST unset)"
        _unavailable(
            f"no Docker engine answers at DOCKER_HOST={where}: {error}; run the tests with "
            "scripts/test, or start the private engine with "
            '`scripts/test-engine start && eval "$(scripts/test-engine env)"`'
        )
    try:
        yield client
    finally:
        client.close()


# --- the busybox image -------------------------------------------------------------------------


def _busybox_is_static(path: Path) -> bool:
    """True when the ELF file at *path* has no PT_INTERP header (it needs no dynamic loader)."""
    with path.open("rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit ELF only
            return False
        order: Literal["little", "big"] = "little" if header[5] == 1 else "big"
        phoff = int.from_bytes(header[32:40], order)
        phentsize = int.from_bytes(header[54:56], order)
        phnum = int.from_bytes(header[56:58], order)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(
        int.from_bytes(table[i * phentsize : i * phentsize + 4], order) != pt_interp
        for i in range(phnum)
    )


def _busybox_applets(path: Path) -> list[str]:
    """The applets this busybox provides (each becomes a symlink in the image's /bin)."""
    out = subprocess.run(
        [str(path), "--list"], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    return sorted({name for name in out.split() if name and "/" not in name and name != "busybox"})


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _busybox_rootfs(binary: bytes, applets: Sequence[str]) -> bytes:
    """A deterministic tar of a minimal root filesystem: busybox, its applets, passwd, /tmp."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for d in ("bin", "etc", "root", "var", "var/www", "home"):
            _add_dir(tar, d)
        _add_dir(tar, "tmp", 0o1777)
        _add_file(tar, "bin/busybox", binary, 0o755)
        for applet in applets:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            link.mode = 0o777
            tar.addfile(link)
        _add_file(
            tar,
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )
        _add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def _image_changes(content_hash: str) -> list[str]:
    return [
        "ENV PATH=/bin",
        f"LABEL {TEST_LABEL}.content-hash={content_hash}",
        'CMD ["sleep", "3600"]',
    ]


def _import_busybox(
    client: docker.DockerClient, rootfs: bytes, tag: str, changes: list[str]
) -> None:
    """``docker import`` the tar through the API and raise if the engine reports an error."""
    reply = client.api.import_image_from_data(
        rootfs, repository=BUSYBOX_REPO, tag=tag, changes=changes
    )
    for raw in str(reply).splitlines():
        line = raw.strip()
        if line.startswith("{") and "error" in json.loads(line):
            raise RuntimeError(f"docker import of {BUSYBOX_REPO}:{tag} failed: {line}")


@pytest.fixture(scope="session")
def busybox_image(docker_client: docker.DockerClient) -> str:
    """``gearproxy-test/busybox:<content hash>``, imported once per engine and content.

    The image holds ``/bin/busybox`` with every applet linked in ``/bin`` (``sh``, ``httpd``,
    ``nc``, ``wget``, ``sleep``, ``cat``, ``ip``, …); its default command is ``sleep 3600``.
    """
    if not BUSYBOX_PATH.is_file():
        _unavailable(f"{BUSYBOX_PATH} is missing; install Debian's busybox-static")
    if not _busybox_is_static(BUSYBOX_PATH):
        _unavailable(f"{BUSYBOX_PATH} is dynamically linked; install Debian's busybox-static")
    binary = BUSYBOX_PATH.read_bytes()
    applets = _busybox_applets(BUSYBOX_PATH)
    digest = hashlib.sha256()
    digest.update(_IMAGE_LAYOUT_VERSION.encode())
    digest.update(binary)
    digest.update("\n".join(applets).encode())
    content_hash = digest.hexdigest()[:16]
    reference = f"{BUSYBOX_REPO}:{content_hash}"
    try:
        docker_client.images.get(reference)
    except docker.errors.ImageNotFound:
        rootfs = _busybox_rootfs(binary, applets)
        _import_busybox(docker_client, rootfs, content_hash, _image_changes(content_hash))
        docker_client.images.get(reference)  # the import must have produced it
        # A human-friendly alias; harmless if a concurrent session moves it.
        docker_client.api.tag(reference, BUSYBOX_REPO, "latest")
    return reference


# --- one-off containers with guaranteed cleanup ------------------------------------------------


@dataclass
class DockerScratch:
    """Creates labelled containers and networks for one test and removes them afterwards.

    Everything made here carries ``io.gearproxy.test=1`` and ``io.gearproxy.test.run=<run id>``;
    ``cleanup`` removes by the run label, so it finds objects even when a test failed before it
    kept a handle.  Objects that code under test creates with its own labels (for example a
    deployment's ``io.gearproxy.deployment=<name>``) are removed too once registered with
    ``remove_later("key=value")``.
    """

    client: docker.DockerClient
    image: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    extra_selectors: list[str] = field(default_factory=list)

    @property
    def labels(self) -> dict[str, str]:
        """The labels to put on any object a test creates by other means."""
        return {TEST_LABEL: "1", TEST_RUN_LABEL: self.run_id}

    def name(self, stem: str) -> str:
        """A name unique to this test run, so parallel sessions on one engine never collide."""
        return f"gptest-{stem}-{self.run_id}"

    def remove_later(self, selector: str) -> None:
        """Also remove containers and networks labelled *selector* (``key`` or ``key=value``)."""
        self.extra_selectors.append(selector)

    def run(
        self,
        command: str | Sequence[str] | None = None,
        *,
        image: str | None = None,
        labels: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Container:
        """Start a detached container (from the busybox image unless *image* is given)."""
        all_labels = {**self.labels, **(labels or {})}
        return self.client.containers.run(
            image or self.image, command, detach=True, labels=all_labels, **kwargs
        )

    def network(self, stem: str = "net", **kwargs: Any) -> Network:
        """Create a labelled bridge network named after *stem* and this run."""
        labels = {**self.labels, **kwargs.pop("labels", {})}
        return self.client.networks.create(self.name(stem), labels=labels, **kwargs)

    def exec(self, container: Container, command: str | Sequence[str]) -> tuple[int, str]:
        """Run *command* in *container*; return its exit code and combined output."""
        result = container.exec_run(command)
        return result.exit_code, result.output.decode(errors="replace")

    def exec_until(
        self,
        container: Container,
        command: str | Sequence[str],
        *,
        timeout: float = 20.0,
        accept: Callable[[int, str], bool] = lambda code, _out: code == 0,
    ) -> str:
        """Repeat *command* until *accept* holds (a server coming up), within *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while True:
            code, out = self.exec(container, command)
            if accept(code, out):
                return out
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{command!r} in {container.name} not accepted within {timeout}s: "
                    f"exit {code}, output {out!r}"
                )
            time.sleep(0.1)

    def cleanup(self) -> list[str]:
        """Remove this run's containers (with volumes), then networks; return what failed."""
        problems: list[str] = []
        selectors = [f"{TEST_RUN_LABEL}={self.run_id}", *self.extra_selectors]
        for selector in selectors:
            for container in self.client.containers.list(all=True, filters={"label": selector}):
                try:
                    container.remove(force=True, v=True)
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as exc:
                    problems.append(f"container {container.name}: {exc}")
        for selector in selectors:
            for network in self.client.networks.list(filters={"label": selector}):
                try:
                    network.remove()
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as exc:
                    problems.append(f"network {network.name}: {exc}")
        return problems


@pytest.fixture
def docker_scratch(
    docker_client: docker.DockerClient, busybox_image: str
) -> Iterator[DockerScratch]:
    """A :class:`DockerScratch` whose objects are removed when the test ends, pass or fail."""
    scratch = DockerScratch(docker_client, busybox_image)
    try:
        yield scratch
    finally:
        problems = scratch.cleanup()
        if problems:
            pytest.fail("docker_scratch cleanup failed: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def gp(tmp_path: Path, docker_client: docker.DockerClient,
       busybox_image: str) -> Iterator[Gearproxy]:
    """A private gearproxy installation (its own state directory and daemon).

    Afterwards every deployment is deleted through the CLI and, in case the daemon
    could not, the containers and networks of every `<name>.json` written to
    `tmp_path` are removed, and every proxy under the state directory is killed."""
    g = Gearproxy(tmp_path / "state")
    g.start_daemon()
    try:
        yield g
    finally:
        listed = g.run("list", "--json")
        for dep in json.loads(listed.stdout) if listed.returncode == 0 else []:
            g.run("delete", dep["name"])
        g.stop_daemon()
        g.kill_all_proxies()
        for path in tmp_path.glob("*.json"):
            for c in docker_client.containers.list(
                    all=True, filters={"label": f"io.gearproxy.deployment={path.stem}"}):
                c.remove(force=True)
            for net in docker_client.networks.list(names=[f"gearproxy-{path.stem}"]):
                net.remove()
