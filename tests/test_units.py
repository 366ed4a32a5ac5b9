"""`gearproxy install-units` and the unit files themselves (`systemd-analyze verify`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gearproxy import units
from gearproxy.cli import main

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"


def gearproxy_executable() -> Path:
    """The real `gearproxy` script of this environment (what ExecStart= should run)."""
    beside = Path(sys.executable).parent / "gearproxy"
    if beside.is_file():
        return beside
    found = shutil.which("gearproxy")
    assert found, "the gearproxy script is not installed (pip install -e .)"
    return Path(found)


def systemd_analyze() -> str:
    """Path of systemd-analyze; a missing one skips locally and fails under CI=true."""
    found = shutil.which("systemd-analyze")
    if found is None:
        message = "systemd-analyze is missing (apt-get install -y systemd)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def install(*args: str) -> str:
    result = CliRunner().invoke(main, ["install-units", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def exec_start(text: str) -> str:
    [line] = [x for x in text.splitlines() if x.startswith("ExecStart=")]
    return line


def test_shipped_units_have_one_default_exec_start() -> None:
    """Each shipped unit runs `/usr/local/bin/gearproxy daemon` (pip as root) until rendered."""
    for unit in units.UNITS:
        assert exec_start(units.unit_text(unit)) == "ExecStart=/usr/local/bin/gearproxy daemon"


def test_systemd_directory_is_the_package_data() -> None:
    """`systemd/` in the source tree shows the very files the package installs."""
    for unit in units.UNITS:
        shown = REPO / "systemd" / unit.source
        assert shown.read_text() == units.unit_text(unit)
    assert not list((REPO / "systemd").glob("*@.*")), "templates need an instance-copy verify"


def test_install_writes_system_unit_with_exec_path(tmp_path: Path) -> None:
    """The system unit lands in --dest with ExecStart= the given executable plus `daemon`."""
    exe = gearproxy_executable()
    out = install("--dest", str(tmp_path), "--exec", str(exe))
    written = tmp_path / "gearproxy.service"
    text = written.read_text()
    assert exec_start(text) == f"ExecStart={exe.resolve()} daemon"
    assert "Type=notify" in text
    assert "WantedBy=multi-user.target" in text
    assert oct(written.stat().st_mode & 0o777) == "0o644"
    assert f"wrote {written}" in out
    assert [p.name for p in tmp_path.iterdir()] == ["gearproxy.service"]


def test_install_user_writes_user_unit_under_plain_name(tmp_path: Path) -> None:
    """--user writes the rootless unit as gearproxy.service, with DOCKER_HOST in the runtime dir."""
    exe = gearproxy_executable()
    install("--user", "--dest", str(tmp_path), "--exec", str(exe))
    text = (tmp_path / "gearproxy.service").read_text()
    assert exec_start(text) == f"ExecStart={exe.resolve()} daemon"
    assert "Environment=DOCKER_HOST=unix://%t/docker.sock" in text
    assert "WantedBy=default.target" in text
    assert "CapabilityBoundingSet" not in text


def test_user_destination_honours_xdg_config_home(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --dest, --user writes to $XDG_CONFIG_HOME/systemd/user (created if missing)
    and prints the systemctl --user and enable-linger steps."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    out = install("--user", "--exec", str(gearproxy_executable()))
    assert (tmp_path / "cfg/systemd/user/gearproxy.service").is_file()
    assert "systemctl --user daemon-reload && systemctl --user enable --now gearproxy" in out
    assert "loginctl enable-linger" in out


def test_user_destination_defaults_to_home_config() -> None:
    """With no XDG_CONFIG_HOME the user directory is ~/.config/systemd/user."""
    assert units.user_dir({"HOME": "/home/ann"}) == Path("/home/ann/.config/systemd/user")
    assert units.user_dir({"HOME": "/home/ann", "XDG_CONFIG_HOME": ""}) == \
        Path("/home/ann/.config/systemd/user")
    assert units.user_dir({"XDG_CONFIG_HOME": "/cfg"}) == Path("/cfg/systemd/user")


def test_dry_run_prints_and_writes_nothing(tmp_path: Path) -> None:
    """--dry-run prints the rendered unit and its destination, and creates no file."""
    out = install("--dry-run", "--dest", str(tmp_path), "--exec", str(gearproxy_executable()))
    assert f"# would write {tmp_path / 'gearproxy.service'}" in out
    assert "Type=notify" in out
    assert list(tmp_path.iterdir()) == []


def test_bad_options_give_one_line_and_exit_2(tmp_path: Path) -> None:
    """A missing --dest or a non-executable --exec is a usage error on one line."""
    plain = tmp_path / "gearproxy"
    plain.write_text("not executable\n")
    plain.chmod(0o644)
    missing = tmp_path / "absent"
    cases = [(["--dest", str(missing), "--exec", str(gearproxy_executable())],
              f"--dest {missing}: no such directory"),
             (["--dest", str(tmp_path), "--exec", str(plain)],
              f"--exec {plain}: not an executable file")]
    for args, message in cases:
        result = CliRunner().invoke(main, ["install-units", *args])
        assert result.exit_code == 2
        assert result.output == f"gearproxy: error: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gearproxy"]


def test_unwritable_dest_gives_one_line_and_exit_1(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission denied while writing (faked: the tests may run as root) gives one line
    naming the file and what to do, exit 1, and leaves nothing behind."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(units.tempfile, "mkstemp", refuse)
    result = CliRunner().invoke(main, ["install-units", "--dest", str(tmp_path),
                                       "--exec", str(gearproxy_executable())])
    assert result.exit_code == 1
    assert result.output == (f"gearproxy: error: cannot write {tmp_path}/gearproxy.service:"
                             " permission denied (run as root, or use --user or --dest)\n")
    assert list(tmp_path.iterdir()) == []


def test_missing_system_unit_directory_gives_one_line_and_exit_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --dest on a host with no /etc/systemd/system: one line, exit 1."""
    monkeypatch.setattr(units, "SYSTEM_DIR", tmp_path / "etc/systemd/system")
    result = CliRunner().invoke(main, ["install-units", "--exec", str(gearproxy_executable())])
    assert result.exit_code == 1
    assert result.output == (f"gearproxy: error: {tmp_path}/etc/systemd/system does not exist:"
                             " is systemd installed? (use --dest DIR to write elsewhere)\n")


