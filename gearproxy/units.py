"""`gearproxy install-units`: put the systemd units where systemd looks for them.

The unit files ship as package data (`gearproxy/units/`, the one source of
truth; `systemd/` in the source tree links to them).  Their `ExecStart=`
names `/usr/local/bin/gearproxy`, which is right for `pip install` as root; the
command rewrites that one line to the gearproxy this command runs from, so the
unit starts the same installation the user just tested.

The system unit hides /home, /root and /run/user (`ProtectHome=yes`).  When
the executable, its interpreter or the package itself lives there (a pyenv or
a virtualenv in a home directory), the rendered unit says `ProtectHome=read-only`
instead, or it could not even exec.
"""

from __future__ import annotations

import getpass
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import click

import gearproxy
from gearproxy.errors import GearproxyError, UsageError

SYSTEM_DIR = Path("/etc/systemd/system")
HOME_PREFIXES = (Path("/home"), Path("/root"), Path("/run/user"))


@dataclass(frozen=True, slots=True)
class UnitFile:
    """A unit shipped in the package: its file there and its name once installed."""

    source: str
    name: str
    user: bool


SYSTEM_UNIT = UnitFile(source="gearproxy.service", name="gearproxy.service", user=False)
# The user manager has its own unit namespace: the plain name, like rootless docker.service.
USER_UNIT = UnitFile(source="gearproxy-user.service", name="gearproxy.service", user=True)
UNITS = (SYSTEM_UNIT, USER_UNIT)


def unit_text(unit: UnitFile) -> str:
    """The unit file as shipped in the package."""
    return resources.files("gearproxy").joinpath("units", unit.source).read_text(encoding="utf-8")


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_command(explicit: Path | None = None, *, argv0: str | None = None,
                 python: str | None = None,
                 which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """The absolute command that runs this gearproxy, without the `daemon` argument.

    In order: `explicit` (`--exec`); `argv0` when it is the `gearproxy` script;
    the `gearproxy` script beside the interpreter; `gearproxy` on PATH; and
    last `<python> -m gearproxy`.
    """
    if explicit is not None:
        if not _is_executable(explicit):
            raise UsageError(f"--exec {explicit}: not an executable file")
        return [str(explicit.resolve())]
    argv0 = sys.argv[0] if argv0 is None else argv0
    python = sys.executable if python is None else python
    candidates = [Path(argv0)] if Path(argv0).name == "gearproxy" else []
    candidates.append(Path(python).parent / "gearproxy")
    on_path = which("gearproxy")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if _is_executable(candidate):
            return [str(candidate.resolve())]
    return [str(Path(python).absolute()), "-m", "gearproxy"]


def quote_arg(arg: str) -> str:
    """`arg` as one systemd command-line word: specifiers and variables escaped."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c.isspace() or c in "\"'\\;" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _interpreter(path: Path) -> Path | None:
    """The `#!` interpreter of a script, if it has one."""
    try:
        with path.open("rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return Path(words[0]) if words else None


def under_home(command: Sequence[str], extra: Sequence[Path] = ()) -> bool:
    """Whether the command, its script interpreter or `extra` live under a home directory."""
    paths = [Path(command[0]), *extra]
    interpreter = _interpreter(Path(command[0]))
    if interpreter is not None:
        paths.append(interpreter)
    for path in paths:
        resolved = path.resolve()
        if any(resolved.is_relative_to(prefix) for prefix in HOME_PREFIXES):
            return True
    return False


def render(unit: UnitFile, command: Sequence[str], *, home_readable: bool = False) -> str:
    """The unit text with `ExecStart=` running `command daemon`.

    `home_readable` turns `ProtectHome=yes` into `ProtectHome=read-only`.
    """
    exec_start = "ExecStart=" + " ".join(quote_arg(a) for a in [*command, "daemon"])
    lines = unit_text(unit).splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("ExecStart=")]
    assert len(starts) == 1, f"{unit.source} must have exactly one ExecStart= line"
    lines[starts[0]] = exec_start
    if home_readable:
        at = lines.index("ProtectHome=yes")
        lines[at:at + 1] = ["# install-units: the executable lives under a home directory.",
                            "ProtectHome=read-only"]
    header = (f"# Rendered by `gearproxy install-units` (gearproxy {gearproxy.__version__})"
              f" from gearproxy/units/{unit.source}.")
    return "\n".join([header, *lines]) + "\n"


def user_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the user manager reads units: `$XDG_CONFIG_HOME/systemd/user`."""
    env = os.environ if environ is None else environ
    config = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(config) / "systemd" / "user"


def write_unit(dest: Path, name: str, text: str) -> Path:
    """Write `text` to `dest/name` atomically, mode 0644; one-line errors."""
    target = dest / name
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=dest)
    except PermissionError:
        raise GearproxyError(f"cannot write {target}: permission denied"
                             " (run as root, or use --user or --dest)") from None
    except OSError as err:
        raise GearproxyError(f"cannot write {target}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise GearproxyError(f"cannot write {target}: {err.strerror}") from None
    return target


def next_steps(user: bool, default_dest: bool) -> list[str]:
    """The commands that enable the unit once written."""
    if not default_dest:
        return ["copy it to the unit directory systemd reads, then run systemctl daemon-reload"]
    if user:
        return ["systemctl --user daemon-reload && systemctl --user enable --now gearproxy",
                f"loginctl enable-linger {getpass.getuser()}"
                "   # as root, once: keep it running after logout and start it at boot"]
    return ["systemctl daemon-reload && systemctl enable --now gearproxy"]


def resolve_dest(dest: Path | None, user: bool, environ: Mapping[str, str] | None = None,
                 ) -> Path:
    """The directory to write to; checks that it exists (creating only the user default)."""
    if dest is not None:
        if not dest.is_dir():
            raise UsageError(f"--dest {dest}: no such directory")
        return dest
    if user:
        path = user_dir(environ)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise GearproxyError(f"cannot create {path}: {err.strerror}") from None
        return path
    if not SYSTEM_DIR.is_dir():
        raise GearproxyError(f"{SYSTEM_DIR} does not exist: is systemd installed?"
                             " (use --dest DIR to write elsewhere)")
    return SYSTEM_DIR


@click.command("install-units")
@click.option("--user", "user", is_flag=True,
              help="Install the rootless user unit (systemctl --user) instead of the system one.")
@click.option("--dest", type=click.Path(path_type=Path, file_okay=False),
              help="Directory to write to instead of systemd's unit directory.")
@click.option("--exec", "exec_path", type=click.Path(path_type=Path, dir_okay=False),
              help="The gearproxy executable ExecStart= runs (default: this one).")
@click.option("--dry-run", is_flag=True, help="Print the unit instead of writing it.")
def install_units_command(user: bool, dest: Path | None, exec_path: Path | None,
                          dry_run: bool) -> None:
    """Write the systemd unit that runs `gearproxy daemon`, with this gearproxy's path."""
    unit = USER_UNIT if user else SYSTEM_UNIT
    command = find_command(exec_path)
    package_dir = [] if exec_path is not None else [Path(gearproxy.__file__).parent]
    home_readable = not user and under_home(command, package_dir)
    text = render(unit, command, home_readable=home_readable)
    if dry_run:
        where = dest if dest is not None else (user_dir() if user else SYSTEM_DIR)
        click.echo(f"# would write {where / unit.name}")
        click.echo(text, nl=False)
        return
    target = write_unit(resolve_dest(dest, user), unit.name, text)
    click.echo(f"wrote {target}")
    click.echo(f"  ExecStart={' '.join(quote_arg(a) for a in [*command, 'daemon'])}")
    if home_readable:
        click.echo("  ProtectHome=read-only: the executable lives under a home directory")
    click.echo("next:")
    for step in next_steps(user, default_dest=dest is None):
        click.echo(f"  {step}")