def test_find_command_prefers_argv0_then_interpreter_dir_then_path(tmp_path: Path) -> None:
    """ExecStart= runs the gearproxy that was invoked; `python -m gearproxy` is the last resort."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "gearproxy"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    python = str(bindir / "python3")
    assert units.find_command(argv0=str(script), python="/nowhere/python",
                              which=lambda _: None) == [str(script)]
    assert units.find_command(argv0="/x/__main__.py", python=python,
                              which=lambda _: None) == [str(script)]
    assert units.find_command(argv0="/x/__main__.py", python="/nowhere/python",
                              which=lambda _: str(script)) == [str(script)]
    assert units.find_command(argv0="/x/__main__.py", python="/nowhere/python",
                              which=lambda _: None) == ["/nowhere/python", "-m", "gearproxy"]


def test_exec_start_quotes_spaces_specifiers_and_variables() -> None:
    """Paths with spaces, % or $ survive systemd's command-line parsing."""
    text = units.render(units.SYSTEM_UNIT, ["/opt/my tools/gearproxy"])
    assert exec_start(text) == 'ExecStart="/opt/my tools/gearproxy" daemon'
    assert units.quote_arg("/opt/100%/$x") == "/opt/100%%/$$x"


def test_protect_home_relaxed_only_for_executables_under_home(tmp_path: Path) -> None:
    """An executable (or its #! interpreter) under /root or /home gets ProtectHome=read-only."""
    assert units.under_home(["/root/.venv/bin/gearproxy"])
    assert units.under_home(["/usr/bin/env"], [Path("/home/ann/src/gearproxy")])
    script = tmp_path / "gearproxy"
    script.write_text("#!/home/ann/venv/bin/python3\n")
    assert units.under_home([str(script)])
    assert not units.under_home(["/usr/local/bin/gearproxy"])
    relaxed = units.render(units.SYSTEM_UNIT, ["/usr/bin/gearproxy"], home_readable=True)
    assert "ProtectHome=read-only" in relaxed.splitlines()
    assert "ProtectHome=yes" not in relaxed.splitlines()


def verify(unit_path: Path, *, user: bool, runtime_dir: Path) -> subprocess.CompletedProcess[str]:
    argv = [systemd_analyze(), *(["--user"] if user else []), "verify", "--man=no", str(unit_path)]
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0"}
    if user:
        # The user manager needs a runtime directory to start up, even offline.
        env["XDG_RUNTIME_DIR"] = str(runtime_dir)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.mark.parametrize("unit", units.UNITS, ids=lambda u: u.source)
@pytest.mark.parametrize("location", ["home", "system"])
def test_systemd_analyze_verify_passes_with_empty_stderr(unit: units.UnitFile, location: str,
                                                         tmp_path: Path) -> None:
    """Every shipped unit, rendered by install-units with a real executable, verifies clean:
    exit 0 *and* nothing on stderr (unknown keys only warn).  Both renderings are checked:
    an executable under a home directory (ProtectHome=read-only) and one outside (yes)."""
    exe = gearproxy_executable()
    if location == "system":
        # A wrapper outside any home directory, run by /bin/sh: the ProtectHome=yes rendering.
        wrapper = tmp_path / "bin" / "gearproxy"
        wrapper.parent.mkdir()
        wrapper.write_text(f'#!/bin/sh\nexec {exe} "$@"\n')
        wrapper.chmod(0o755)
        exe = wrapper
    dest = tmp_path / "units"
    dest.mkdir()
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    install(*(["--user"] if unit.user else []), "--dest", str(dest), "--exec", str(exe))
    text = (dest / unit.name).read_text()
    if not unit.user:
        expected = "yes" if not units.under_home([str(exe)]) else "read-only"
        assert f"ProtectHome={expected}" in text.splitlines()
    result = verify(dest / unit.name, user=unit.user, runtime_dir=runtime)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_systemd_analyze_verify_would_catch_an_unknown_key(tmp_path: Path) -> None:
    """The empty-stderr check has teeth: a misspelt key exits 0 but writes to stderr."""
    install("--dest", str(tmp_path), "--exec", str(gearproxy_executable()))
    unit = tmp_path / "gearproxy.service"
    unit.write_text(unit.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    result = verify(unit, user=False, runtime_dir=tmp_path)
    assert result.returncode == 0
    assert "Unknown key 'WatchdogSecs'" in result.stderr
